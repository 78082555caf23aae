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
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from kiln.spec import datatype_of_numpy, numpy_of_datatype


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """One tensor as a JSON-able dict (BYTES as a list of str, numbers as base64 raw bytes)."""
    datatype = datatype_of_numpy(array.dtype)
    shape = list(array.shape)
    if datatype == "BYTES":
        flat = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        return {"name": name, "datatype": datatype, "shape": shape, "data": flat}
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "b64": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(doc: dict[str, Any]) -> tuple[str, np.ndarray]:
    """Inverse of :func:`encode_tensor`; raises ValueError naming the tensor when malformed."""
    name = doc.get("name")
    if not isinstance(name, str):
        # callers turn a ValueError into a 400 naming the tensor, whatever was wrong with it
        raise ValueError("each tensor needs a string 'name'")  # noqa: TRY004
    try:
        shape = tuple(int(d) for d in doc["shape"])
        datatype = str(doc["datatype"])
        if datatype == "BYTES":
            return name, np.asarray(doc["data"], dtype=object).reshape(shape)
        dtype = numpy_of_datatype(datatype).newbyteorder("<")
        array = np.frombuffer(base64.b64decode(doc["b64"]), dtype=dtype).reshape(shape)
        return name, array.astype(dtype.newbyteorder("="), copy=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tensor {name!r} is malformed: {exc}") from None
