"""The alert monitor's rules and hysteresis (pure functions), and whole ticks of the monitor
against a real SQLite registry with a hand-built routing state.

No GPU exists on the machines these tests run on: the GPU rule is tested with faked NVML
readings (an injected ``gpu_reader``), the one mock the style guide allows (the hardware edge).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import Task
from kiln.settings import Settings
from serving.alerts import (
    ENGINE_DOWN,
    ERROR_RATE,
    GPU_UTIL,
    P99,
    AlertMonitor,
    Hysteresis,
    Observation,
    evaluate,
    evaluate_gpu,
)
from serving.config import AlertSettings, ServingSettings
from serving.metrics import GatewayMetrics
from serving.state import Replica, RoutingState, ServedModel

SERVING = ServingSettings(deadline_ms=1000)


def _obs(
    requests: int = 100,
    errors: int = 0,
    p99_ms: float | None = 10.0,
    unready_s: float = 0.0,
    ever_ready: bool = True,
) -> Observation:
    return Observation(
        requests=requests, errors=errors, p99_ms=p99_ms, unready_s=unready_s, ever_ready=ever_ready
    )


def _holds(obs: Observation, alerts: AlertSettings | None = None) -> dict[str, bool]:
    found = evaluate(obs, alerts or AlertSettings(), SERVING, start_grace_s=120.0)
    return {f.kind: f.holds for f in found}


def test_p99_threshold_defaults_to_half_the_deadline() -> None:
    assert AlertSettings().p99_threshold(SERVING) == 500.0
    assert AlertSettings(p99_ms=80).p99_threshold(SERVING) == 80.0
    assert AlertSettings.for_model({"alerts": {"p99_ms": 50, "min_requests": 3}}).min_requests == 3
    with pytest.raises(ValueError):
        AlertSettings.for_model({"alerts": {"error_rate": 1.5}})


def test_p99_rule_needs_the_minimum_requests() -> None:
    alerts = AlertSettings(p99_ms=100, min_requests=20)
    assert _holds(_obs(p99_ms=150.0), alerts)[P99]
    assert not _holds(_obs(p99_ms=90.0), alerts)[P99]
    # one slow request (or a few) is not an alert
    assert not _holds(_obs(requests=19, p99_ms=5000.0), alerts)[P99]
    # every request failed: no answered latency, no p99 verdict
    assert not _holds(_obs(p99_ms=None), alerts)[P99]
    (p99,) = [
        f for f in evaluate(_obs(p99_ms=150.0), alerts, SERVING, start_grace_s=0) if f.kind == P99
    ]
    assert (p99.value, p99.threshold) == (150.0, 100.0)
    assert "150 ms" in p99.message and "100 ms" in p99.message


def test_error_rate_rule_counts_5xx_share() -> None:
    alerts = AlertSettings(error_rate=0.05, min_requests=20)
    assert _holds(_obs(requests=100, errors=6), alerts)[ERROR_RATE]
    assert not _holds(_obs(requests=100, errors=5), alerts)[ERROR_RATE]  # at the limit: fine
    assert not _holds(_obs(requests=10, errors=10), alerts)[ERROR_RATE]  # too few to judge
    (rule,) = [
        f
        for f in evaluate(_obs(requests=40, errors=4), alerts, SERVING, start_grace_s=0)
        if f.kind == ERROR_RATE
    ]
    assert rule.value == pytest.approx(0.1) and rule.threshold == 0.05


def test_engine_down_after_the_grace_and_warmup_is_not_down() -> None:
    alerts = AlertSettings(down_after_s=10)
    assert not _holds(_obs(unready_s=0.0), alerts)[ENGINE_DOWN]
    assert not _holds(_obs(unready_s=9.0), alerts)[ENGINE_DOWN]  # a quick restart
    assert _holds(_obs(unready_s=11.0), alerts)[ENGINE_DOWN]
    # never ready yet: the engine start timeout (120 s here) applies, not down_after_s
    assert not _holds(_obs(unready_s=60.0, ever_ready=False), alerts)[ENGINE_DOWN]
    assert _holds(_obs(unready_s=121.0, ever_ready=False), alerts)[ENGINE_DOWN]


def test_gpu_rule_judges_a_full_window_of_faked_readings() -> None:
    # faked NVML readings: no GPU exists here
    alerts = AlertSettings(gpu_util_min=0.2, window_s=10)
    now = 100.0
    idle = [(now - 12 + i, 0.05) for i in range(13)]
    finding = evaluate_gpu(idle, alerts, now)
    assert finding is not None and finding.holds and finding.value == pytest.approx(0.05)
    busy = [(at, 0.9) for at, _ in idle]
    assert evaluate_gpu(busy, alerts, now).holds is False  # type: ignore[union-attr]
    # readings cover 5 s of a 10 s window: not judged yet
    recent = [(now - 5 + i, 0.0) for i in range(6)]
    assert evaluate_gpu(recent, alerts, now).holds is False  # type: ignore[union-attr]
    assert evaluate_gpu(idle, AlertSettings(gpu_util_min=None), now) is None


def test_hysteresis_opens_at_once_and_resolves_after_clear_ticks() -> None:
    h = Hysteresis(clear_ticks=3)
    key = ("m", P99, "1.0.0")
    assert h.step(key, False) is None
    assert h.step(key, True) == "open"
    assert h.step(key, True) == "hold"
    assert [h.step(key, False) for _ in range(2)] == [None, None]
    assert h.step(key, True) == "hold"  # flapped back: the clear count starts again
    assert [h.step(key, False) for _ in range(3)] == [None, None, "resolve"]
    assert h.step(key, False) is None and key not in h.open
    h.adopt(key)  # open in the registry (an earlier gateway): resolves like the others
    assert [h.step(key, False) for _ in range(3)] == [None, None, "resolve"]


# --- whole ticks: a real registry, a hand-built routing state, faked GPU readings
def _registry(tmp_path: Path, alerts: dict[str, object]) -> Settings:
    settings = Settings(home=tmp_path / "home", database_url=None, alert_clear_ticks=2)
    with session_scope(settings.db_url) as session:
        crud.create_model(
            session=session, name="m", task=Task.classification, settings={"alerts": alerts}
        )
    return settings


def _state(ready: bool = True) -> RoutingState:
    state = RoutingState()
    state.models = {
        "m": ServedModel(name="m", task="classification", settings=SERVING, stable="1.0.0")
    }
    state.replicas = {
        ("m", "1.0.0"): [Replica(model="m", version="1.0.0", url="http://127.0.0.1:9", ready=ready)]
    }
    return state


def _open(settings: Settings) -> set[tuple[str, str, str | None]]:
    with session_scope(settings.db_url) as session:
        return {(a.model_name, a.kind, a.version) for a in crud.open_alerts(session=session)}


def _gauge(metrics: GatewayMetrics, kind: str) -> float | None:
    return metrics.registry.get_sample_value("kiln_alerts_open", {"model": "m", "kind": kind})


def test_monitor_ticks_open_and_resolve_registry_alerts(tmp_path: Path) -> None:
    settings = _registry(
        tmp_path,
        {"p99_ms": 50, "min_requests": 5, "window_s": 30, "gpu_util_min": 0.3, "down_after_s": 0},
    )
    state, metrics = _state(), GatewayMetrics()
    gpu = [0.05]  # faked NVML reading (no GPU here): an idle GPU
    monitor = AlertMonitor(settings, state, metrics, gpu_reader=lambda: gpu)
    window = state.window("m", "1.0.0")
    for _ in range(10):
        window.record(200.0, True)  # slow: p99 200 ms over 50 ms

    async def ticks(n: int) -> None:
        for _ in range(n):
            await monitor.tick()

    asyncio.run(ticks(1))
    assert _open(settings) == {("m", P99, "1.0.0")}
    assert _gauge(metrics, P99) == 1
    # the GPU rule waits for a full window of readings: pretend they began 31 s ago
    monitor.gpu_samples.appendleft((time.monotonic() - 31, 0.05))
    asyncio.run(ticks(1))
    assert ("m", GPU_UTIL, None) in _open(settings)
    # the slowness goes (the window keeps only fast requests) and the GPU gets busy:
    # resolved after two clear ticks, not one
    window.samples.clear()
    for _ in range(10):
        window.record(5.0, True)
    gpu[0] = 0.95
    monitor.gpu_samples.clear()
    monitor.gpu_samples.append((time.monotonic() - 31, 0.95))
    asyncio.run(ticks(1))
    assert ("m", P99, "1.0.0") in _open(settings)
    asyncio.run(ticks(1))
    assert _open(settings) == set()
    assert _gauge(metrics, P99) == 0 and _gauge(metrics, GPU_UTIL) == 0
    with session_scope(settings.db_url) as session:
        (p99,) = [a for a in crud.list_alerts(session=session) if a.kind == P99]
        assert p99.value == pytest.approx(200.0) and p99.threshold == 50
        assert p99.resolved_at is not None


def test_monitor_takes_over_and_resolves_alerts_of_versions_no_longer_served(
    tmp_path: Path,
) -> None:
    from kiln.monitor import alerts as kiln_alerts

    settings = _registry(tmp_path, {})
    # left open by an earlier gateway: one for a version no longer served, one still served
    kiln_alerts.fire(
        settings.db_url, model="m", kind=ENGINE_DOWN, version="0.9.0", message="no ready engine"
    )
    kiln_alerts.fire(settings.db_url, model="m", kind=ERROR_RATE, version="1.0.0", message="errors")
    kiln_alerts.fire(settings.db_url, model="m", kind="drift", message="drift")
    monitor = AlertMonitor(settings, _state(), GatewayMetrics(), gpu_reader=lambda: None)

    async def tick() -> None:
        await monitor.tick()

    asyncio.run(tick())
    assert _open(settings) == {("m", ERROR_RATE, "1.0.0"), ("m", "drift", None)}
    asyncio.run(tick())
    # the error rate is clear (no traffic) for two ticks; drift belongs to the drift flow
    assert _open(settings) == {("m", "drift", None)}
    assert _gauge(monitor.metrics, "drift") == 1


def test_the_faults_file_changes_an_engines_faults_while_it_runs(tmp_path: Path) -> None:
    """The test hook the integration tests use to make an engine slow, then healthy again."""
    from kiln.faults import EngineFaults

    path = tmp_path / "faults"
    faults = EngineFaults.from_env({"KILN_ENGINE_FAULTS_FILE": str(path)})
    assert faults is not None and faults.applies("1.0.0") and faults.delay_ms == 0
    path.write_text("delay_ms=250,versions=1.0.0")
    faults._checked = 0.0  # the once-a-second recheck, without waiting a second
    assert faults.applies("1.0.0") and not faults.applies("2.0.0")
    assert faults.delay_ms == 250
    path.write_text("delay_ms=oops")  # unreadable: the current faults stay
    faults._checked, faults._mtime = 0.0, None
    assert faults.applies("1.0.0") and faults.delay_ms == 250
    path.unlink()
    faults._checked = 0.0
    assert faults.applies("2.0.0") and faults.delay_ms == 0


def test_monitor_starts_and_stops_with_its_loop(tmp_path: Path) -> None:
    settings = _registry(tmp_path, {})
    settings.alert_interval_s = 0.05
    monitor = AlertMonitor(settings, _state(ready=False), GatewayMetrics(), gpu_reader=lambda: None)

    async def run() -> None:
        await monitor.start()
        await asyncio.sleep(0.5)
        await monitor.stop()

    asyncio.run(run())
    assert monitor.view is not None and monitor._task is None
    assert _open(settings) == set()  # not ready for 0.5 s of a 120 s start grace: not down
