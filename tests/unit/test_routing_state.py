"""Routing decisions: canary weights with sticky keys, least-outstanding replicas, the circuit
breaker, the result cache."""

from __future__ import annotations

import time

from kiln.spec import ModelSpec
from serving.config import ServingSettings
from serving.state import BREAKER_FAILURES, Replica, ResultCache, RoutingState, ServedModel

SPEC = ModelSpec.model_validate(
    {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
)


def _served(weight: float, canary: str | None = "2.0.0") -> ServedModel:
    return ServedModel(
        name="m",
        task="classification",
        settings=ServingSettings(),
        stable="1.0.0",
        canary=canary,
        canary_weight=weight,
        specs={"1.0.0": SPEC, **({canary: SPEC} if canary else {})},
    )


def test_canary_weight_splits_traffic_and_routing_keys_stick() -> None:
    served = _served(0.2)
    picks = [served.pick_version(None) for _ in range(5000)]
    share = picks.count("2.0.0") / len(picks)
    assert 0.17 < share < 0.23
    keyed = {f"user-{i}": served.pick_version(f"user-{i}") for i in range(2000)}
    assert all(served.pick_version(k) == v for k, v in keyed.items())  # sticky
    assert 0.16 < list(keyed.values()).count("2.0.0") / len(keyed) < 0.24
    # raising the weight only moves keys from stable to canary, never back
    wider = _served(0.5)
    assert all(wider.pick_version(k) == "2.0.0" for k, v in keyed.items() if v == "2.0.0")
    assert _served(0.0).pick_version("k") == "1.0.0"
    assert _served(1.0).pick_version("k") == "2.0.0"
    assert _served(0.7, canary=None).pick_version("k") == "1.0.0"


def test_least_outstanding_replica_and_exclusions() -> None:
    state = RoutingState()
    a, b, c = (Replica("m", "1.0.0", f"http://127.0.0.1:{p}", ready=True) for p in (1, 2, 3))
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    state.replicas[("m", "1.0.0")] = [a, b, c]
    assert state.pick_replica("m", "1.0.0", set()) is b
    assert state.pick_replica("m", "1.0.0", {id(b)}) is c
    b.draining = True
    assert state.pick_replica("m", "1.0.0", set()) is c
    c.ready = False
    assert state.pick_replica("m", "1.0.0", set()) is a
    assert state.pick_replica("m", "1.0.0", {id(a)}) is None
    assert state.pick_replica("m", "9.9.9", set()) is None


def test_circuit_breaker_opens_after_consecutive_failures_and_closes_on_success() -> None:
    replica = Replica("m", "1.0.0", "http://127.0.0.1:1", ready=True)
    now = time.monotonic()
    for _ in range(BREAKER_FAILURES - 1):
        replica.failed(now)
    assert replica.available(now)
    replica.failed(now)
    assert not replica.available(now)  # open: no traffic
    assert replica.available(replica.open_until)  # half-open after the pause: one trial
    replica.succeeded()
    assert replica.failures == 0 and replica.available(now)


def test_readiness_lists_versions_without_a_ready_engine() -> None:
    state = RoutingState(models={"m": _served(0.1)})
    state.replicas[("m", "1.0.0")] = [Replica("m", "1.0.0", "u", ready=True)]
    ready, missing = state.all_ready()
    assert not ready and missing == ["m@2.0.0"]
    state.replicas[("m", "2.0.0")] = [Replica("m", "2.0.0", "u", ready=True)]
    assert state.all_ready() == (True, [])
    assert RoutingState().all_ready() == (True, [])  # nothing deployed: ready


def test_result_cache_is_a_bounded_lru() -> None:
    cache = ResultCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


def test_version_window_summary_since_and_over() -> None:
    import time

    from serving.state import VersionWindow

    window = VersionWindow(size=100)
    for latency in (1.0, 2.0, 3.0, 50.0):
        window.record(latency, True)
    window.record(9.0, False)
    window.record_shadow(10, 1)
    doc = window.summary(0.0, over_ms=10.0)
    assert doc["requests"] == 5 and doc["errors"] == 1 and doc["error_rate"] == 0.2
    assert doc["p50_ms"] == 2.5 and doc["over"] == 1
    assert doc["shadow_compared"] == 10 and doc["shadow_disagreed"] == 1
    assert window.summary(time.time() + 1)["requests"] == 0  # nothing since then
    for _ in range(200):  # bounded: only the newest samples are kept
        window.record(1.0, True)
    assert window.summary()["requests"] == 100


def test_scaling_in_drains_a_warming_replica_before_the_ready_one() -> None:
    """CI once drained the only ready replica (0 in flight at that instant) and kept its
    sibling that was still warming up: six seconds of 503s."""
    from serving.supervisor import EngineProc, scale_in_victim

    def proc(ready: bool, outstanding: int) -> EngineProc:
        replica = Replica("m", "1.0.0", "http://127.0.0.1:1", ready=ready, outstanding=outstanding)
        return EngineProc(replica=replica, proc=None, started=0.0)  # type: ignore[arg-type]

    serving, warming = proc(True, 0), proc(False, 0)
    assert scale_in_victim([serving, warming]) is warming
    broken = proc(True, 0)
    broken.replica.open_until = time.monotonic() + 60  # breaker open
    assert scale_in_victim([serving, broken]) is broken
    busy, idle = proc(True, 5), proc(True, 1)
    assert scale_in_victim([busy, idle]) is idle
