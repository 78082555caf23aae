"""How tensors sit in an ``InferenceRecord``'s JSON columns (``input`` and ``output``).

One record is one request as served; a tensor is stored as the OIP v2 JSON tensor it would be on
the wire, so a logged request can be replayed as it came: ``{name: {"datatype", "shape",
"data"}}`` with ``data`` flat in row-major order. BYTES elements are stored as text (UTF-8, with
undecodable bytes replaced): the log is for monitoring and replay, never for unpickling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_BY_DTYPE = {np.dtype(v): k for k, v in _DATATYPES.items()}
# dtypes the registry's JSON serializer (orjson, kiln.registry.db.json_serializer) writes from the array
NATIVE = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.uint8,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float32,
        np.float64,
    )
)


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise ValueError(f"no OIP datatype for {array.dtype}") from None


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def encode(tensors: Mapping[str, np.ndarray], *, arrays: bool = False) -> dict[str, Any]:
    """``{name: array}`` -> the JSON-able record form (NaN/Inf become null: JSON has none).

    ``arrays``: numeric ``data`` stays a flat contiguous array, for the registry's own JSON
    serializer (:func:`kiln.registry.db.json_serializer`), which writes it in C; the inference log's
    writer uses this. Without it, ``data`` is a list any JSON encoder takes."""
    out: dict[str, Any] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        datatype = datatype_of(array)
        if arrays and array.dtype in NATIVE:
            data: Any = np.ascontiguousarray(array.reshape(-1))
        elif datatype == "BYTES":
            data = [_text(v) for v in array.reshape(-1).tolist()]
        elif array.dtype.kind == "f":
            flat = array.reshape(-1).astype(np.float64)
            data = (
                [None if not np.isfinite(v) else float(v) for v in flat]
                if not np.isfinite(flat).all()
                else flat.tolist()
            )
        else:
            data = array.reshape(-1).tolist()
        out[name] = {"datatype": datatype, "shape": list(array.shape), "data": data}
    return out


def decode(doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The record form -> ``{name: array}`` (null floats come back as NaN; BYTES as ``str``)."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in doc.items():
        shape = [int(d) for d in tensor["shape"]]
        datatype = tensor["datatype"]
        if datatype == "BYTES":
            array = np.array(tensor["data"], dtype=object)
        else:
            dtype = _DATATYPES[datatype]
            data = tensor["data"]
            if np.dtype(dtype).kind == "f":
                data = [np.nan if v is None else v for v in data]
            array = np.asarray(data, dtype=dtype)
        out[name] = array.reshape(shape)
    return out


def rows(docs: list[Mapping[str, Any]], name: str) -> np.ndarray:
    """Every row of tensor ``name`` across records, stacked on the batch dimension."""
    parts = [decode({name: doc[name]})[name] for doc in docs if name in doc]
    if not parts:
        return np.empty((0,))
    return np.concatenate(parts, axis=0)
