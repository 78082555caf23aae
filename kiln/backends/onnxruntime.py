"""ONNX Runtime: the extracted ONNX graph (fp32), or quantized to int8 by :mod:`kiln.backends.ort_quantize`
(dynamic, or static QDQ calibrated on the model's dataset); for transformers, the graph with its
attention, layer-norm and GELU subgraphs fused into ORT's contrib ops first (:mod:`kiln.backends.ort_fusion`).

Sessions use explicit execution providers (CUDA first where the CUDA provider is installed and a
CUDA device is asked for, then CPU) and fixed thread settings, recorded in the build's meta.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
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
FUSED_GRAPH = "model.fused.onnx"  # beside the extracted model.onnx (see float_graph)
#: ORT graph optimizers Kiln's CPU sessions turn off. SkipLayerNormFusion: ORT 1.32's CPU
#: SkipLayerNormalization kernel is slower than the Add + LayerNormalization it fuses (see
#: kiln.backends.ort_fusion.FusionSettings.skip_layer_norm); CUDA sessions keep it.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_settings(
    threads: int | None = None, device: str = "cpu", idle_spin: bool = True
) -> dict[str, Any]:
    """The SessionOptions every Kiln session uses, as a record (build meta, reports).

    ``force_spinning_stop`` (``idle_spin=False``, what engines use): ORT's intra-op threads
    spin during a ``run`` and stop when it returns, instead of spinning on for the next call.
    Measured here (2 cores, 2 threads, one row per call, 2 ms apart): the spinning cost ~2 ms of
    CPU per MiniLM call and ~0.7 ms per digits call that the engine's server and the gateway
    then lacked; stopping it costs ~0.15 ms per call (waking the pool thread) on the smallest
    models and nothing measurable on MiniLM.
    """
    return {
        "intra_op_num_threads": threads or default_threads(),
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "disabled_optimizers": [] if device.startswith("cuda") else list(CPU_DISABLED_OPTIMIZERS),
        "force_spinning_stop": not idle_spin,
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


def make_session(
    path: Path, *, device: str = "cpu", threads: int | None = None, idle_spin: bool = True
) -> Any:
    """An InferenceSession for ``path`` with Kiln's providers and thread settings."""
    import onnxruntime as ort

    settings = session_settings(threads, device, idle_spin)
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_num_threads"]
    options.inter_op_num_threads = settings["inter_op_num_threads"]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    options.add_session_config_entry(
        "session.force_spinning_stop", "1" if settings["force_spinning_stop"] else "0"
    )
    return ort.InferenceSession(
        str(path),
        options,
        providers=providers_for(device),
        disabled_optimizers=settings["disabled_optimizers"] or None,
    )


class OrtRunner:
    """A loaded ONNX model behind the Runner interface; ``meta`` says how it runs."""

    def __init__(self, session: Any, specs: list[TensorSpec], meta: dict[str, Any]) -> None:
        self._session = session
        self._names = [i.name for i in session.get_inputs()]
        self._dtypes = [numpy_of_datatype(s.datatype) for s in specs]
        if len(self._names) != len(specs):
            raise ValueError(
                f"the ONNX model takes {len(self._names)} inputs, the spec {len(specs)}"
            )
        self.meta = meta

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._names):
            raise ValueError(
                f"the model takes {len(self._names)} inputs "
                f"({', '.join(self._names)}), got {len(inputs)}"
            )
        feeds = {
            name: np.ascontiguousarray(x, dtype=dtype)
            for name, x, dtype in zip(self._names, inputs, self._dtypes, strict=True)
        }
        return [np.asarray(out) for out in self._session.run(None, feeds)]


def load_onnx(
    path: Path,
    *,
    spec: ModelSpec,
    device: str = "cpu",
    threads: int | None = None,
    idle_spin: bool = True,
    meta: dict[str, Any] | None = None,
) -> OrtRunner:
    session = make_session(path, device=device, threads=threads, idle_spin=idle_spin)
    record = {
        "providers": session.get_providers(),
        **session_settings(threads, device, idle_spin),
        **(meta or {}),
    }
    return OrtRunner(session, spec.inputs, record)


@dataclass(frozen=True)
class FloatGraph:
    """The fp32 graph the variants are built on (fused, or the extracted one) and the fusion
    record that says which, and why."""

    path: Path
    fusion: dict[str, Any]


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime variants: fp32, int8 dynamic, int8 static (QDQ), each built on the graph
    ``float_graph`` returns: the extracted graph with its transformer subgraphs fused into ORT's
    contrib ops (:mod:`kiln.backends.ort_fusion`) when fusion applies and agrees with the extracted graph,
    else the extracted graph as it is. The build's meta records which, and why.

    ``build`` options: ``calibration`` (arrays, one per input: static int8's calibration data,
    and real rows the fused graph is checked on), ``nodes_to_exclude`` (node names of the graph
    built on, kept in float), ``threads``, ``fuse`` (default True); any other option goes to
    :mod:`kiln.backends.ort_quantize` unchanged.
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
        fuse: bool = True,
        **options: Any,
    ) -> BuildResult:
        self.require(precision)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.onnx"
        in_place = path.resolve() == model.onnx.resolve()
        if in_place and precision != "fp32":
            raise ValueError(
                f"build {precision} into a folder of its own: {out_dir} holds the "
                "extracted model.onnx, which quantization must not overwrite"
            )
        float_graph = self.float_graph(model, check_inputs=calibration, fuse=fuse)
        graph = float_graph.path
        meta: dict[str, Any] = {
            "backend": self.name,
            "precision": precision,
            "session": session_settings(threads),
            "graph": "fused" if graph != model.onnx else "extracted",
            "fusion": float_graph.fusion,
        }
        if precision == "fp32":
            if in_place:  # built in the extract folder: the graph itself (fused or extracted)
                return BuildResult(path=graph, meta=meta)
            shutil.copyfile(graph, path)
            return BuildResult(path=path, meta=meta)

        from kiln.backends import ort_quantize as quantize

        if precision == "int8-dynamic":
            meta["quantization"] = quantize.quantize_dynamic(
                graph, path, nodes_to_exclude=list(nodes_to_exclude), **options
            )
        else:
            if not calibration:
                raise VariantUnavailable(
                    "int8-static needs calibration data: register a dataset with the model "
                    "(kiln upload --dataset) or build int8-dynamic instead"
                )
            meta["quantization"] = quantize.quantize_static(
                graph,
                path,
                calibration=calibration,
                nodes_to_exclude=list(nodes_to_exclude),
                **options,
            )
        return BuildResult(path=path, meta=meta)

    def float_graph(
        self,
        model: ExtractedModel,
        *,
        check_inputs: list[np.ndarray] | None = None,
        fuse: bool = True,
    ) -> FloatGraph:
        """The fp32 graph every variant is built on, and the fusion record.

        The fused graph is written once beside the extracted one (``model.fused.onnx``, its
        record in ``model.fused.json``, keyed by the extracted graph's SHA-256 and the fusion
        libraries' versions) and reused by the other precisions of the run. Where fusion does
        not apply, or the fused graph disagrees with the extracted one, the extracted graph is
        returned and the record's ``reason`` says why. ``accuracy_aware_quantize`` should start
        from this graph too, so its node names match the variants'.
        """
        if not fuse:
            return FloatGraph(
                model.onnx, {"applied": False, "reason": "fusion turned off (fuse=False)"}
            )
        from kiln.backends import ort_fusion as fusion

        fused = model.onnx.with_name(FUSED_GRAPH)
        record_path = fused.with_suffix(".json")
        key = json.loads(
            json.dumps(
                {  # as it reads back from the record (tuples as lists)
                    "source_sha256": _sha256(model.onnx),
                    "versions": fusion._versions(),
                    "settings": asdict(fusion.FusionSettings()),
                }
            )
        )
        if record_path.is_file():
            try:
                saved = json.loads(record_path.read_text())
            except (OSError, ValueError):
                saved = {}
            saved = saved if isinstance(saved, dict) else {}
            done = saved.get("record")
            if (
                saved.get("key") == key
                and isinstance(done, dict)
                and "applied" in done
                and (not done["applied"] or fused.is_file())
            ):
                return FloatGraph(fused if done["applied"] else model.onnx, done)
        try:
            record = fusion.optimize_graph(
                model.onnx, fused, spec=model.spec, check_inputs=check_inputs
            )
        except Exception as exc:  # never worse than the extracted graph
            record = {
                "applied": False,
                "method": fusion.METHOD,
                "reason": f"fusion failed: {' '.join(str(exc).split())[:300]}",
            }
        record = json.loads(json.dumps(record, default=str))  # the same whether read or made
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "record": record}))
        os.replace(tmp, record_path)
        return FloatGraph(fused if record["applied"] else model.onnx, record)

    def load(
        self,
        path: Path,
        *,
        spec: ModelSpec,
        device: str = "cpu",
        threads: int | None = None,
        idle_spin: bool = True,
    ) -> Runner:
        return load_onnx(
            path,
            spec=spec,
            device=device,
            threads=threads,
            idle_spin=idle_spin,
            meta={"backend": self.name},
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
