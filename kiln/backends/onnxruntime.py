"""ONNX Runtime: the extracted ONNX graph as it is (fp32), or quantized to int8 by
:mod:`kiln.quantize` (dynamic, or static QDQ calibrated on the model's dataset).

Sessions use explicit execution providers (CUDA first where the CUDA provider is installed and a
CUDA device is asked for, then CPU) and fixed thread settings, recorded in the build's meta.
"""

from __future__ import annotations

import shutil
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
from kiln.spec import ModelSpec, TensorSpec, numpy_of_datatype

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def session_settings(threads: int | None = None) -> dict[str, Any]:
    """The SessionOptions every Kiln session uses, as a record (build meta, reports)."""
    return {
        "intra_op_num_threads": threads or default_threads(),
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def providers_for(device: str) -> list[str]:
    """Explicit providers for ``device``: never ORT's implicit choice."""
    import onnxruntime as ort

    if device.startswith("cuda"):
        if CUDA_EP not in ort.get_available_providers():
            raise VariantUnavailable(
                "onnxruntime has no CUDA execution provider here: install onnxruntime-gpu, "
                "or load the variant with device='cpu'"
            )
        return [CUDA_EP, CPU_EP]
    return [CPU_EP]


def make_session(path: Path, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession for ``path`` with Kiln's providers and thread settings."""
    import onnxruntime as ort

    settings = session_settings(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_num_threads"]
    options.inter_op_num_threads = settings["inter_op_num_threads"]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=providers_for(device))


class OrtRunner:
    """A loaded ONNX model behind the Runner interface; ``meta`` says how it runs."""

    def __init__(self, session: Any, specs: list[TensorSpec], meta: dict[str, Any]) -> None:
        self._session = session
        self._names = [i.name for i in session.get_inputs()]
        self._dtypes = [numpy_of_datatype(s.datatype) for s in specs]
        if len(self._names) != len(specs):
            raise ValueError(f"the ONNX model takes {len(self._names)} inputs, the spec "
                             f"{len(specs)}")
        self.meta = meta

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._names):
            raise ValueError(f"the model takes {len(self._names)} inputs "
                             f"({', '.join(self._names)}), got {len(inputs)}")
        feeds = {name: np.ascontiguousarray(x, dtype=dtype)
                 for name, x, dtype in zip(self._names, inputs, self._dtypes, strict=True)}
        return [np.asarray(out) for out in self._session.run(None, feeds)]


def load_onnx(path: Path, *, spec: ModelSpec, device: str = "cpu", threads: int | None = None,
              meta: dict[str, Any] | None = None) -> OrtRunner:
    session = make_session(path, device=device, threads=threads)
    record = {"providers": session.get_providers(), **session_settings(threads), **(meta or {})}
    return OrtRunner(session, spec.inputs, record)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime variants: fp32 (the extracted graph), int8 dynamic, int8 static (QDQ).

    ``build`` options: ``calibration`` (arrays, one per input, for int8-static),
    ``nodes_to_exclude`` (node names kept in float), ``threads``; any other option goes to
    :mod:`kiln.quantize` unchanged.
    """

    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8-dynamic", "int8-static")

    def available(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except Exception as exc:
            return Availability(False, f"onnxruntime not importable: {exc}"[:200])
        return Availability(True)

    def build(
        self,
        model: ExtractedModel,
        precision: str,
        out_dir: Path,
        *,
        calibration: list[np.ndarray] | None = None,
        nodes_to_exclude: list[str] | tuple[str, ...] = (),
        threads: int | None = None,
        **options: Any,
    ) -> BuildResult:
        self.require(precision)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.onnx"
        in_place = path.resolve() == model.onnx.resolve()
        meta: dict[str, Any] = {"backend": self.name, "precision": precision,
                                "session": session_settings(threads)}
        if precision == "fp32":
            if not in_place:  # built in the extract folder: the file itself
                shutil.copyfile(model.onnx, path)
            return BuildResult(path=path, meta=meta)
        if in_place:
            raise ValueError(f"build {precision} into a folder of its own: {out_dir} holds the "
                             "extracted model.onnx, which quantization must not overwrite")

        from kiln import quantize

        if precision == "int8-dynamic":
            meta["quantization"] = quantize.quantize_dynamic(
                model.onnx, path, nodes_to_exclude=list(nodes_to_exclude), **options)
        else:
            if not calibration:
                raise VariantUnavailable(
                    "int8-static needs calibration data: register a dataset with the model "
                    "(kiln upload --dataset) or build int8-dynamic instead"
                )
            meta["quantization"] = quantize.quantize_static(
                model.onnx, path, calibration=calibration,
                nodes_to_exclude=list(nodes_to_exclude), **options)
        return BuildResult(path=path, meta=meta)

    def load(self, path: Path, *, spec: ModelSpec, device: str = "cpu",
             threads: int | None = None) -> Runner:
        return load_onnx(path, spec=spec, device=device, threads=threads,
                         meta={"backend": self.name})
