"""AOTInductor: the torch.export program compiled ahead of time into one ``.pt2`` package
(``torch._inductor.aoti_compile_and_package``), which the engine loads with
``torch._inductor.aoti_load_package``: no compile at warm-up.

fp32 on CPU or CUDA; fp16 and bf16 on CUDA only (the program is cast, weights, inputs and burnt-in
dtypes, then re-exported and compiled). A CPU package holds kernels for the build host's
instruction set (recorded in the meta as ``cpu_isa``): load it on a host with the same one.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

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

REDUCED = ("fp16", "bf16")


def _cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor will call (it honours $CXX), if any is installed."""
    import os

    for candidate in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


class InductorBackend(Backend):
    """AOTInductor packages. ``build`` options: ``device`` (default: cuda where present, else
    cpu), ``inductor_configs`` (extra torch._inductor settings), ``threads``."""

    name: ClassVar[str] = "inductor"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")

    def available(self) -> Availability:
        try:
            import torch._inductor  # noqa: F401
        except Exception as exc:
            return Availability(False, f"torch._inductor not importable: {exc}"[:200])
        if _cxx_compiler() is None:
            return Availability(
                False,
                "no C++ compiler (g++ or clang++) for AOTInductor to "
                "build its package with: install one or set $CXX",
            )
        return Availability(True)

    def supports(self, precision: str) -> Availability:
        verdict = super().supports(precision)
        if not verdict.ok or precision not in REDUCED:
            return verdict
        from kiln.backends._torch import cuda_available

        if not cuda_available():
            return Availability(
                False,
                f"inductor {precision} needs a CUDA device: this host "
                "has none (on CPU, use inductor fp32 or onnxruntime int8)",
            )
        import torch

        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return Availability(
                False, "inductor bf16 needs a GPU with bfloat16 support (Ampere or newer)"
            )
        return verdict

    def build(
        self,
        model: ExtractedModel,
        precision: str,
        out_dir: Path,
        *,
        device: str | None = None,
        inductor_configs: dict[str, Any] | None = None,
        threads: int | None = None,
        calibration: Any = None,
        **options: Any,
    ) -> BuildResult:
        """``calibration`` is accepted (the pipeline offers it to every backend) and unused:
        AOTInductor's precisions are float casts."""
        import torch

        from kiln.backends._torch import FLOAT_DTYPES, cast_program, resolve_device

        self.require(precision, model)
        assert model.program is not None  # require() refuses a model without a torch program
        if options:
            raise TypeError(f"inductor build got unknown options: {sorted(options)}")
        device = resolve_device(device)
        if device == "cpu" and precision in REDUCED:
            raise VariantUnavailable(f"inductor {precision} is built for CUDA only, not cpu")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.pt2"
        if path.resolve() == model.program.resolve():
            raise ValueError(
                f"build into a folder of its own: {out_dir} holds the extracted "
                "model.pt2, which the package must not overwrite"
            )

        program = torch.export.load(str(model.program))
        if precision != "fp32" or device != "cpu":
            dtype = getattr(torch, FLOAT_DTYPES[precision])
            program = cast_program(program, dtype=dtype, device=device)
        configs = {
            "aot_inductor.metadata": {"kiln_precision": precision},
            **(inductor_configs or {}),
        }
        started = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=configs
        )
        compile_s = time.perf_counter() - started
        package = torch._inductor.aoti_load_package(str(path)).get_metadata()
        meta = {
            "backend": self.name,
            "precision": precision,
            "device": device,
            "compile_s": round(compile_s, 2),
            "threads": threads or default_threads(),
            "cpu_isa": package.get("AOTI_CPU_ISA", ""),
            "compute_capability": package.get("AOTI_COMPUTE_CAPABILITY", ""),
            "torch": torch.__version__,
        }
        return BuildResult(path=path, meta=meta)

    def load(
        self,
        path: Path,
        *,
        spec: ModelSpec,
        device: str = "cpu",
        threads: int | None = None,
        idle_spin: bool = True,
    ) -> Runner:
        import torch

        from kiln.backends._torch import FLOAT_DTYPES, TorchRunner, cuda_available

        compiled = torch._inductor.aoti_load_package(str(path))
        package = compiled.get_metadata()
        built_for = "cuda" if package.get("AOTI_DEVICE_KEY", "cpu").startswith("cuda") else "cpu"
        if built_for == "cuda" and not cuda_available():
            raise VariantUnavailable(
                "this inductor package was compiled for CUDA and this host has no CUDA device"
            )
        precision = package.get("kiln_precision", "fp32")
        threads = threads or default_threads()
        torch.set_num_threads(threads)  # AOTInductor's CPU kernels use torch's OpenMP pool
        float_dtype = getattr(torch, FLOAT_DTYPES[precision]) if precision != "fp32" else None
        return TorchRunner(
            compiled,
            spec.inputs,
            device=built_for,
            float_dtype=float_dtype,
            meta={
                "backend": self.name,
                "device": built_for,
                "precision": precision,
                "threads": threads,
                "requested_device": device,
            },
        )
