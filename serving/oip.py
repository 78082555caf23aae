"""Open Inference Protocol v2 (KServe / Triton) request and response codec, with Triton's
binary tensor extension.

The gateway parses a client's body into numpy arrays here, checks them against the model's
served input spec (names, datatype, rank, fixed dimensions, batch bounds, finiteness) and encodes
the engine's outputs back. Every refusal is :class:`BadRequest` with a message that names the
field, which the gateway turns into a 400. Nothing here deserialises anything but JSON and raw
little-endian tensor bytes.

Binary extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed
by the raw bytes of every input whose ``parameters.binary_data_size`` is set, in input order.
``BYTES`` elements are each a 4-byte little-endian length and the bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from kiln.spec import TensorSpec, datatype_of_numpy, numpy_of_datatype

DATATYPES = frozenset(
    {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}
)  # what a Kiln model spec can declare


class BadRequest(ValueError):
    """A request the gateway refuses with 400 (message names the field)."""


@dataclass
class InferRequest:
    """A parsed, validated inference request."""

    inputs: dict[str, np.ndarray]  # in the model's served input order
    rows: int  # the batch dimension every input shares
    request_id: str | None = None
    outputs: list[str] | None = None  # requested output names; None = all
    binary_outputs: set[str] = field(default_factory=set)  # outputs to send as binary data
    binary_default: bool = False  # `binary_data_output` request parameter


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def parse(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Split a body into its JSON header and its binary tail (empty without the extension)."""
    if header_length is None:
        doc = _json(body)
        tail = b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 < size <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {size} is outside the body ({len(body)} bytes)"
            )
        doc = _json(body[:size])
        tail = body[size:]
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object with an 'inputs' list")
    return doc, tail


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element of {size} bytes overruns the data")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in value):
        raise BadRequest(f"input {name!r}: 'shape' {value} has a negative dimension")
    return tuple(value)


def _array(entry: dict[str, Any], tail: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One input tensor from its JSON entry (and the binary tail at ``offset``)."""
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("each input needs a non-empty string 'name'")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: 'datatype' must be one of {sorted(DATATYPES)}")
    shape = _shape(entry.get("shape"), name)
    count = math.prod(shape)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object")
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size < 0:
            raise BadRequest(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
        if offset + binary_size > len(tail):
            raise BadRequest(f"input {name!r}: binary_data_size {binary_size} overruns the body")
        raw = tail[offset : offset + binary_size]
        offset += binary_size
        if datatype == "BYTES":
            values = _bytes_elements(raw, name)
            if len(values) != count:
                raise BadRequest(
                    f"input {name!r}: {len(values)} BYTES elements for shape {list(shape)}"
                )
            return name, np.array(values, dtype=object).reshape(shape), offset
        dtype = numpy_of_datatype(datatype).newbyteorder("<")
        if binary_size != count * dtype.itemsize:
            raise BadRequest(
                f"input {name!r}: {binary_size} bytes of binary data for shape "
                f"{list(shape)} of {datatype} (want {count * dtype.itemsize})"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return name, array.astype(dtype.newbyteorder("="), copy=False), offset
    if "data" not in entry:
        raise BadRequest(
            f"input {name!r}: needs 'data' (or binary_data_size with the binary extension)"
        )
    data = entry["data"]
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise BadRequest(f"input {name!r}: BYTES data must be strings")
            array = flat
        else:
            array = np.asarray(data, dtype=numpy_of_datatype(datatype))
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"input {name!r}: 'data' does not hold {datatype} values") from None
    if array.size != count:
        raise BadRequest(
            f"input {name!r}: 'data' has {array.size} values for shape "
            f"{list(shape)} ({count} values)"
        )
    return name, array.reshape(shape), offset


def _check(spec: TensorSpec, array: np.ndarray) -> None:
    name = spec.name
    if array.ndim != len(spec.shape):
        raise BadRequest(
            f"input {name!r}: rank {array.ndim}, the model takes rank "
            f"{len(spec.shape)} (shape {spec.shape})"
        )
    if not spec.matches(array.shape):
        raise BadRequest(
            f"input {name!r}: shape {list(array.shape)} does not fit {spec.shape} (-1 is any size)"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"input {name!r}: contains NaN or infinite values")


def request(
    doc: dict[str, Any], tail: bytes, specs: list[TensorSpec], *, max_rows: int
) -> InferRequest:
    """Validate a parsed body against the model's served inputs."""
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    by_name: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadRequest("each entry of 'inputs' must be an object")
        name, array, offset = _array(entry, tail, offset)
        if name in by_name:
            raise BadRequest(f"input {name!r} is given twice")
        by_name[name] = array
    if offset != len(tail):
        raise BadRequest(
            f"{len(tail) - offset} bytes of binary data are not claimed by any "
            "input's binary_data_size"
        )
    wanted = {s.name: s for s in specs}
    unknown = sorted(set(by_name) - set(wanted))
    if unknown:
        raise BadRequest(f"unknown input {unknown[0]!r}: the model takes {', '.join(wanted)}")
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in by_name:
            raise BadRequest(f"input {spec.name!r} is missing")
        array = by_name[spec.name]
        want = spec.datatype
        got = "BYTES" if array.dtype == object else datatype_of_numpy(array.dtype)
        if got != want:
            raise BadRequest(f"input {spec.name!r}: datatype {got}, the model takes {want}")
        _check(spec, array)
        inputs[spec.name] = array
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1:
        raise BadRequest(f"inputs disagree on the batch dimension: {sorted(rows)}")
    (count,) = rows
    if count < 1:
        raise BadRequest("the batch dimension is 0: send at least one row")
    if count > max_rows:
        raise BadRequest(
            f"batch of {count} rows is over this model's max_request_batch "
            f"({max_rows}); split the request"
        )
    outputs, binary, params = _outputs(doc)
    request_id = doc.get("id")
    return InferRequest(
        inputs=inputs,
        rows=count,
        request_id=str(request_id) if request_id is not None else None,
        outputs=outputs,
        binary_outputs=binary,
        binary_default=bool(params.get("binary_data_output", False)),
    )


def _outputs(doc: dict[str, Any]) -> tuple[list[str] | None, set[str], dict[str, Any]]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    entries = doc.get("outputs")
    if entries is None:
        return None, set(), params
    if not isinstance(entries, list):
        raise BadRequest("'outputs' must be a list")
    names, binary = [], set()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("each entry of 'outputs' needs a string 'name'")
        names.append(entry["name"])
        out_params = entry.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise BadRequest(f"output {entry['name']!r}: 'parameters' must be an object")
        if out_params.get("binary_data"):
            binary.add(entry["name"])
    return names, binary, params


def response(
    *,
    model: str,
    version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    binary: set[str],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when any output travels as binary."""
    tensors, tail = [], []
    for name, array in outputs.items():
        datatype = "BYTES" if array.dtype == object else datatype_of_numpy(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            if datatype == "BYTES":
                raw = b"".join(
                    struct.pack("<I", len(b)) + b
                    for b in (
                        v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)
                    )
                )
            else:
                raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = (
                array.reshape(-1).tolist()
                if datatype != "BYTES"
                else [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
            )
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)
