"""The quality gate's one rule: the allowed drop per task (``GateSettings.allowed_drop``), the
one comparison (``kiln.gate.within``) every gate makes with it, and the accuracy-aware retry
deciding on ``judge``'s structured verdict rather than on its words."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest

from kiln.gate import MAX_ACCURACY_DROP, metric_drop, within
from kiln.optimize.pipeline import wants_accuracy_aware
from kiln.optimize.reoptimize import compare
from kiln.optimize.validate import GateSettings, Quality, VariantReport, judge
from kiln.registry.tables import Task
from kiln.rollout.canary import RolloutSettings

GATES = GateSettings()


def report(metric: float, p50_b8: float = 1.0, metric_min: float | None = None) -> VariantReport:
    return VariantReport(
        backend="onnxruntime",
        precision="int8-static",
        metric=metric,
        metric_min=metric_min,
        latency_ms={"8": {"p50": p50_b8}},
    )


BASE_LATENCY = 2.0  # the baseline's p50 at the serving batch: variants at 1.0 ms are 2x faster


def judged(
    task: Task, base: float, metric: float, *, metric_min: float | None = None, p50_b8: float = 1.0
) -> VariantReport:
    baseline = report(base, p50_b8=BASE_LATENCY, metric_min=1.0)
    return judge(task, report(metric, p50_b8=p50_b8, metric_min=metric_min), baseline, GATES)


# ------------------------------------------------------------------ the comparison


def test_a_drop_equal_to_the_allowance_is_within_it_despite_binary_rounding() -> None:
    drop = 0.9 - 0.895
    assert drop > 0.005  # 0.005000000000000004 in binary: a plain `>` would fail it
    assert within(drop, 0.005)
    assert within(0.0, 0.005) and within(-0.01, 0.005)  # no drop, or a gain


def test_a_drop_over_the_allowance_at_the_reported_precision_is_not_within_it() -> None:
    assert not within(0.005001, 0.005)
    assert metric_drop(0.9, 0.894999) == 0.005001


@pytest.mark.parametrize("drop", [math.nan, math.inf, -math.inf])
def test_a_drop_that_is_not_a_number_is_never_within(drop: float) -> None:
    assert not within(drop, 1.0)


# ------------------------------------------------------------------ the allowance, per task


def test_classification_allows_the_accuracy_drop_whatever_the_baseline() -> None:
    assert GATES.allowed_drop(Task.classification, 0.98) == 0.005
    assert GATES.allowed_drop(Task.classification, 0.5) == 0.005
    assert GateSettings(max_accuracy_drop=0.02).allowed_drop(Task.classification, 0.9) == 0.02


def test_regression_allows_a_share_of_the_baseline_rmse() -> None:
    assert GATES.allowed_drop(Task.regression, -2.0) == pytest.approx(0.02)  # 1 % of RMSE 2
    assert GATES.allowed_drop(Task.regression, 0.0) == pytest.approx(1e-14)  # perfect: float noise


def test_embeddings_allow_the_fall_from_identical_that_the_mean_cosine_gate_allows() -> None:
    assert GATES.allowed_drop(Task.embedding, 1.0) == pytest.approx(0.01)
    assert GATES.allowed_drop(Task.embedding, 0.995) == pytest.approx(0.01)  # not from 0.995
    assert GateSettings(min_mean_cosine=-1.0, min_cosine=-1.0).allowed_drop(
        Task.embedding, 1.0
    ) == pytest.approx(2.0)


def test_an_embedding_is_gated_on_the_tighter_of_its_two_cosines() -> None:
    # the minimum cosine in mean-cosine units: 0.96 + (0.99 - 0.97) = 0.98, below the mean
    q = Quality(metric=0.995, metric_min=0.96)
    assert GATES.gated_metric(Task.embedding, q) == pytest.approx(0.98)
    assert GATES.gated_metric(Task.embedding, Quality(metric=0.991, metric_min=0.99)) == 0.991
    assert GATES.gated_metric(Task.classification, Quality(metric=0.9)) == 0.9


# ------------------------------------------------------------------ judge, at the boundary


def test_judge_passes_classification_at_the_allowed_drop_and_fails_past_it() -> None:
    at = judged(Task.classification, 0.9, 0.895)
    assert at.passed and at.failed_gates == [] and at.metric_drop == 0.005
    past = judged(Task.classification, 0.9, 0.894)
    assert not past.passed and past.failed_gates == ["quality"]
    assert past.reasons == ["accuracy drop 0.60 points > 0.50"]


def test_judge_passes_regression_at_the_allowed_rmse_increase_and_fails_past_it() -> None:
    at = judged(Task.regression, -0.5, -0.505)  # RMSE 0.5 -> 0.505: 1 %
    assert at.passed and at.failed_gates == []
    past = judged(Task.regression, -0.5, -0.506)
    assert past.failed_gates == ["quality"] and past.reasons == ["RMSE up 0.006 (allowed 0.005)"]


def test_judge_fails_a_metric_that_came_out_nan() -> None:
    nan = judged(Task.regression, -0.5, math.nan)
    assert not nan.passed and nan.failed_gates == ["quality"]


def test_judge_holds_embeddings_to_both_cosines_at_their_boundaries() -> None:
    assert judged(Task.embedding, 1.0, 0.99, metric_min=0.97).passed
    low_mean = judged(Task.embedding, 1.0, 0.9899, metric_min=0.98)
    assert low_mean.failed_gates == ["quality"] and low_mean.reasons[0].startswith("mean cosine")
    low_min = judged(Task.embedding, 1.0, 0.995, metric_min=0.969)
    assert low_min.failed_gates == ["quality"] and low_min.reasons[0].startswith("minimum")


@pytest.mark.parametrize(
    ("task", "base", "metrics"),
    [
        (Task.classification, 0.9, [0.9, 0.896, 0.895, 0.894, 0.85]),
        (Task.regression, -0.5, [-0.5, -0.504, -0.505, -0.506, -0.6]),
    ],
)
def test_the_retry_aims_at_the_gate_judge_applies(
    task: Task, base: float, metrics: list[float]
) -> None:
    """``accuracy_aware_quantize`` stops at the first attempt ``within`` the allowance
    (tasks/optimize.py passes ``allowed_drop``); ``judge`` then re-judges the written model,
    so the two must agree on every metric."""
    for metric in metrics:
        aimed = within(base - metric, GATES.allowed_drop(task, base))
        assert aimed == judged(task, base, metric).passed, metric


def test_the_retry_aims_at_both_embedding_gates() -> None:
    for mean, lowest in [(0.999, 0.99), (0.99, 0.97), (0.995, 0.95), (0.98, 0.99), (0.9, 0.9)]:
        gated = GATES.gated_metric(Task.embedding, Quality(metric=mean, metric_min=lowest))
        aimed = within(1.0 - gated, GATES.allowed_drop(Task.embedding, 1.0))
        assert aimed == judged(Task.embedding, 1.0, mean, metric_min=lowest).passed, (mean, lowest)


def test_reoptimization_compares_with_production_by_the_same_rule() -> None:
    def candidate(metric: float) -> dict[str, Any]:
        return {
            "selected": {
                "backend": "onnxruntime",
                "precision": "int8-static",
                "metric": metric,
                "latency_ms": {"8": {"p50": 0.5}},
            },
            "selected_sha256": f"{metric}",
        }

    production = {**candidate(0.99), "selected_sha256": "production"}
    against = functools.partial(
        compare, task="classification", model_settings={}, production=production, min_speedup=0.5
    )
    for metric in (0.99, 0.986, 0.985, 0.984):
        result = against(candidate=candidate(metric))
        assert result["better"] == within(0.99 - metric, GATES.max_accuracy_drop), metric
    # exactly half a point below: within, as judge would say
    assert against(candidate=candidate(0.985))["better"]


def test_the_champion_gate_defaults_to_the_optimize_gates_allowance() -> None:
    assert RolloutSettings().champion_max_drop == GATES.max_accuracy_drop == MAX_ACCURACY_DROP


# ------------------------------------------------------------------ the retry's decision


def test_the_retry_follows_the_failed_gate_not_the_words_of_the_reason() -> None:
    slow = report(0.9)
    slow.passed = False
    slow.failed_gates = ["speed"]
    slow.reasons = ["1.05x at batch 8 < 1.1x (accuracy drop 0.00 points, RMSE, cosine all fine)"]
    assert not wants_accuracy_aware("int8-static", slow)

    worse = report(0.8)
    worse.passed = False
    worse.failed_gates = ["quality"]
    worse.reasons = ["the variant is worse"]  # no keyword at all: the field decides
    assert wants_accuracy_aware("int8-static", worse)
    assert not wants_accuracy_aware("int8-dynamic", worse)  # only static int8 is retried


def test_a_variant_judged_only_too_slow_is_not_retried() -> None:
    slow = judged(Task.classification, 0.9, 0.9, p50_b8=1.9)  # 1.05x: under the 1.1x gate
    assert slow.failed_gates == ["speed"] and not slow.passed
    assert not wants_accuracy_aware("int8-static", slow)
    both = judged(Task.classification, 0.9, 0.8, p50_b8=1.9)
    assert both.failed_gates == ["quality", "speed"] and wants_accuracy_aware("int8-static", both)


def test_failed_gates_stay_out_of_the_reports_json() -> None:
    failed = judged(Task.classification, 0.9, 0.8)
    assert failed.failed_gates == ["quality"]
    assert "failed_gates" not in failed.model_dump(mode="json")
