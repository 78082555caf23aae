"""kiln.optimize.reoptimize.compare: when a re-optimized candidate counts as an improvement."""

from __future__ import annotations

from typing import Any

from kiln.optimize.reoptimize import compare


def variant(backend: str, p50_b8: float, metric: float = 0.98) -> dict[str, Any]:
    return {
        "backend": backend,
        "precision": "fp32",
        "metric": metric,
        "latency_ms": {"8": {"p50": p50_b8}, "32": {"p50": p50_b8 * 3}},
        "throughput": {"8": 8000 / p50_b8, "32": 32000 / (p50_b8 * 3)},
    }


def doc(selected: dict[str, Any], sha: str) -> dict[str, Any]:
    return {"selected": selected, "selected_sha256": sha}


def judge(
    production: dict[str, Any] | None,
    candidate: dict[str, Any],
    task: str = "classification",
    settings: dict[str, Any] | None = None,
    min_speedup: float = 1.1,
) -> dict[str, Any]:
    return compare(
        task=task,
        model_settings=settings or {},
        production=production,
        candidate=candidate,
        min_speedup=min_speedup,
    )


def test_faster_at_equal_accuracy_is_better_at_the_serving_batch() -> None:
    v = judge(
        doc(variant("torch-eager", 2.0), "a" * 64), doc(variant("onnxruntime", 0.5), "b" * 64)
    )
    assert v["better"] and v["speedup"] == 4.0 and v["batch"] == "8"
    assert v["throughput_ratio"] == 4.0


def test_the_model_serving_batch_setting_is_used() -> None:
    settings = {"optimize": {"gates": {"serving_batch": 32}}}
    v = judge(doc(variant("a", 2.0), "a" * 64), doc(variant("b", 1.0), "b" * 64), settings=settings)
    assert v["batch"] == "32" and v["better"]


def test_not_fast_enough_is_no_improvement() -> None:
    v = judge(doc(variant("a", 1.0), "a" * 64), doc(variant("b", 0.95), "b" * 64))
    assert not v["better"] and "under the 1.1x" in v["reason"]
    assert judge(
        doc(variant("a", 1.0), "a" * 64), doc(variant("b", 0.95), "b" * 64), min_speedup=1.05
    )["better"]


def test_an_accuracy_drop_over_the_gate_is_no_improvement() -> None:
    v = judge(doc(variant("a", 2.0, 0.98), "a" * 64), doc(variant("b", 0.5, 0.97), "b" * 64))
    assert not v["better"] and "below production" in v["reason"]
    ok = judge(doc(variant("a", 2.0, 0.98), "a" * 64), doc(variant("b", 0.5, 0.977), "b" * 64))
    assert ok["better"]  # 0.3 points: within the default half point


def test_the_same_artifact_is_never_an_improvement() -> None:
    v = judge(doc(variant("a", 2.0), "a" * 64), doc(variant("a", 0.5), "a" * 64))
    assert not v["better"] and v["speedup"] == 1.0 and "same artifact" in v["reason"]


def test_no_production_report_is_no_improvement() -> None:
    v = judge(None, doc(variant("b", 0.5), "b" * 64))
    assert not v["better"] and "no optimize report" in v["reason"]


def test_regression_uses_the_relative_error_gate() -> None:
    prod, cand = variant("a", 2.0, -1.0), variant("b", 0.5, -1.005)
    assert judge(doc(prod, "a" * 64), doc(cand, "b" * 64), task="regression")["better"]
    worse = variant("b", 0.5, -1.02)
    assert not judge(doc(prod, "a" * 64), doc(worse, "b" * 64), task="regression")["better"]
