"""The gateway's alert monitor: latency, errors, engines and GPU use, judged every few seconds.

Lifecycle: ``start()`` (the gateway's lifespan, after the supervisor) -> every
``alert_interval_s``: look at each served (model, version) in :class:`~serving.state.RoutingState`
(its request window, its replicas) and at the GPUs -> :func:`evaluate` the model's
:class:`~serving.config.AlertSettings` -> :class:`Hysteresis` (open on the first tick a condition
holds; resolve after ``alert_clear_ticks`` clear ticks in a row, so an alert does not flap) ->
:func:`kiln.monitor.alerts.fire` / :func:`kiln.monitor.alerts.clear` in a worker thread (a registry row and a
Prefect event; a slow database or Prefect never stalls the event loop that serves requests) ->
the ``kiln_alerts_open`` gauge from the registry's open alerts -> ``stop()``.

Open alerts of the monitor's kinds found in the registry (left by an earlier gateway) are taken
over: they resolve like any other once their cause has been gone for the clear ticks, or at once
when their version is no longer served. Drift alerts belong to the drift flow and are only counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.settings import Settings
from serving.config import AlertSettings, ServingSettings
from serving.metrics import GatewayMetrics
from serving.state import RoutingState

log = logging.getLogger("kiln.monitor.alerts")

P99, ERROR_RATE, ENGINE_DOWN, GPU_UTIL = "p99", "error_rate", "engine_down", "gpu_util"
RATE_LIMIT_LOCAL = "rate_limit_local"  # a gateway counting per-key limits alone (Redis down)
MONITORED = (P99, ERROR_RATE, ENGINE_DOWN, GPU_UTIL, RATE_LIMIT_LOCAL)  # KINDS less "drift"
# (model, kind, version); GPU alerts have no version; a gateway's own alerts (RATE_LIMIT_LOCAL)
# stand under the model ANY_MODEL with the gateway's address in the version's place
Key = tuple[str, str, str | None]
ANY_MODEL = "*"


@dataclass(frozen=True)
class Observation:
    """What one tick saw of one served version."""

    requests: int  # in the alert window
    errors: int  # of them, 5xx (the model failed, or its deadline passed)
    p99_ms: float | None  # of the answered ones
    unready_s: float  # seconds without a ready replica (0 while one is ready)
    ever_ready: bool  # had a ready replica since this gateway started


@dataclass(frozen=True)
class Finding:
    """One rule's verdict on one tick: whether its condition holds, and the figures."""

    kind: str
    holds: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""


def evaluate(
    obs: Observation, alerts: AlertSettings, serving: ServingSettings, *, start_grace_s: float
) -> list[Finding]:
    """The p99, error-rate and engine-down rules for one version. Latency and errors need
    ``min_requests`` in the window (fewer: the condition does not hold, so an alert resolves
    when traffic stops). A version that never had a ready engine gets ``start_grace_s`` (the
    engine start timeout) before it counts as down: warming up is not an outage."""
    window = f"in the last {alerts.window_s:g} s ({obs.requests} requests)"
    enough = obs.requests >= alerts.min_requests
    limit = alerts.p99_threshold(serving)
    slow = enough and obs.p99_ms is not None and obs.p99_ms > limit
    rate = obs.errors / obs.requests if obs.requests else None
    failing = enough and rate is not None and rate > alerts.error_rate
    grace = alerts.down_after_s if obs.ever_ready else max(alerts.down_after_s, start_grace_s)
    down = obs.unready_s > grace
    return [
        Finding(
            P99,
            slow,
            obs.p99_ms,
            limit,
            f"p99 {obs.p99_ms or 0:.0f} ms is over the {limit:.0f} ms limit {window}",
        ),
        Finding(
            ERROR_RATE,
            failing,
            rate,
            alerts.error_rate,
            f"{rate or 0:.1%} of requests failed (5xx), over the {alerts.error_rate:.1%} "
            f"limit, {window}",
        ),
        Finding(
            ENGINE_DOWN,
            down,
            obs.unready_s,
            grace,
            f"no ready engine for {obs.unready_s:.0f} s"
            + ("" if obs.ever_ready else " (never got ready)"),
        ),
    ]


def evaluate_gpu(
    samples: list[tuple[float, float]], alerts: AlertSettings, now: float
) -> Finding | None:
    """GPU utilization under ``gpu_util_min``: the mean of the (time, busy share) readings in
    the window, judged once readings cover the whole window (a gateway that just started, or a
    GPU that just came back, is not judged on a few seconds). None: no rule (turned off)."""
    if alerts.gpu_util_min is None:
        return None
    inside = [util for at, util in samples if at >= now - alerts.window_s]
    covered = bool(samples) and samples[0][0] <= now - alerts.window_s
    if not inside or not covered:
        return Finding(GPU_UTIL, False, None, alerts.gpu_util_min)
    mean = sum(inside) / len(inside)
    return Finding(
        GPU_UTIL,
        mean < alerts.gpu_util_min,
        mean,
        alerts.gpu_util_min,
        f"GPU utilization {mean:.0%} is under {alerts.gpu_util_min:.0%} over the "
        f"last {alerts.window_s:g} s",
    )


Step = Literal["open", "hold", "resolve"] | None


class Hysteresis:
    """Open on the first tick a condition holds; resolve only after ``clear_ticks`` clear ticks
    in a row (a hold in between starts the count again)."""

    def __init__(self, clear_ticks: int) -> None:
        self.clear_ticks = clear_ticks
        self.open: dict[Key, int] = {}  # open keys -> clear ticks in a row so far

    def step(self, key: Key, holds: bool) -> Step:
        """``open`` (newly), ``hold`` (still, refresh its figures), ``resolve``, or None
        (closed and staying so, or open and clearing)."""
        if holds:
            new = key not in self.open
            self.open[key] = 0
            return "open" if new else "hold"
        if key not in self.open:
            return None
        self.open[key] += 1
        if self.open[key] >= self.clear_ticks:
            del self.open[key]
            return "resolve"
        return None

    def adopt(self, key: Key) -> None:
        """An alert already open in the registry: judged from now on as if opened here."""
        self.open.setdefault(key, 0)

    def drop(self, key: Key) -> None:
        self.open.pop(key, None)


@dataclass
class Action:
    """A registry change for the worker thread: fire (open or refresh) or clear one alert."""

    op: Literal["fire", "clear"]
    key: Key
    finding: Finding | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegistryView:
    """What the monitor reads from the registry each tick (in the worker thread)."""

    alerts: dict[str, AlertSettings]  # model -> its alert settings
    open: list[Key]  # every open alert, drift included


class AlertMonitor:
    """Runs inside ``kiln serve`` beside the supervisor (see the module docstring).

    ``gpu_reader`` returns each GPU's busy share, or None where there is no GPU (default: the
    metrics' NVML reading); ``describe`` is the supervisor's per-version summary (restarts, last
    error), added to engine-down alerts.
    """

    def __init__(
        self,
        settings: Settings,
        state: RoutingState,
        metrics: GatewayMetrics,
        *,
        gpu_reader: Callable[[], list[float] | None] | None = None,
        describe: Callable[[], list[dict[str, Any]]] | None = None,
        limiter: Any = None,
        gateway: str | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter  # serving.auth.RateLimiter: shared limits degraded to local ones
        self.gateway = gateway or "gateway"  # this gateway's address, in its own alerts
        self.state = state
        self.metrics = metrics
        self.gpu_reader = gpu_reader if gpu_reader is not None else metrics.gpu.utilization
        self.describe = describe
        self.hysteresis = Hysteresis(settings.alert_clear_ticks)
        self.view: RegistryView | None = None
        self.gpu_samples: deque[tuple[float, float]] = deque()
        self._seen: dict[tuple[str, str], float] = {}  # first tick a version was served
        self._ready_at: dict[tuple[str, str], float] = {}  # last tick it had a ready replica
        self._gauged: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kiln-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        from kiln.monitor.alerts import flush

        await asyncio.to_thread(flush)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad tick (the registry unreachable) must not end alerting
                log.exception("alert evaluation failed")
            await asyncio.sleep(self.settings.alert_interval_s)

    async def tick(self) -> list[Action]:
        """One evaluation: what it decided (applied before it returns)."""
        if self.view is None:
            self.view = await asyncio.to_thread(self._sync, [])
        actions = self.decide(self.view, time.monotonic(), time.time())
        self.view = await asyncio.to_thread(self._sync, actions)
        self._gauge(self.view.open)
        return actions

    # --- on the event loop: observe and decide (no I/O)
    def decide(self, view: RegistryView, now: float, wall: float) -> list[Action]:
        served = {(m.name, v): m for m in self.state.models.values() for v in m.versions()}
        for key in view.open:
            # drift: the drift flow's to resolve; another gateway's own alerts: that gateway's
            if key[1] in MONITORED and (key[0] != ANY_MODEL or key[2] == self.gateway):
                self.hysteresis.adopt(key)
        actions: list[Action] = []
        findings: dict[Key, Finding] = {}
        for (name, version), model in served.items():
            alerts = view.alerts.get(name) or AlertSettings()
            obs = self._observe(name, version, alerts, now, wall)
            for finding in evaluate(
                obs, alerts, model.settings, start_grace_s=self.settings.engine_start_timeout_s
            ):
                findings[(name, finding.kind, version)] = finding
        gpu = self._read_gpu(now)
        for name in {n for n, _ in served}:
            alerts = view.alerts.get(name) or AlertSettings()
            gpu_finding = evaluate_gpu(list(self.gpu_samples), alerts, now) if gpu else None
            if gpu_finding is not None:
                findings[(name, GPU_UTIL, None)] = gpu_finding
        if self.limiter is not None and self.limiter.shared:
            findings[(ANY_MODEL, RATE_LIMIT_LOCAL, self.gateway)] = self._limits_finding()
        for key, finding in findings.items():
            step = self.hysteresis.step(key, finding.holds)
            if step in ("open", "hold"):
                actions.append(Action("fire", key, finding, self._detail(key)))
            elif step == "resolve":
                actions.append(
                    Action(
                        "clear",
                        key,
                        finding,
                        {
                            "resolved_because": "clear for "
                            f"{self.hysteresis.clear_ticks} evaluations"
                        },
                    )
                )
        # open alerts nothing judged this tick: their version is no longer served (or the
        # GPU is gone, or its rule turned off): their cause is gone with it
        for key in [k for k in self.hysteresis.open if k not in findings]:
            self.hysteresis.drop(key)
            actions.append(
                Action(
                    "clear", key, None, {"resolved_because": "no longer served or no longer judged"}
                )
            )
        for seen_key in [k for k in self._seen if k not in served]:
            self._seen.pop(seen_key, None)
            self._ready_at.pop(seen_key, None)
        return actions

    def _observe(
        self, name: str, version: str, alerts: AlertSettings, now: float, wall: float
    ) -> Observation:
        key = (name, version)
        self._seen.setdefault(key, now)
        if self.state.ready(name, version):
            self._ready_at[key] = now
        ready_at = self._ready_at.get(key)
        unready = (
            0.0
            if ready_at == now
            else now - (ready_at if ready_at is not None else self._seen[key])
        )
        window = self.state.windows.get(key)
        doc = window.summary(wall - alerts.window_s) if window is not None else {}
        return Observation(
            requests=int(doc.get("requests") or 0),
            errors=int(doc.get("errors") or 0),
            p99_ms=doc.get("p99_ms"),
            unready_s=unready,
            ever_ready=ready_at is not None,
        )

    def _limits_finding(self) -> Finding:
        since = self.limiter.degraded_since
        if since is None:
            return Finding(RATE_LIMIT_LOCAL, False)
        return Finding(
            RATE_LIMIT_LOCAL,
            True,
            round(time.time() - since, 1),
            message=f"gateway {self.gateway} counts per-key rate limits alone: the shared "
            f"storage does not answer ({self.limiter.last_error}); each gateway admits a key's "
            "whole rate until it does",
        )

    def _read_gpu(self, now: float) -> bool:
        """Add this tick's mean GPU reading; False (and no samples kept) without a GPU."""
        try:
            readings = self.gpu_reader()
        except Exception as exc:  # a driver hiccup: skip this tick's reading
            log.warning("could not read GPU utilization: %s", exc)
            return bool(self.gpu_samples)
        if not readings:
            self.gpu_samples.clear()
            return False
        self.gpu_samples.append((now, sum(readings) / len(readings)))
        longest = max(
            (a.window_s for a in (self.view.alerts.values() if self.view else ())),
            default=AlertSettings().window_s,
        )
        while self.gpu_samples and self.gpu_samples[0][0] < now - 2 * longest:
            self.gpu_samples.popleft()
        return True

    def _detail(self, key: Key) -> dict[str, Any]:
        model, kind, version = key
        if kind != ENGINE_DOWN or self.describe is None:
            return {}
        for row in self.describe():
            if row["model"] == model and row["version"] == version:
                return {
                    "restarts": row["restarts"],
                    "last_error": row["last_error"],
                    "wanted": row["wanted"],
                }
        return {}

    def _gauge(self, open_keys: list[Key]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for model, kind, _ in open_keys:
            counts[(model, kind)] = counts.get((model, kind), 0) + 1
        for labels in self._gauged - set(counts):
            self.metrics.alerts_open.labels(*labels).set(0)
        for labels, n in counts.items():
            self.metrics.alerts_open.labels(*labels).set(n)
        self._gauged |= set(counts)

    # --- in the worker thread: the registry and Prefect
    def _sync(self, actions: list[Action]) -> RegistryView:
        from kiln.monitor import alerts as kiln_alerts
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        url = self.settings.db_url
        for action in actions:
            model, kind, version = action.key
            try:
                if action.op == "fire" and action.finding is not None:
                    f = action.finding
                    opened = kiln_alerts.fire(
                        url,
                        model=model,
                        kind=kind,
                        version=version,
                        message=f.message,
                        value=f.value,
                        threshold=f.threshold,
                        detail=action.detail,
                    ).opened
                    if opened:
                        log.warning(
                            "alert opened: %s%s %s: %s",
                            model,
                            f"@{version}" if version else "",
                            kind,
                            f.message,
                        )
                else:
                    if (
                        kiln_alerts.clear(
                            url, model=model, kind=kind, version=version, detail=action.detail
                        )
                        is not None
                    ):
                        log.info(
                            "alert resolved: %s%s %s", model, f"@{version}" if version else "", kind
                        )
            except Exception:  # the next tick tries again (the alert is still open there)
                log.exception("could not record alert %s", action.key)
        with session_scope(url) as session:
            settings: dict[str, AlertSettings] = {}
            for model_row in crud.list_models(session=session):
                try:
                    settings[model_row.name] = AlertSettings.for_model(model_row.settings or {})
                except ValueError as exc:
                    log.warning(
                        "alert settings of %s are invalid (%s): using the defaults",
                        model_row.name,
                        exc,
                    )
            open_keys = [
                (a.model_name, a.kind, a.version) for a in crud.open_alerts(session=session)
            ]
        return RegistryView(settings, open_keys)
