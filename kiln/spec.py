"""Tensor specs: the names, datatypes and shapes a model takes and returns.

Datatypes use the Open Inference Protocol v2 names (``FP32``, ``INT64``, ``BYTES``...), so the
gateway can report them unchanged in model metadata. A dimension of ``-1`` is dynamic (the batch
dimension always is).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BYTES"
]

_NUMPY_OF: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPE_OF: dict[str, str] = {v: k for k, v in _NUMPY_OF.items()}
_ALIASES: dict[str, str] = {
    "float32": "FP32",
    "float": "FP32",
    "float16": "FP16",
    "half": "FP16",
    "float64": "FP64",
    "double": "FP64",
    "bfloat16": "BF16",
    "int64": "INT64",
    "long": "INT64",
    "int32": "INT32",
    "int": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
    "string": "BYTES",
    "str": "BYTES",
    "bytes": "BYTES",
}


def datatype_of_numpy(dtype: np.dtype) -> str:
    """OIP datatype name of a numpy dtype (strings and bytes are ``BYTES``)."""
    known = _DATATYPE_OF_DTYPE.get(dtype)  # every tensor of every request asks: no name lookup
    if known is not None:
        return known
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        name = _DATATYPE_OF[np.dtype(dtype).name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: use one of {sorted(_DATATYPE_OF)}") from None
    _DATATYPE_OF_DTYPE[np.dtype(dtype)] = name
    return name


_DATATYPE_OF_DTYPE: dict[np.dtype, str] = {}


def numpy_of_datatype(datatype: str) -> np.dtype:
    """Numpy dtype of an OIP datatype name (``BYTES`` becomes ``object``)."""
    if datatype == "BYTES":
        return np.dtype(object)
    if datatype == "BF16":
        raise ValueError("BF16 has no numpy dtype: send FP32 and let the engine cast")
    return np.dtype(_NUMPY_OF[datatype])


class TensorSpec(BaseModel):
    """One named tensor: ``shape`` has ``-1`` for dynamic dimensions, the first is the batch."""

    name: str = Field(min_length=1, max_length=128)
    datatype: Datatype
    shape: list[int] = Field(min_length=1)

    @field_validator("datatype", mode="before")
    @classmethod
    def _normalise_datatype(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in _ALIASES:
            return _ALIASES[value.lower()]
        return value

    @field_validator("shape")
    @classmethod
    def _dims_valid(cls, shape: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in shape):
            raise ValueError(f"shape {shape}: each dimension is a positive size or -1 (dynamic)")
        return [-1, *shape[1:]]

    def sample_shape(self, batch: int = 1, dynamic: int = 8) -> tuple[int, ...]:
        """A concrete shape: ``batch`` rows, ``dynamic`` for the other dynamic dimensions."""
        return (batch, *(dynamic if d == -1 else d for d in self.shape[1:]))

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape (batch included) fits this spec."""
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape, strict=True)
        )


class Preprocess(BaseModel):
    """A preprocessor the engine runs before the model: a tokenizer for BYTES text inputs."""

    kind: Literal["tokenizer"] = "tokenizer"
    file: str = "tokenizer.json"
    max_length: int = Field(default=128, ge=1, le=8192)
    text_input: str = "text"


class ModelSpec(BaseModel):
    """What a model takes and returns, as recorded on its version."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocess: Preprocess | None = None

    def served_inputs(self) -> list[TensorSpec]:
        """The inputs clients send: the text input when a tokenizer runs first."""
        if self.preprocess is not None:
            return [TensorSpec(name=self.preprocess.text_input, datatype="BYTES", shape=[-1])]
        return self.inputs
