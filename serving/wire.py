"""The gateway <-> engine wire format: JSON with tensors as base64 of their raw bytes.

The gateway has already validated and decoded the client's request (JSON or Triton's binary
extension) into numpy arrays; it sends the engine exactly what the model takes, compactly:

request  ``POST /predict``::

    {"model": "digits", "version": "1.0.0", "deadline": 1764270000.25 | null,
     "inputs": [{"name", "datatype", "shape", "b64"} | {"name", "datatype": "BYTES", "shape",
                 "data": [str, ...]}],
     "outputs": ["logits"] | null}

response 200::

    {"model_name", "model_version", "outputs": [{"name", "datatype", "shape", "b64"}],
     "batch_size": int, "engine_ms": float}

errors carry an HTTP status and ``{"detail": "..."}``: 400 bad input, 404 a model this engine
does not serve, 500 model failure or non-finite output, 503 not loaded, 504 deadline passed
before the model ran (the request was dropped, never run). ``deadline`` is wall-clock epoch
seconds (both processes share the host clock).

The gateway itself does not use ``/predict``: it keeps one TCP connection per inference worker
(:mod:`serving.channel`) and sends **frames**, each carrying the requests that were waiting for
that worker, many callers' requests in one frame (the first hop that sees concurrent requests
batches them, as Triton and Ray Serve do). A frame is::

    u32 length of what follows | u32 header length | header (JSON) | tensor bytes

request header ``{"id": n, "jobs": [{"model", "version", "deadline", "outputs",
"inputs": [tensor, ...], "nbytes": its tensors' bytes}, ...]}``; answer header ``{"id": n, "answers": [{"status": 200,
"outputs": [tensor, ...], "batch_size", "engine_ms"} | {"status": 4xx/5xx, "detail"}, ...]}``,
one answer per job, in order. A tensor entry is ``{"name", "datatype", "shape", "nbytes"}``
with its raw little-endian bytes next in the tensor bytes (in entry order), or, for BYTES,
``{"name", "datatype": "BYTES", "shape", "data": [str, ...]}`` inside the header. Nothing is
pickled: a frame is JSON and raw numbers, so either end may be on another machine.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from kiln.spec import datatype_of_numpy, numpy_of_datatype


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """One tensor as a JSON-able dict (BYTES as a list of str, numbers as base64 raw bytes)."""
    doc, raw = _entry(name, array)
    if raw is not None:
        doc["b64"] = base64.b64encode(raw).decode("ascii")
    return doc


def decode_tensor(doc: dict[str, Any]) -> tuple[str, np.ndarray]:
    """Inverse of :func:`encode_tensor`; raises ValueError naming the tensor when malformed."""
    return _tensor(doc, lambda d, dtype: np.frombuffer(base64.b64decode(d["b64"]), dtype=dtype))


def _entry(name: str, array: np.ndarray) -> tuple[dict[str, Any], bytes | None]:
    """A tensor's name, datatype and shape (and, for BYTES, its strings), and its raw
    little-endian bytes (None for BYTES)."""
    datatype = datatype_of_numpy(array.dtype)
    doc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == "BYTES":
        doc["data"] = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        return doc, None
    return doc, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _tensor(
    doc: Any, numbers: Callable[[dict[str, Any], np.dtype], np.ndarray]
) -> tuple[str, np.ndarray]:
    """A tensor from its entry; ``numbers`` reads the flat array of a numeric one (in its
    little-endian dtype). ValueError naming the tensor when anything is wrong with it."""
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str):
        # callers turn a ValueError into a 400 naming the tensor, whatever was wrong with it
        raise ValueError("each tensor needs a string 'name'")  # noqa: TRY004
    try:
        shape = tuple(int(d) for d in doc["shape"])
        datatype = str(doc["datatype"])
        if datatype == "BYTES":
            return name, np.asarray(doc["data"], dtype=object).reshape(shape)
        dtype = numpy_of_datatype(datatype).newbyteorder("<")
        array = numbers(doc, dtype).reshape(shape)
        return name, array.astype(dtype.newbyteorder("="), copy=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tensor {name!r} is malformed: {exc}") from None


# ------------------------------------------------------------------------------ frames
FRAME_HEAD = struct.Struct("!II")  # length of what follows, header length
MAX_FRAME_BYTES = 1 << 30  # a frame announcing more is refused (the connection is closed)


class FrameError(ValueError):
    """A frame that cannot be read: its sender is broken, so the connection is dropped."""


def tensor_entries(
    tensors: list[tuple[str, np.ndarray]],
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Header entries and raw bytes (entry order) of ``tensors`` for a frame."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in tensors:
        doc, raw = _entry(name, array)
        if raw is not None:
            doc["nbytes"] = len(raw)
            chunks.append(raw)
        entries.append(doc)
    return entries, chunks


def frame(header: dict[str, Any], chunks: list[bytes]) -> list[bytes]:
    """The pieces of one frame, to be written in order (``writelines``, ``sendmsg``)."""
    head = orjson.dumps(header)
    length = len(head) + sum(len(c) for c in chunks)
    return [FRAME_HEAD.pack(length, len(head)), head, *chunks]


def frame_length(prefix: bytes) -> tuple[int, int]:
    """(bytes that follow, header length) from a frame's 8-byte prefix; FrameError when absurd."""
    length, head = FRAME_HEAD.unpack(prefix)
    if length > MAX_FRAME_BYTES or head > length:
        raise FrameError(f"a frame of {length} bytes (header {head}) is refused")
    return length, head


def read_header(body: bytes, head: int) -> tuple[dict[str, Any], memoryview]:
    """A frame's header (after the prefix) and a view of its tensor bytes."""
    try:
        header = orjson.loads(body[:head])
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"a frame's header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("a frame's header must be a JSON object")
    return header, memoryview(body)[head:]


def read_tensors(
    entries: Any, tail: memoryview, offset: int
) -> tuple[list[tuple[str, np.ndarray]], int]:
    """The tensors of ``entries`` (their bytes from ``tail[offset:]``) and the offset after them;
    ValueError naming the tensor when an entry is malformed. Arrays are read-only views."""
    if not isinstance(entries, list):
        raise ValueError("'inputs' must be a list of tensors")  # noqa: TRY004 (a 400 at callers)
    at = [offset]

    def numbers(doc: dict[str, Any], dtype: np.dtype) -> np.ndarray:
        nbytes, start = int(doc["nbytes"]), at[0]
        if nbytes < 0 or start + nbytes > len(tail):
            raise ValueError(f"{nbytes} bytes announced, {len(tail) - start} left in the frame")
        at[0] = start + nbytes
        return np.frombuffer(tail, dtype=dtype, count=nbytes // dtype.itemsize, offset=start)

    tensors = [_tensor(doc, numbers) for doc in entries]
    return tensors, at[0]
