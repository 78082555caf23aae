"""Helpers the torch-based backends (and extraction) share: reading an ExportedProgram's dynamic
dimensions back, re-exporting it cast to another dtype or device, and a numpy-in/numpy-out runner.

Torch is imported inside the functions, so importing this module stays cheap. It imports nothing
from Kiln at module level (``kiln.spec`` only where ``to_tensors`` runs): ``bench/gpu_check.py``
loads this file by path on GPU hosts that have torch but not pydantic, and reuses
:func:`cast_program` and friends from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

    from kiln.spec import TensorSpec

#: precision name -> torch dtype name, for the float casts the GPU backends build
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class DimRange:
    """One dynamic dimension of an exported program: its symbol and inclusive bounds."""

    symbol: str  # shared by every input dimension that must be equal (batch, sequence)
    min: int
    max: int | None  # None: unbounded


def user_input_nodes(program: ExportedProgram) -> list[Any]:
    """The placeholder nodes of the program's user inputs, in call order."""
    names = list(program.graph_signature.user_inputs)
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [by_name[name] for name in names if name in by_name]


def input_dims(program: ExportedProgram) -> list[list[int | DimRange]]:
    """Each user input's shape: an int for a fixed dimension, a DimRange for a dynamic one."""
    import sympy

    ranges = {str(sym): vr for sym, vr in program.range_constraints.items()}
    shapes: list[list[int | DimRange]] = []
    for node in user_input_nodes(program):
        dims: list[int | DimRange] = []
        for size in node.meta["val"].shape:
            if isinstance(size, int):
                dims.append(size)
                continue
            expr = size.node.expr
            if not isinstance(expr, sympy.Symbol) or str(expr) not in ranges:
                raise ValueError(
                    f"input {node.name} has a derived dimension {expr}: "
                    "export it with plain torch.export.Dim dimensions"
                )
            vr = ranges[str(expr)]
            upper = None if not math.isfinite(float(vr.upper)) else int(vr.upper)
            dims.append(DimRange(str(expr), int(vr.lower), upper))
        shapes.append(dims)
    return shapes


def has_dynamic_batch(program: ExportedProgram) -> bool:
    """Whether every user input's first dimension is dynamic."""
    return all(dims and isinstance(dims[0], DimRange) for dims in input_dims(program))


def export_dynamic_shapes(shapes: list[list[int | DimRange]]) -> tuple[dict[int, Any], ...]:
    """``torch.export`` dynamic_shapes (positional form) for these dims, one Dim per symbol."""
    import torch

    made: dict[str, Any] = {}
    out = []
    for dims in shapes:
        spec: dict[int, Any] = {}
        for i, dim in enumerate(dims):
            if isinstance(dim, DimRange):
                if dim.symbol not in made:
                    kwargs = {"min": dim.min} | ({"max": dim.max} if dim.max else {})
                    made[dim.symbol] = torch.export.Dim(f"d_{dim.symbol}", **kwargs)
                spec[i] = made[dim.symbol]
        out.append(spec)
    return tuple(out)


def concrete_shapes(
    shapes: list[list[int | DimRange]], *, batch: int = 2, other: int = 8
) -> list[tuple[int, ...]]:
    """Example shapes inside the dims' ranges: ``batch`` rows, ``other`` for other dynamic
    dims (one value per symbol, so dimensions that must be equal are)."""
    chosen: dict[str, int] = {}
    out = []
    for dims in shapes:
        shape = []
        for i, dim in enumerate(dims):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            want = batch if i == 0 else other
            value = chosen.setdefault(dim.symbol, max(dim.min, min(dim.max or want, want)))
            shape.append(value)
        out.append(tuple(shape))
    return out


def example_tensors(
    program: ExportedProgram, *, batch: int = 2, other: int = 8, device: str = "cpu"
) -> list[torch.Tensor]:
    """Deterministic example inputs for ``program`` (small integers, as token ids are)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    tensors = []
    nodes = user_input_nodes(program)
    for node, shape in zip(
        nodes, concrete_shapes(input_dims(program), batch=batch, other=other), strict=True
    ):
        dtype = node.meta["val"].dtype
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.randint(1, 100, shape, generator=gen).to(dtype)
        tensors.append(t.to(device))
    return tensors


def cast_program(
    program: ExportedProgram, *, dtype: torch.dtype, device: str = "cpu"
) -> ExportedProgram:
    """The same program with float weights, float inputs and float constants in ``dtype``, on
    ``device``, re-exported with the same dynamic dimensions.

    Casting the weights alone would leave dtypes the tracer burnt in (``x.to(torch.float32)``,
    ``torch.full(..., dtype=torch.float32)``) promoting everything back to float32, so every
    float32 dtype argument in the graph is rewritten too.
    """
    import copy

    import torch
    from torch.export.passes import move_to_device_pass

    shapes = input_dims(program)
    examples = example_tensors(program)
    program = copy.deepcopy(program)  # the steps below mutate weights in place
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        # "cuda" and "cuda:0" differ to the re-export's tensor-metadata asserts (MiniLM's
        # attention mask failed with "Expected: cuda, Got: cuda:0" on an H200): be explicit
        target = torch.device("cuda", torch.cuda.current_device())
    device = str(target)
    if device != "cpu":
        program = move_to_device_pass(program, device)
    module = program.module()
    module.to(dtype)  # floating-point parameters and buffers only
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = getattr(holder, attr, None)
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                setattr(holder, attr, value.to(dtype))
        elif node.op == "call_function":
            node.args = tuple(dtype if a is torch.float32 else a for a in node.args)
            node.kwargs = {k: dtype if v is torch.float32 else v for k, v in node.kwargs.items()}
    module.recompile()
    args = tuple((t.to(dtype) if t.dtype == torch.float32 else t).to(device) for t in examples)
    return torch.export.export(module, args, dynamic_shapes=export_dynamic_shapes(shapes))


def flatten_outputs(out: Any) -> list[Any]:
    """A model's outputs as a flat list (a tensor, a tuple/list of them, or a dict)."""
    if isinstance(out, dict):
        return [v for value in out.values() for v in flatten_outputs(value)]
    if isinstance(out, list | tuple):
        return [v for value in out for v in flatten_outputs(value)]
    return [out]


def to_tensors(
    inputs: Sequence[np.ndarray],
    specs: Sequence[TensorSpec],
    *,
    device: str = "cpu",
    float_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Numpy inputs as torch tensors of the spec's dtype (floats in ``float_dtype`` if given)."""
    import torch

    from kiln.spec import numpy_of_datatype

    if len(inputs) != len(specs):
        raise ValueError(
            f"the model takes {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}), got {len(inputs)}"
        )
    tensors = []
    for array, spec in zip(inputs, specs, strict=True):
        want = numpy_of_datatype(spec.datatype)
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=want))
        if float_dtype is not None and t.dtype.is_floating_point:
            t = t.to(float_dtype)
        tensors.append(t.to(device))
    return tensors


def to_numpy(outputs: Any) -> list[np.ndarray]:
    """Model outputs as float32 (for reduced-precision floats) or native-dtype numpy arrays."""
    import torch

    arrays = []
    for t in flatten_outputs(outputs):
        t = t.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arrays.append(t.cpu().numpy())
    return arrays


class TorchRunner:
    """A torch callable behind the Runner interface: numpy in, numpy out, no autograd.

    ``meta`` says what runs (backend, device, precision...) for reports and logs.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        specs: Sequence[TensorSpec],
        *,
        device: str,
        float_dtype: torch.dtype | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._fn = fn
        self._specs = list(specs)
        self._device = device
        self._float_dtype = float_dtype
        self.meta = meta or {}

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        tensors = to_tensors(
            inputs, self._specs, device=self._device, float_dtype=self._float_dtype
        )
        with torch.inference_mode():
            out = self._fn(*tensors)
        return to_numpy(out)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str | None) -> str:
    """``device`` or, when None, ``cuda`` where a CUDA device is present, else ``cpu``."""
    if device is None:
        return "cuda" if cuda_available() else "cpu"
    return device
