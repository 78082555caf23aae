"""TensorRT through torch-tensorrt's dynamo path, on NVIDIA GPUs only.

The torch.export program is compiled with ``torch_tensorrt.dynamo.compile`` over
``torch_tensorrt.Input(min_shape, opt_shape, max_shape)`` ranges taken from the program's own
dynamic dimensions, saved as an ExportedProgram (``torch_tensorrt.save(...,
output_format="exported_program")``) and loaded with ``torch.export.load(...).module()`` after
``import torch_tensorrt`` (which registers the TensorRT engine op).

Precisions: fp32; fp16 (the program cast to fp16 first, so explicit typing keeps it in fp16);
int8 and fp8 (Hopper or newer) through NVIDIA ModelOpt's post-training quantization, which needs
``nvidia-modelopt`` and calibration data. Written against torch-tensorrt's documented API: this
project's CPU hosts cannot run it, so ``available()`` says why not, and nothing pretends.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.backends.base import (
    Availability,
    Backend,
    BuildResult,
    ExtractedModel,
    Runner,
    default_threads,
)
from kiln.errors import VariantUnavailable
from kiln.spec import ModelSpec

OPT_BATCH = 32  # TensorRT tunes kernels for this batch (the serving batch gates are timed at)
OPT_OTHER = 128  # and this sequence length (MiniLM's tokenizer truncates at 128)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


class TensorRTBackend(Backend):
    """torch-tensorrt engines. ``build`` options: ``calibration`` (int8/fp8), ``max_batch``
    (cap on the engine's batch range), ``opt_batch``, ``compile_options`` (more keyword
    arguments for ``torch_tensorrt.dynamo.compile``)."""

    name: ClassVar[str] = "tensorrt"
    needs_gpu: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8", "fp8")

    def available(self) -> Availability:
        import torch

        if not torch.cuda.is_available():
            installed = importlib.util.find_spec("torch_tensorrt") is not None
            return Availability(
                False,
                "no CUDA device"
                + (
                    ""
                    if installed
                    else " (and torch_tensorrt is not installed: "
                    "pip install -e .[tensorrt] on a GPU host)"
                ),
            )
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as exc:  # a missing libnvinfer raises a plain Exception
            return Availability(False, f"torch_tensorrt not importable: {_first_line(exc)}")
        return Availability(True)

    def supports(self, precision: str) -> Availability:
        verdict = super().supports(precision)
        if not verdict.ok or precision in ("fp32", "fp16"):
            return verdict
        import torch

        if precision == "fp8" and torch.cuda.get_device_capability() < (9, 0):
            name = torch.cuda.get_device_name()
            return Availability(False, f"tensorrt fp8 needs a Hopper GPU or newer, not {name}")
        try:
            import modelopt.torch.quantization  # noqa: F401
        except Exception as exc:
            return Availability(
                False,
                f"tensorrt {precision} calibrates with NVIDIA ModelOpt, "
                f"which does not import: {_first_line(exc)} "
                "(pip install nvidia-modelopt)",
            )
        return verdict

    def build(
        self,
        model: ExtractedModel,
        precision: str,
        out_dir: Path,
        *,
        calibration: list[np.ndarray] | None = None,
        max_batch: int | None = None,
        opt_batch: int = OPT_BATCH,
        compile_options: dict[str, Any] | None = None,
        threads: int | None = None,
        **options: Any,
    ) -> BuildResult:
        self.require(precision, model)
        if options:
            raise TypeError(f"tensorrt build got unknown options: {sorted(options)}")
        if precision in ("int8", "fp8") and not calibration:
            raise VariantUnavailable(
                f"tensorrt {precision} needs calibration data: register a "
                "dataset with the model, or build fp16"
            )
        import torch
        import torch_tensorrt

        from kiln.backends._torch import cast_program, input_dims

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.ep"
        program = torch.export.load(str(model.program))
        dims = input_dims(program)
        if precision == "fp16":
            program = cast_program(program, dtype=torch.float16, device="cuda")
        else:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        if precision in ("int8", "fp8"):
            program = _quantize(program, precision, calibration or [], model.spec)
        inputs = _trt_inputs(program, dims, max_batch=max_batch, opt_batch=opt_batch)
        enabled = {
            "fp32": {torch.float32},
            "fp16": {torch.float16},
            "int8": {torch.int8},
            "fp8": {torch.float8_e4m3fn},
        }[precision]
        started = time.perf_counter()
        trt_gm = torch_tensorrt.dynamo.compile(
            program, inputs=inputs, enabled_precisions=enabled, **(compile_options or {})
        )
        compile_s = time.perf_counter() - started
        # Input objects with min/opt/max let save() re-trace with the same dynamic dims.
        torch_tensorrt.save(
            trt_gm, str(path), output_format="exported_program", arg_inputs=inputs, retrace=True
        )
        return BuildResult(
            path=path,
            meta={
                "backend": self.name,
                "precision": precision,
                "device": "cuda",
                "compile_s": round(compile_s, 2),
                "gpu": torch.cuda.get_device_name(),
                "threads": threads or default_threads(),
                "shapes": [
                    {
                        "min": list(i.shape["min_shape"]),
                        "opt": list(i.shape["opt_shape"]),
                        "max": list(i.shape["max_shape"]),
                    }
                    for i in inputs
                ],
                "torch_tensorrt": torch_tensorrt.__version__,
            },
        )

    def load(
        self,
        path: Path,
        *,
        spec: ModelSpec,
        device: str = "cuda",
        threads: int | None = None,
        idle_spin: bool = True,
    ) -> Runner:
        verdict = self.available()
        if not verdict.ok:
            raise VariantUnavailable(f"cannot load a tensorrt variant here: {verdict.reason}")
        import torch
        import torch_tensorrt  # noqa: F401  (registers tensorrt::execute_engine for the loader)

        from kiln.backends._torch import TorchRunner

        module = torch.export.load(str(path)).module()
        float_dtype = _float_input_dtype(module)
        return TorchRunner(
            module,
            spec.inputs,
            device="cuda",
            float_dtype=float_dtype,
            meta={"backend": self.name, "device": "cuda", "threads": threads or default_threads()},
        )


def _trt_inputs(
    program: Any, dims: list[list[Any]], *, max_batch: int | None, opt_batch: int
) -> list[Any]:
    """One ``torch_tensorrt.Input`` per program input, ranges from its dynamic dims."""
    import torch_tensorrt

    from kiln.backends._torch import DimRange, user_input_nodes

    inputs = []
    for node, shape in zip(user_input_nodes(program), dims, strict=True):
        lo, opt, hi = [], [], []
        for i, dim in enumerate(shape):
            if not isinstance(dim, DimRange):
                lo.append(dim)
                opt.append(dim)
                hi.append(dim)
                continue
            top = dim.max or (1024 if i == 0 else 512)
            if i == 0 and max_batch:
                top = min(top, max_batch)
            want = opt_batch if i == 0 else OPT_OTHER
            lo.append(dim.min)
            opt.append(max(dim.min, min(top, want)))
            hi.append(top)
        inputs.append(
            torch_tensorrt.Input(
                min_shape=lo,
                opt_shape=opt,
                max_shape=hi,
                dtype=node.meta["val"].dtype,
                name=node.name,
            )
        )
    return inputs


def _quantize(program: Any, precision: str, calibration: list[np.ndarray], spec: ModelSpec) -> Any:
    """ModelOpt post-training quantization of the program's module, calibrated on the given
    arrays, re-exported with its QDQ nodes for TensorRT."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.utils import export_torch_mode

    from kiln.backends._torch import export_dynamic_shapes, input_dims, to_tensors

    dims = input_dims(program)
    module = program.module()
    config = mtq.INT8_DEFAULT_CFG if precision == "int8" else mtq.FP8_DEFAULT_CFG
    batch = to_tensors(calibration, spec.inputs, device="cuda")

    def forward_loop(m: Any) -> None:
        for start in range(0, batch[0].shape[0], 32):
            m(*(t[start : start + 32] for t in batch))

    mtq.quantize(module, config, forward_loop=forward_loop)
    if not any("quantizer" in name for name, _ in module.named_modules()):
        raise VariantUnavailable(
            f"tensorrt {precision}: ModelOpt found no layer to quantize in the exported program "
            "(it quantizes nn.Linear/nn.Conv modules, which torch.export lowers to functions)"
        )
    with torch.no_grad(), export_torch_mode():
        example = tuple(t[:2] for t in batch)
        return torch.export.export(module, example, dynamic_shapes=export_dynamic_shapes(dims))


def _float_input_dtype(module: Any) -> Any:
    """fp16 for a program compiled from an fp16 cast (its float inputs are fp16), else None."""
    import torch

    for node in module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if val is not None and getattr(val, "dtype", None) == torch.float16:
                return torch.float16
    return None
