"""PyTorch eager: the fp32 baseline every gate compares with.

It runs the extracted torch.export program's module as PyTorch executes any module, op by op.
A model uploaded as ONNX has no torch program: its baseline is the ONNX graph in ONNX Runtime
fp32, and the build's and runner's meta say so.
"""

from __future__ import annotations

import shutil
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
from kiln.spec import ModelSpec

ONNX_FALLBACK = "onnxruntime fp32: the model was uploaded as ONNX, so there is no torch program"


class TorchEagerBackend(Backend):
    """The baseline: the torch.export program in eager PyTorch (fp32)."""

    name: ClassVar[str] = "torch-eager"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def available(self) -> Availability:
        try:
            import torch  # noqa: F401
        except Exception as exc:
            return Availability(False, f"torch not importable: {exc}"[:200])
        return Availability(True)

    def build(
        self, model: ExtractedModel, precision: str, out_dir: Path, **options: Any
    ) -> BuildResult:
        self.require(precision)
        out_dir.mkdir(parents=True, exist_ok=True)
        source = model.program if model.program is not None else model.onnx
        path = out_dir / source.name
        if path.resolve() != source.resolve():  # built in the extract folder: the file itself
            shutil.copyfile(source, path)
        meta: dict[str, Any] = {
            "backend": self.name,
            "precision": precision,
            "threads": options.get("threads") or default_threads(),
        }
        if model.program is None:
            meta["fallback"] = ONNX_FALLBACK
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
        if path.suffix == ".onnx":
            from kiln.backends.onnxruntime import load_onnx

            return load_onnx(
                path,
                spec=spec,
                device=device,
                threads=threads,
                idle_spin=idle_spin,
                meta={"backend": self.name, "fallback": ONNX_FALLBACK},
            )
        import torch

        from kiln.backends._torch import TorchRunner

        threads = threads or default_threads()
        torch.set_num_threads(threads)  # process-wide: the engine serves one model
        program = torch.export.load(str(path))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return TorchRunner(
            program.module(),
            spec.inputs,
            device=device,
            meta={"backend": self.name, "device": device, "threads": threads},
        )
