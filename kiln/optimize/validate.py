"""Validation: a variant's quality and speed against the fp32 eager baseline, and the gates.

Every variant (the baseline included) is judged on the same inputs, with the same padding and
the same thread settings: quality on the model's registered dataset (top-1 accuracy, negative
RMSE, or cosine similarity to the baseline's embeddings), latency percentiles after warm-up at
each batch size, throughput, memory and artifact size. ``select`` keeps the fastest variant that
passes; when none does, the baseline is served and the report says why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, Field

from kiln.backends.base import Runner
from kiln.gate import MAX_ACCURACY_DROP, metric_drop, within
from kiln.registry.tables import Task

# The gates a variant can fail: its quality against the baseline's (accuracy, RMSE or cosine),
# or its speedup over the baseline at the serving batch.
Gate = Literal["quality", "speed"]


class GateSettings(BaseModel):
    """The gates a variant must pass; per model in ``Model.settings["gates"]``."""

    max_accuracy_drop: float = Field(
        default=MAX_ACCURACY_DROP, ge=0.0, description="0.005 = half a point"
    )
    max_relative_error_increase: float = Field(default=0.01, ge=0.0, description="regression")
    min_mean_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)
    min_cosine: float = Field(default=0.97, ge=-1.0, le=1.0)
    min_speedup: float = Field(default=1.1, gt=0.0, description="vs baseline, serving batch")
    serving_batch: int = Field(default=8, ge=1)

    def allowed_drop(self, task: Task, baseline_metric: float) -> float:
        """How far a metric may fall below ``baseline_metric``, in the metric's own units
        (``kiln.gate.within`` compares): the one rule for the optimize gate, its accuracy-aware
        retry and re-optimization's comparison with production.

        Classification: ``max_accuracy_drop`` points of accuracy. Regression (metric: negative
        RMSE): ``max_relative_error_increase`` of the baseline's RMSE (at least 1e-12, so a
        perfect baseline still allows float noise). Embeddings (metric: mean cosine to the fp32
        baseline's embeddings, 1.0 for identical ones): the fall from 1.0 that
        ``min_mean_cosine`` allows, whatever the baseline scored.
        """
        if task is Task.regression:
            return self.max_relative_error_increase * max(abs(baseline_metric), 1e-12)
        if task is Task.embedding:
            return max(0.0, 1.0 - self.min_mean_cosine)
        return self.max_accuracy_drop

    def gated_metric(self, task: Task, quality: Quality) -> float:
        """The one number a drop is taken from: the metric, or for embeddings the tighter of
        the two cosine gates in mean-cosine units (the minimum cosine, shifted by the gap
        between ``min_mean_cosine`` and ``min_cosine``), so an embedding that fails either gate
        falls by more than ``allowed_drop``."""
        if task is Task.embedding:
            lowest = (quality.metric_min or 0.0) + self.min_mean_cosine - self.min_cosine
            return min(quality.metric, lowest)
        return quality.metric


class TimingSettings(BaseModel):
    """How latency is measured; the same for every variant of a run."""

    batches: tuple[int, ...] = (1, 8, 32)
    warmup: int = Field(default=5, ge=0)
    max_iterations: int = Field(default=200, ge=5)
    seconds_per_batch: float = Field(default=1.0, gt=0.0)
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class Quality(BaseModel):
    metric: float  # higher is better: accuracy, -RMSE, or mean cosine to the baseline
    metric_min: float | None = None  # minimum cosine (embeddings)
    agreement: float | None = None  # top-1 (or nearest-neighbour) agreement with the baseline


class Speed(BaseModel):
    latency_ms: dict[str, dict[str, float]]  # batch -> {"p50", "p95", "p99"}
    throughput: dict[str, float]  # batch -> samples per second


class VariantReport(BaseModel):
    """One row of the optimize report (``kiln optimize --json``'s VARIANT, plus extras)."""

    backend: str
    precision: str
    metric: float
    metric_min: float | None = None
    metric_drop: float = 0.0
    passed: bool = False
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    throughput: dict[str, float] = Field(default_factory=dict)
    size_bytes: int = 0
    agreement: float | None = None
    speedup: float | None = None
    reasons: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)
    # which gates ``judge`` failed it on, for decisions (the accuracy-aware retry); ``reasons``
    # says the same in words. In-process only: not part of the report's JSON.
    failed_gates: list[Gate] = Field(default_factory=list, exclude=True)


def trim_padding(batch: list[np.ndarray], mask_index: int | None) -> list[np.ndarray]:
    """Drop the trailing columns that are padding in every row of ``batch``.

    Text inputs are padded to the longest row of the whole dataset; a batch only needs its own
    longest row, so every variant (and the baseline) runs on the same, unwasted padding.
    """
    if mask_index is None:
        return batch
    mask = batch[mask_index]
    used = np.flatnonzero(mask.any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    return [x[:, :length] if x.ndim == 2 and x.shape == mask.shape else x for x in batch]


def batches_of(
    inputs: Sequence[np.ndarray], size: int, mask_index: int | None = None
) -> list[list[np.ndarray]]:
    """Split aligned input arrays into batches of ``size`` rows (the last may be smaller)."""
    rows = len(inputs[0])
    return [
        trim_padding([x[i : i + size] for x in inputs], mask_index) for i in range(0, rows, size)
    ]


def run_all(
    runner: Runner, inputs: Sequence[np.ndarray], batch: int = 32, mask_index: int | None = None
) -> list[np.ndarray]:
    """The runner's outputs over every row, concatenated per output."""
    parts = [runner(b) for b in batches_of(inputs, batch, mask_index)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def quality(
    task: Task, outputs: np.ndarray, baseline: np.ndarray, labels: np.ndarray | None
) -> Quality:
    """Quality of ``outputs`` (the first output, all rows) for ``task``."""
    outputs = outputs.astype(np.float64)
    baseline = baseline.astype(np.float64)
    if task is Task.embedding:
        cos = _cosine(outputs, baseline)
        return Quality(
            metric=float(cos.mean()),
            metric_min=float(cos.min()),
            agreement=_neighbour_agreement(outputs, baseline),
        )
    if task is Task.regression:
        target = (
            labels.astype(np.float64).reshape(outputs.shape) if labels is not None else baseline
        )
        rmse = float(np.sqrt(np.mean((outputs - target) ** 2)))
        return Quality(metric=-rmse)
    agreement = float(np.mean(outputs.argmax(-1) == baseline.argmax(-1)))
    if labels is None:  # judged by agreement with the baseline
        return Quality(metric=agreement, agreement=agreement)
    return Quality(metric=float(np.mean(outputs.argmax(-1) == labels)), agreement=agreement)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return cast(np.ndarray, np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))


def _neighbour_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under both embeddings."""
    if len(a) < 3:
        return 1.0

    def nearest(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return cast(np.ndarray, sim.argmax(axis=1))

    return float(np.mean(nearest(a) == nearest(b)))


def timing(
    runner: Runner,
    inputs: Sequence[np.ndarray],
    settings: TimingSettings,
    mask_index: int | None = None,
) -> Speed:
    """Latency percentiles and throughput at each batch size, after warm-up."""
    latency: dict[str, dict[str, float]] = {}
    throughput: dict[str, float] = {}
    for batch in settings.batches:
        feed = trim_padding([_rows(x, batch) for x in inputs], mask_index)
        for _ in range(settings.warmup):
            runner(feed)
        samples: list[float] = []
        deadline = time.perf_counter() + settings.seconds_per_batch
        while len(samples) < settings.max_iterations and (
            len(samples) < 5 or time.perf_counter() < deadline
        ):
            start = time.perf_counter()
            runner(feed)
            samples.append((time.perf_counter() - start) * 1000.0)
        ms = np.asarray(samples)
        latency[str(batch)] = {
            p: round(float(np.percentile(ms, q)), 4)
            for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
        }
        throughput[str(batch)] = round(batch * 1000.0 / float(ms.mean()), 2)
    return Speed(latency_ms=latency, throughput=throughput)


def _rows(x: np.ndarray, n: int) -> np.ndarray:
    """Exactly ``n`` rows from the middle of ``x`` (repeated when ``x`` has fewer).

    Text inputs are sorted by length, so the middle rows are sentences of median length, not
    the shortest ones.
    """
    reps = -(-n // len(x))
    if reps > 1:
        return np.concatenate([x] * reps)[:n]
    start = (len(x) - n) // 2
    return x[start : start + n]


def judge(
    task: Task,
    variant: VariantReport,
    baseline: VariantReport,
    gates: GateSettings,
) -> VariantReport:
    """Fill ``metric_drop``, ``speedup``, ``passed``, the gates a variant failed and why.

    Embeddings are held to their two cosine gates directly; classification and regression to
    ``GateSettings.allowed_drop`` through ``kiln.gate.within``.
    """
    variant.metric_drop = metric_drop(baseline.metric, variant.metric)
    quality_reasons = []
    if task is Task.embedding:
        if variant.metric < gates.min_mean_cosine:
            quality_reasons.append(f"mean cosine {variant.metric:.4f} < {gates.min_mean_cosine}")
        if (variant.metric_min or 0.0) < gates.min_cosine:
            quality_reasons.append(f"minimum cosine {variant.metric_min:.4f} < {gates.min_cosine}")
    elif not within(variant.metric_drop, allowed := gates.allowed_drop(task, baseline.metric)):
        quality_reasons.append(
            f"RMSE up {variant.metric_drop:.4g} (allowed {allowed:.4g})"
            if task is Task.regression
            else f"accuracy drop {variant.metric_drop * 100:.2f} points > {allowed * 100:.2f}"
        )
    speed_reasons = []
    key = str(gates.serving_batch)
    if key in variant.latency_ms and key in baseline.latency_ms:
        variant.speedup = round(
            baseline.latency_ms[key]["p50"] / max(variant.latency_ms[key]["p50"], 1e-9), 3
        )
        if variant.speedup < gates.min_speedup:
            speed_reasons.append(f"{variant.speedup:.2f}x at batch {key} < {gates.min_speedup}x")
    failed: list[Gate] = []
    if quality_reasons:
        failed.append("quality")
    if speed_reasons:
        failed.append("speed")
    variant.failed_gates = failed
    variant.reasons = quality_reasons + speed_reasons
    variant.passed = not failed
    return variant


@dataclass(frozen=True)
class Selection:
    """What ``select`` chose to serve, and why (the report's ``reason``)."""

    variant: VariantReport
    reason: str


def select(
    baseline: VariantReport, variants: Sequence[VariantReport], gates: GateSettings
) -> Selection:
    """The fastest passing variant at the serving batch, or the baseline with the reason."""
    passing = [v for v in variants if v.passed]
    key = str(gates.serving_batch)
    if passing:
        best = min(passing, key=lambda v: v.latency_ms[key]["p50"])
        return Selection(
            best, f"{best.backend}/{best.precision}: {best.speedup}x faster, within the gates"
        )
    if not variants:
        return Selection(
            baseline, "no variant could be built on this host: serving the fp32 baseline"
        )
    why = "; ".join(f"{v.backend}/{v.precision}: {', '.join(v.reasons)}" for v in variants)
    return Selection(baseline, f"no variant passed the gates, serving the fp32 baseline ({why})")


@dataclass(frozen=True)
class Evaluation:
    """One loaded variant judged on the evaluation inputs: its quality, its speed (None when
    not timed) and its first output over every row (the baseline's becomes the reference)."""

    quality: Quality
    speed: Speed | None
    outputs: np.ndarray


def evaluate(
    task: Task,
    runner: Runner,
    inputs: Sequence[np.ndarray],
    *,
    baseline_outputs: np.ndarray | None,
    labels: np.ndarray | None,
    timing_settings: TimingSettings,
    mask_index: int | None = None,
    time_it: bool = True,
) -> Evaluation:
    """Quality (and, with ``time_it``, speed) of one loaded variant on ``inputs``."""
    outputs = run_all(runner, inputs, mask_index=mask_index)[0]
    reference = outputs if baseline_outputs is None else baseline_outputs
    q = quality(task, outputs, reference, labels)
    speed = timing(runner, inputs, timing_settings, mask_index) if time_it else None
    return Evaluation(quality=q, speed=speed, outputs=outputs)
