"""Int8 quantization of ONNX models with ONNX Runtime, and the accuracy-aware retry loop.

Plain functions over model files (no Prefect here; ``tasks/`` wraps them):

- ``quantize_dynamic``: int8 weights, activations quantized at run time (no calibration data).
- ``quantize_static``: int8 weights and activations in QDQ format, activation ranges calibrated
  on the model's dataset.
- ``node_sensitivity``: how much each quantized node, on its own, disturbs the model's output.
- ``accuracy_aware_quantize``: static quantization that, when the result misses the accuracy
  gate, keeps the most sensitive nodes in float and tries again, within a budget.

Each quantizer first runs ONNX Runtime's pre-processing (symbolic shape inference and graph
optimization, ``quant_pre_process``, in a child process: see ``_preprocess``) where it succeeds,
and returns a JSON-ready record: the
quantized nodes by op type, the quantization ops in the written graph, the nodes kept in float,
the settings and the seconds taken. The settings are also stored in the written model's
``metadata_props`` (key ``kiln.quantization``), which is how ``node_sensitivity`` reproduces them.

Activation and weight types follow ONNX Runtime's guidance for CPU inference (``quantize_static``
docstring, ORT 1.32): QDQ format; on x86-64 activations ``QUInt8`` with weights ``QInt8`` (U8S8),
and ``reduce_range`` (7-bit weights) only on CPUs without VNNI, whose 16-bit accumulation can
saturate; on ARM symmetric ``QInt8`` for both. The choice is made for the host that quantizes,
which in Kiln is the host that serves, and is recorded with its reason.

onnx and onnxruntime are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from kiln.errors import InvalidInput
from kiln.gate import within

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

NO_CALIBRATION = (
    "static quantization needs calibration data: register a dataset with the model "
    "(kiln upload --dataset) or use dynamic quantization"
)
METADATA_KEY = "kiln.quantization"
CALIBRATION_BATCH = 16
CALIBRATION_SAMPLES = 256  # calibration rows static int8 uses, at most
SENSITIVITY_SAMPLES = 64  # calibration rows each node's sensitivity is measured on
# quantize-and-evaluate attempts of the accuracy-aware retry (the optimize pipeline's
# OptimizeSettings.accuracy_aware_budget by default)
ACCURACY_AWARE_BUDGET = 4
PREPROCESS_TIMEOUT_S = 1800
ALL_QDQ_OPS = "all ORT QDQ op types"
CalibrateMethod = Literal["MinMax", "Entropy", "Percentile", "Distribution"]
ActivationType = Literal["auto", "QUInt8", "QInt8"]

# Ops that only move or select quantized values: they consume DequantizeLinear outputs in a QDQ
# graph but add no rounding of their own, so they are not candidates for staying in float.
_DATA_MOVEMENT = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Slice",
        "Split",
        "Concat",
        "Pad",
        "MaxPool",
        "Resize",
        "Identity",
        "Expand",
        "Tile",
        "TopK",
        "GatherElements",
        "Where",
    }
)
_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QAttention",
    }
)


# --------------------------------------------------------------------------------------------
# Public API


def quantize_dynamic(
    model_in: Path,
    model_out: Path,
    *,
    calibration: list[np.ndarray] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Int8 weights, activations quantized per batch at run time (ORT ``quantize_dynamic``).

    Args:
        model_in: float ONNX model.
        model_out: where the quantized model is written.
        calibration: optional sample inputs (one array per model input); not needed for the
            quantization itself, the written model is run once on a few rows as a smoke check.
        nodes_to_exclude: node names (of the pre-processed float graph) kept in float.
        op_types: op types to quantize. ``None``: ``MatMul`` and ``Gemm`` only when the model
            has a ``Conv`` (ORT's dynamic ``ConvInteger`` is slower than float convolution on
            CPU; use static QDQ for CNNs), otherwise every op type ORT quantizes dynamically.
        per_channel: per-output-channel weight scales (more accurate on transformer MatMuls).

    Returns:
        The record described in the module docstring.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    started = time.perf_counter()
    preset = cpu_preset()
    model_out = Path(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    with _workdir(model_out) as work:
        prepared, preprocess = _preprocess(Path(model_in), work)
        graph = _load(prepared, weights=False)
        ops = {n.op_type for n in graph.graph.node}
        chosen = (
            list(op_types)
            if op_types is not None
            else (["MatMul", "Gemm"] if "Conv" in ops else None)
        )
        names = {n.name: n.op_type for n in graph.graph.node}
        excluded = list(dict.fromkeys(nodes_to_exclude))
        # Dynamic mode rewrites Gemm as MatMul(+Add) named "<gemm>_MatMul" before quantizing.
        ort_exclude = excluded + [f"{n}_MatMul" for n in excluded if names.get(n) == "Gemm"]
        settings = {
            "mode": "int8-dynamic",
            "weight_type": "QInt8",
            "activation_type": "QUInt8",  # ORT's dynamic activation quantization is uint8 only
            "per_channel": per_channel,
            "reduce_range": preset.reduce_range,
            "preset": preset.reason,
            "op_types": chosen if chosen is not None else "all ORT dynamic op types",
        }
        log.info("quantize_dynamic %s: %s", Path(model_in).name, settings)
        ort_quantize_dynamic(
            str(prepared),
            str(model_out),
            op_types_to_quantize=chosen,
            per_channel=per_channel,
            reduce_range=preset.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=ort_exclude or None,
        )
    _write_metadata(model_out, {**settings, "nodes_excluded": excluded})
    record = _record(model_out, names, settings, excluded, preprocess, dynamic=True)
    if calibration:
        _smoke_run(model_out, calibration)
        record["smoke_check"] = "ok"
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def quantize_static(
    model_in: Path,
    model_out: Path,
    *,
    calibration: list[np.ndarray] | None,
    nodes_to_exclude: Sequence[str] = (),
    per_channel: bool = True,
    calibrate_method: CalibrateMethod = "MinMax",
    max_calibration_samples: int = CALIBRATION_SAMPLES,
    activation_type: ActivationType = "auto",
    reduce_range: bool | None = None,
    op_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Int8 weights and activations in QDQ format, calibrated (ORT ``quantize_static``).

    Args:
        model_in: float ONNX model.
        model_out: where the quantized model is written.
        calibration: one array per model input (in the model's input order), first dimension =
            samples. At most ``max_calibration_samples`` evenly spaced rows are used, in batches
            of 16.
        nodes_to_exclude: node names (of the pre-processed float graph) kept in float.
        per_channel: per-output-channel weight scales.
        calibrate_method: ORT calibration method for activation ranges.
        activation_type: ``auto`` follows ORT's CPU guidance for this host (see module
            docstring); ``QInt8`` suits GPU/TensorRT consumers.
        reduce_range: 7-bit weights; ``None`` decides by the host (x86 without VNNI).
        op_types: op types to quantize. ``None``: every op type ORT quantizes in QDQ when the
            model has a ``Conv`` (Relu, MaxPool and Reshape then stay int8 between convolutions),
            otherwise ``MatMul`` and ``Gemm`` only: on MiniLM, QDQ on every op type (Softmax,
            LayerNormalization, Gelu, Add...) left a mean cosine of 0.36 to the float
            embeddings, against 0.94 with MatMul/Gemm only.

    Raises:
        InvalidInput: calibration data missing, malformed or non-finite.
    """
    if not calibration:
        raise InvalidInput(NO_CALIBRATION)
    settings = _static_settings(per_channel, calibrate_method, activation_type, reduce_range)
    started = time.perf_counter()
    data = _calibration_arrays(Path(model_in), calibration, max_calibration_samples)
    model_out = Path(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    with _workdir(model_out) as work:
        prepared, preprocess = _preprocess(Path(model_in), work)
        settings["calibration_samples"] = _rows(data)
        settings["op_types"] = _static_op_types(prepared, op_types)
        log.info("quantize_static %s: %s", Path(model_in).name, settings)
        record = _static(
            prepared, model_out, data, settings, nodes_to_exclude, cache=None, preprocess=preprocess
        )
    _smoke_run(model_out, data)
    record["smoke_check"] = "ok"
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def node_sensitivity(
    float_model: Path,
    quantized_model: Path,
    calibration: list[np.ndarray],
    *,
    samples: int = SENSITIVITY_SAMPLES,
) -> list[tuple[str, float]]:
    """Rank the quantized nodes of a QDQ model by the output error each causes, worst first.

    Method (isolation): for each quantized compute node of ``quantized_model`` (a node that
    consumes ``DequantizeLinear`` outputs and does arithmetic: not Reshape, MaxPool...), the float
    model is quantized again with only that node quantized (``nodes_to_quantize=[node]``, the
    same settings, read from the model's ``kiln.quantization`` metadata, and the same calibrated
    ranges, computed once and cached), run on the first ``samples`` calibration rows, and
    compared with the float model: the score is the relative L2 error
    ``||y_q - y_f|| / ||y_f||`` over all outputs. One quantization and one inference per node.

    Why not ORT's ``qdq_loss_debug``: it reports the signal-to-quantization-noise ratio per
    activation tensor, not per node, and a tensor between two quantized nodes stays quantized
    while either of them is quantized, so tensor errors do not say which node to keep in float.
    Leave-one-out (all nodes but one quantized) fails for the same reason: with an outlier
    activation between two convolutions, excluding either alone changes nothing.

    Raises:
        InvalidInput: not a QDQ model, or calibration data missing or malformed.
    """
    if not calibration:
        raise InvalidInput(NO_CALIBRATION)
    quantized = _load(Path(quantized_model), weights=False)
    if not any(n.op_type == "DequantizeLinear" for n in quantized.graph.node):
        raise InvalidInput(
            f"{Path(quantized_model).name} has no DequantizeLinear nodes: node "
            "sensitivity needs a static (QDQ) quantized model"
        )
    stored = _read_metadata(quantized)
    settings = _static_settings(
        bool(stored.get("per_channel", True)),
        stored.get("calibrate_method", "MinMax"),
        stored.get("activation_type", "auto"),
        stored.get("reduce_range"),
    )
    with tempfile.TemporaryDirectory(prefix="kiln-sensitivity-") as tmp:
        data = _calibration_arrays(
            Path(float_model),
            calibration,
            int(stored.get("calibration_samples") or CALIBRATION_SAMPLES),
        )
        work = Path(tmp)
        prepared, _ = _preprocess(Path(float_model), work)
        settings["op_types"] = stored.get("op_types") or _static_op_types(prepared, None)
        candidates = _sensitivity_candidates(quantized, settings["op_types"])
        return _rank(prepared, candidates, data, settings, work, samples=samples)


class AccuracyAwareAttempt(BaseModel):
    """One quantize-and-evaluate try: the nodes kept in float, the metric and its drop."""

    excluded: list[str]
    metric: float
    drop: float
    passed: bool
    seconds: float


class AccuracyAwareResult(BaseModel):
    """The outcome of ``accuracy_aware_quantize``: the variant written to ``model_out``."""

    passed: bool
    metric: float  # evaluate(model_out)
    metric_drop: float  # baseline_metric - metric
    baseline_metric: float
    max_drop: float
    nodes_excluded: list[str]  # the nodes that stayed in float in the written model
    attempts: list[AccuracyAwareAttempt]
    sensitivity: list[tuple[str, float]] = []  # the ranking used (empty if the first try passed)
    quantization: dict[str, Any] = {}  # quantize_static's record of the written model

    def summary(self) -> str:
        """One line for reports: what passed, and which nodes stayed in float."""
        verdict = "passed" if self.passed else "missed"
        kept = ", ".join(self.nodes_excluded) or "none"
        return (
            f"int8 static {verdict} the gate after {len(self.attempts)} attempt(s): metric "
            f"{self.metric:.4f} (drop {self.metric_drop:.4f}, allowed {self.max_drop:.4f}); "
            f"nodes kept in float: {kept}"
        )


def accuracy_aware_quantize(
    model_in: Path,
    model_out: Path,
    *,
    calibration: list[np.ndarray] | None,
    evaluate: Callable[[Path], float],
    baseline_metric: float,
    max_drop: float,
    budget: int = ACCURACY_AWARE_BUDGET,
    step: int | None = None,
    per_channel: bool = True,
    calibrate_method: CalibrateMethod = "MinMax",
    max_calibration_samples: int = CALIBRATION_SAMPLES,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
    op_types: Sequence[str] | None = None,
) -> AccuracyAwareResult:
    """Static int8 that keeps the most error-sensitive nodes in float until the gate passes.

    Attempt 1 quantizes every node. If its drop, ``baseline_metric - metric``, is not within
    ``max_drop`` (``kiln.gate.within``: the optimize gate's own comparison), the quantized nodes
    are ranked once by ``node_sensitivity``'s method and each further attempt keeps a growing
    prefix of that ranking in float, ``step`` more nodes per attempt (default
    ``max(1, n // 8)`` for ``n`` ranked nodes). ``budget`` counts every quantize-and-evaluate
    attempt, the first included; the ranking itself is not counted. The loop stops at the first
    passing attempt (more float nodes only cost speed). The written model is the best passing
    attempt (highest metric, then fewest float nodes), else the best attempt with
    ``passed=False``.

    Args:
        evaluate: maps a model file to a metric, higher is better (e.g. top-1 accuracy on the
            held-out split); ``baseline_metric`` and ``max_drop`` are in its units.
    """
    if not calibration:
        raise InvalidInput(NO_CALIBRATION)
    if budget < 1:
        raise InvalidInput(f"budget must be at least 1 attempt, got {budget}")
    if step is not None and step < 1:
        raise InvalidInput(f"step must be at least 1 node per attempt, got {step}")
    data = _calibration_arrays(Path(model_in), calibration, max_calibration_samples)
    model_out = Path(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    with _workdir(model_out) as work:
        prepared, preprocess = _preprocess(Path(model_in), work)
        settings = _static_settings(per_channel, calibrate_method, "auto", None)
        settings["calibration_samples"] = _rows(data)
        settings["op_types"] = _static_op_types(prepared, op_types)
        cache = work / "calibration.json"
        log.info(
            "accuracy_aware_quantize %s: %s; gate drop <= %s, budget %d",
            Path(model_in).name,
            settings,
            max_drop,
            budget,
        )

        tries: list[_Try] = []

        def attempt(excluded: list[str]) -> _Try:
            began = time.perf_counter()
            path = work / f"attempt-{len(tries)}.onnx"
            record = _static(
                prepared, path, data, settings, excluded, cache=cache, preprocess=preprocess
            )
            metric = float(evaluate(path))
            drop = baseline_metric - metric
            done = _Try(
                path,
                record,
                AccuracyAwareAttempt(
                    excluded=list(excluded),
                    metric=metric,
                    drop=drop,
                    passed=within(drop, max_drop),
                    seconds=round(time.perf_counter() - began, 3),
                ),
            )
            log.info(
                "attempt %d: %d node(s) in float, metric %.4f, drop %.4f",
                len(tries) + 1,
                len(excluded),
                metric,
                drop,
            )
            tries.append(done)
            return done

        ranking: list[tuple[str, float]] = []
        first = attempt([])
        if not first.info.passed and budget > 1:
            quantized = _load(first.path, weights=False)
            candidates = _sensitivity_candidates(quantized, settings["op_types"])
            ranking = _rank(prepared, candidates, data, settings, work, samples=sensitivity_samples)
            per_try = step or max(1, len(ranking) // 8)
            count = 0
            while len(tries) < budget and count < len(ranking):
                count = min(count + per_try, len(ranking))
                if attempt([name for name, _ in ranking[:count]]).info.passed:
                    break

        passing = [t for t in tries if t.info.passed]
        best = max(passing or tries, key=lambda t: (t.info.metric, -len(t.info.excluded)))
        os.replace(best.path, model_out)
    return AccuracyAwareResult(
        passed=best.info.passed,
        metric=best.info.metric,
        metric_drop=best.info.drop,
        baseline_metric=baseline_metric,
        max_drop=max_drop,
        nodes_excluded=best.info.excluded,
        attempts=[t.info for t in tries],
        sensitivity=ranking,
        quantization={**best.record, "model": str(model_out)},
    )


@dataclass(frozen=True)
class CpuPreset:
    """Activation type and weight range for this host, per ORT's CPU guidance, and why."""

    activation_type: str
    reduce_range: bool
    reason: str


def cpu_preset() -> CpuPreset:
    """ORT's recommended int8 settings for the CPU this runs on (see the module docstring)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return CpuPreset("QInt8", False, f"{machine}: symmetric S8S8")
    flags = _cpu_flags()
    if flags is None:
        return CpuPreset("QUInt8", False, f"{machine}: U8S8 (CPU flags unknown)")
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return CpuPreset("QUInt8", False, f"{machine} with VNNI: U8S8, full-range weights")
    return CpuPreset(
        "QUInt8",
        True,
        f"{machine} without VNNI: U8S8, 7-bit weights (reduce_range) against int16 saturation",
    )


# --------------------------------------------------------------------------------------------
# Internals


@dataclass
class _Try:
    path: Path
    record: dict[str, Any]
    info: AccuracyAwareAttempt


@dataclass
class _Calibration:
    """Calibration rows by input name, and a fresh ORT reader over them per quantization."""

    arrays: dict[str, np.ndarray]
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = _rows(self)
        self.batches = [
            {k: v[i : i + CALIBRATION_BATCH] for k, v in self.arrays.items()}
            for i in range(0, rows, CALIBRATION_BATCH)
        ]

    def reader(self) -> Any:
        from onnxruntime.quantization import CalibrationDataReader

        batches = self.batches

        class _Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._it = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        return _Reader()

    def head(self, rows: int) -> dict[str, np.ndarray]:
        return {k: v[:rows] for k, v in self.arrays.items()}


def _rows(data: _Calibration) -> int:
    return int(next(iter(data.arrays.values())).shape[0])


def _static_settings(
    per_channel: bool, calibrate_method: str, activation_type: str, reduce_range: bool | None
) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod

    if calibrate_method not in CalibrationMethod.__members__:
        raise InvalidInput(
            f"calibrate_method {calibrate_method!r} is not one of "
            f"{', '.join(CalibrationMethod.__members__)}"
        )
    if activation_type not in ("auto", "QUInt8", "QInt8"):
        raise InvalidInput(f"activation_type {activation_type!r}: use auto, QUInt8 or QInt8")
    preset = cpu_preset()
    return {
        "mode": "int8-static",
        "format": "QDQ",
        "weight_type": "QInt8",
        "activation_type": preset.activation_type if activation_type == "auto" else activation_type,
        "per_channel": per_channel,
        "reduce_range": preset.reduce_range if reduce_range is None else reduce_range,
        "preset": preset.reason,
        "calibrate_method": calibrate_method,
        "calibration_batch": CALIBRATION_BATCH,
    }


def _static_op_types(prepared: Path, op_types: Sequence[str] | None) -> list[str] | str:
    """The op types given, else the default of ``quantize_static``'s docstring."""
    if op_types is not None:
        return list(op_types)
    if any(n.op_type == "Conv" for n in _load(prepared, weights=False).graph.node):
        return ALL_QDQ_OPS
    return ["MatMul", "Gemm"]


def _static(
    prepared: Path,
    model_out: Path,
    data: _Calibration,
    settings: dict[str, Any],
    nodes_to_exclude: Sequence[str],
    *,
    cache: Path | None,
    preprocess: str,
    nodes_to_quantize: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One ORT static quantization of an already pre-processed model; ``cache`` keeps ranges."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    started = time.perf_counter()
    names = {n.name: n.op_type for n in _load(prepared, weights=False).graph.node}
    excluded = list(dict.fromkeys(nodes_to_exclude))
    reader = None if cache is not None and cache.is_file() else data.reader()
    ort_quantize_static(
        str(prepared),
        str(model_out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=None
        if settings["op_types"] == ALL_QDQ_OPS
        else list(settings["op_types"]),
        per_channel=settings["per_channel"],
        reduce_range=settings["reduce_range"],
        activation_type=QuantType[settings["activation_type"]],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded or None,
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        calibrate_method=CalibrationMethod[settings["calibrate_method"]],
        calibration_cache_path=str(cache) if cache is not None else None,
    )
    if nodes_to_quantize is None:  # sensitivity probes are scratch files: no provenance needed
        _write_metadata(model_out, {**settings, "nodes_excluded": excluded})
    record = _record(model_out, names, settings, excluded, preprocess, dynamic=False)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _rank(
    prepared: Path,
    candidates: list[str],
    data: _Calibration,
    settings: dict[str, Any],
    work: Path,
    *,
    samples: int,
) -> list[tuple[str, float]]:
    """``node_sensitivity``'s isolation method over a pre-processed float model."""
    feeds = data.head(max(1, samples))
    reference = _run(prepared, feeds)
    cache = work / "calibration.json"  # shared with the caller's attempts when it made one
    scores: list[tuple[str, float]] = []
    for index, name in enumerate(candidates):
        probe = work / f"sensitivity-{index}.onnx"
        _static(
            prepared,
            probe,
            data,
            settings,
            (),
            cache=cache,
            preprocess="",
            nodes_to_quantize=[name],
        )
        scores.append((name, _relative_error(reference, _run(probe, feeds))))
        probe.unlink()
    scores.sort(key=lambda item: item[1], reverse=True)
    log.info(
        "node sensitivity (relative output error, only that node quantized): %s",
        ", ".join(f"{n}={s:.4f}" for n, s in scores),
    )
    return scores


def _sensitivity_candidates(quantized: onnx.ModelProto, op_types: list[str] | str) -> list[str]:
    """Quantized compute nodes of a QDQ graph, in graph order."""
    _, nodes = _quantized_nodes_static(quantized, op_types)
    return [n.name for n in nodes if n.name and n.op_type not in _DATA_MOVEMENT]


def _quantized_nodes_static(
    model: onnx.ModelProto, op_types: list[str] | str
) -> tuple[Counter[str], list[Any]]:
    """Nodes of a QDQ graph that read DequantizeLinear outputs and whose op type was asked for
    (ORT routes every consumer of a quantized tensor through its DequantizeLinear, so a float
    Add beside a quantized MatMul reads one too)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = [
        n
        for n in model.graph.node
        if n.op_type not in _QUANT_OPS
        and (op_types == ALL_QDQ_OPS or n.op_type in op_types)
        and any(i in dq_outputs for i in n.input)
    ]
    return Counter(n.op_type for n in nodes), nodes


def _quantized_nodes_dynamic(
    model: onnx.ModelProto, original: dict[str, str]
) -> tuple[Counter[str], list[str]]:
    """Integer ops of a dynamic graph (``QAttention`` for a fused ``Attention``), traced back
    to the float nodes they replaced."""
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "ConvInteger", "QAttention") or not node.name:
            continue
        base = node.name.removesuffix("_quant")
        if base not in original and base.removesuffix("_MatMul") in original:
            base = base.removesuffix("_MatMul")  # a Gemm ORT rewrote as MatMul(+Add)
        names.append(base)
    return Counter(original.get(n, "MatMul") for n in names), names


def _record(
    model_out: Path,
    original: dict[str, str],
    settings: dict[str, Any],
    excluded: list[str],
    preprocess: str,
    *,
    dynamic: bool,
) -> dict[str, Any]:
    model = _load(model_out, weights=False)
    if dynamic:
        by_type, names = _quantized_nodes_dynamic(model, original)
    else:
        by_type, nodes = _quantized_nodes_static(model, settings["op_types"])
        names = [n.name for n in nodes]
    return {
        "mode": settings["mode"],
        "model": str(model_out),
        "quantized_nodes": dict(sorted(by_type.items())),
        "quantized_node_names": names,
        "quantization_ops": dict(
            sorted(Counter(n.op_type for n in model.graph.node if n.op_type in _QUANT_OPS).items())
        ),
        "nodes_excluded": excluded,
        "nodes_not_found": [n for n in excluded if n not in original],
        "preprocess": preprocess,
        "settings": settings,
        "size_bytes": model_out.stat().st_size,
    }


def _preprocess(model_in: Path, work: Path) -> tuple[Path, str]:
    """ORT's quantization pre-processing into ``work``; the input itself where it fails.

    It runs in a child process whose working directory is a scratch folder: when symbolic shape
    inference gives up, ORT saves its partial model (with every weight) into the current
    directory, and a child is the only thread-safe way to choose that directory.
    """
    _require_model(model_in)
    out = work / "prepared.onnx"
    scratch = work / "preprocess-cwd"
    scratch.mkdir()
    # A model with its weights in a side file keeps them there: ORT's optimizer otherwise
    # writes a graph pointing at the side file's old name.
    options = (
        {
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_location": "prepared.onnx.data",
        }
        if _has_external_data(model_in)
        else {}
    )
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _PREPROCESS_CHILD,
                str(model_in.resolve()),
                str(out.resolve()),
                json.dumps(options),
            ],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=PREPROCESS_TIMEOUT_S,
            check=False,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"status"')]
        if lines:
            outcome = json.loads(lines[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            outcome = {"status": "skipped", "reason": tail[:300]}
    except subprocess.TimeoutExpired:
        outcome = {"status": "skipped", "reason": f"took over {PREPROCESS_TIMEOUT_S}s"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if outcome["status"] != "skipped" and out.is_file():
        return out, str(outcome["status"])
    reason = str(outcome.get("reason") or "no output written")
    log.warning("quantization pre-processing skipped for %s: %s", model_in.name, reason)
    return model_in, f"skipped: {reason}"


# Symbolic shape inference gives up on some exported transformers (dynamic sequence dims
# through Min/Expand); ONNX shape inference and ORT's optimizer then still apply.
_PREPROCESS_CHILD = """
import json, sys
from onnxruntime.quantization.shape_inference import quant_pre_process

def one_line(exc):
    return " ".join(str(exc).split())[:300] or type(exc).__name__

src, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    quant_pre_process(src, out, **options)
    outcome = {"status": "applied"}
except Exception as exc:
    first = one_line(exc)
    try:
        quant_pre_process(src, out, skip_symbolic_shape=True, **options)
        outcome = {"status": f"applied without symbolic shape inference ({first})"}
    except Exception as exc2:
        outcome = {"status": "skipped",
                   "reason": f"{first}; without symbolic shape inference: {one_line(exc2)}"}
print(json.dumps(outcome))
"""


def _require_model(path: Path) -> None:
    if not path.is_file():
        raise InvalidInput(f"model file {path.name} does not exist: export the model to ONNX first")


def _has_external_data(model_path: Path) -> bool:
    from onnx import TensorProto

    return any(
        t.data_location == TensorProto.EXTERNAL
        for t in _load(model_path, weights=False).graph.initializer
    )


def _calibration_arrays(
    model_path: Path, calibration: list[np.ndarray] | None, max_samples: int
) -> _Calibration:
    """Calibration arrays checked against the model's inputs, cast, and evenly subsampled."""
    if calibration is None or len(calibration) == 0:
        raise InvalidInput(NO_CALIBRATION)
    from onnx import helper

    _require_model(model_path)
    model = _load(model_path, weights=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(calibration) != len(inputs):
        raise InvalidInput(
            f"calibration data has {len(calibration)} array(s) but the model takes "
            f"{len(inputs)} input(s) ({', '.join(i.name for i in inputs)}): give "
            "one array per input, in that order"
        )
    rows = {np.asarray(a).shape[0] if np.asarray(a).ndim else 0 for a in calibration}
    if len(rows) != 1 or 0 in rows:
        raise InvalidInput(
            f"calibration arrays must share a non-zero first dimension (samples); "
            f"got {sorted(rows)}"
        )
    total = rows.pop()
    pick = np.unique(
        np.linspace(0, total - 1, num=min(total, max(1, max_samples))).round().astype(int)
    )
    arrays: dict[str, np.ndarray] = {}
    for spec, raw in zip(inputs, calibration, strict=True):
        array = np.asarray(raw)[pick]
        dtype = helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
        if array.dtype.kind == "f":
            bad = int((~np.isfinite(array)).sum())
            if bad:
                raise InvalidInput(
                    f"calibration data for input {spec.name!r} has {bad} NaN or "
                    "infinite value(s): fix or drop those rows"
                )
        elif array.dtype.kind not in "iub":
            raise InvalidInput(
                f"calibration data for input {spec.name!r} is {array.dtype}, not "
                "numeric: give the model-ready tensor"
            )
        arrays[spec.name] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return _Calibration(arrays)


def _run(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def _relative_error(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    ref = np.concatenate([r.astype(np.float64).ravel() for r in reference])
    got = np.concatenate([o.astype(np.float64).ravel() for o in other])
    return float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def _smoke_run(model: Path, calibration: list[np.ndarray] | _Calibration) -> None:
    """Run the written model once on a few rows: a kernel ORT lacks fails here, not in serving."""
    data = (
        calibration
        if isinstance(calibration, _Calibration)
        else _calibration_arrays(model, calibration, 8)
    )
    _run(model, data.head(8))


def _load(path: Path, *, weights: bool) -> onnx.ModelProto:
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def _write_metadata(model_path: Path, settings: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(settings, sort_keys=True))
    onnx.save(model, str(model_path))


def _read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            value = json.loads(prop.value)
            return value if isinstance(value, dict) else {}
    return {}


@contextmanager
def _workdir(model_out: Path) -> Iterator[Path]:
    """A scratch folder beside the output (same filesystem, so the final move is a rename)."""
    path = Path(tempfile.mkdtemp(prefix=f".{model_out.stem}-", dir=model_out.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None
