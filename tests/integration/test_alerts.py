"""Alerts from a real `kiln serve` (gateway, supervisor, ONNX Runtime engine): an engine made
slow raises the p99 alert, an engine killed raises the engine-down alert, and both resolve when
the cause goes; `kiln status` shows the figures, the open alerts and the last drift share.

The engine is made slow and healthy again without a restart through the test hook
``KILN_ENGINE_FAULTS_FILE`` (kiln/faults.py), which the engine re-reads at most once a second.
Alert settings are short (a 4 s window, 0.5 s ticks) so the whole file runs in about a minute.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.registry import crud
from kiln.registry.db import dispose_engines, session_scope
from kiln.registry.tables import Alert, DriftReport
from tests.conftest import (
    RunningGateway,
    copy_home,
    deploy,
    digits_rows,
    infer_request,
    run_kiln,
    set_model_settings,
)

P99_MS = 400.0  # the alert's threshold
SLOW_MS = 800  # the injected delay per model call: p99 well over the threshold
ALERTS = {
    "p99_ms": P99_MS,
    "error_rate": 0.5,
    "window_s": 4,
    "min_requests": 5,
    "down_after_s": 0.5,
    "gpu_util_min": None,
}
MONITOR_ENV = {"KILN_ALERT_INTERVAL_S": "0.5", "KILN_ALERT_CLEAR_TICKS": "2"}


@dataclass
class Served:
    gw: RunningGateway
    db_url: str
    faults: Path  # KILN_ENGINE_FAULTS_FILE: the engine's faults while it runs
    body: bytes
    version: str

    def alerts(self, kind: str) -> list[Alert]:
        with session_scope(self.db_url) as session:
            return [a for a in crud.list_alerts(session=session, model="digits") if a.kind == kind]

    def open_alert(self, kind: str) -> Alert | None:
        return next((a for a in self.alerts(kind) if a.state == "open"), None)

    def resolved(self, alert: Alert) -> list[Alert]:
        """``alert`` as the registry holds it now, if it is resolved."""
        return [a for a in self.alerts(alert.kind) if a.id == alert.id and a.state == "resolved"]

    def gauge(self, kind: str) -> float:
        text = httpx.get(self.gw.url + "/metrics", headers=self.gw.headers, timeout=10).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "kiln_alerts_open" and s.labels.get("kind") == kind
        )

    def engines(self) -> list[psutil.Process]:
        return self.gw.engines()


@pytest.fixture(scope="module")
def served(
    validated_home: Path, examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """digits on one engine replica, with short alert settings and a faults file (empty)."""
    root = tmp_path_factory.mktemp("alerts")
    home = copy_home(validated_home, root)
    set_model_settings(home, "digits", {"serving": {"max_replicas": 1}, "alerts": ALERTS})
    deploy(home)
    faults = root / "faults"
    faults.write_text("")
    gw = RunningGateway(home, env={"KILN_ENGINE_FAULTS_FILE": str(faults), **MONITOR_ENV})
    try:
        gw.wait_ready()
        meta = httpx.get(f"{gw.url}/v2/models/digits", headers=gw.headers, timeout=15).json()
        x, _ = digits_rows(examples, 1)
        body = json.dumps(infer_request(meta["inputs"][0]["name"], x)).encode()
        yield Served(
            gw=gw,
            db_url=f"sqlite:///{home / 'registry.db'}",
            faults=faults,
            body=body,
            version=meta["versions"][0],
        )
    finally:
        engines = gw.engines()
        gw.stop()
        dispose_engines()
    # a clean shutdown on SIGTERM (uvicorn re-raises it once it has shut down): the lifespan
    # stopped the monitor, then the supervisor, which stopped the engines (their own process
    # groups: only the supervisor stops them)
    log = (home / "gateway.log").read_text(errors="replace")
    assert gw.proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log[-4000:]
    assert engines and not [e.pid for e in engines if psutil.pid_exists(e.pid)], log[-4000:]


class Traffic:
    """``threads`` clients sending one-row requests back to back until stopped."""

    def __init__(self, served: Served, threads: int = 4) -> None:
        self.served = served
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        s = self.served
        headers = {**s.gw.headers, "Content-Type": "application/json"}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    status = client.post(
                        f"{s.gw.url}/v2/models/digits/infer", content=s.body, headers=headers
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                if status != 200:
                    self._stop.wait(0.1)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, served: Served | None, every: float = 0.25
) -> Any:
    """Poll ``check`` every ``every`` s until it returns something truthy; fail with the
    gateway's log when there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    tail = f"\n{served.gw.tail()}" if served else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s{tail}")


def test_a_slow_engine_raises_the_p99_alert_and_it_resolves_when_the_slowness_goes(
    served: Served,
) -> None:
    with Traffic(served) as traffic:
        served.faults.write_text(f"delay_ms={SLOW_MS}")
        alert = wait_for("p99 alert opened", lambda: served.open_alert("p99"), 30, served)
        assert alert.version == served.version and alert.threshold == P99_MS
        assert alert.value is not None and alert.value > P99_MS
        wait_for("p99 counted in kiln_alerts_open", lambda: served.gauge("p99") == 1, 10, served)
        assert served.open_alert("engine_down") is None  # slow is not down
        served.faults.write_text("")  # the slowness goes; traffic goes on
        resolved = wait_for("p99 alert resolved", lambda: served.resolved(alert), 30, served)
    assert resolved[0].resolved_at is not None
    wait_for("kiln_alerts_open back to 0", lambda: served.gauge("p99") == 0, 10, served)
    assert set(traffic.statuses) == {200}, traffic.statuses


def test_a_killed_engine_raises_engine_down_and_it_resolves_after_the_restart(
    served: Served,
) -> None:
    (engine,) = served.engines()
    os.killpg(engine.pid, signal.SIGKILL)
    alert = wait_for(
        "engine_down alert opened", lambda: served.open_alert("engine_down"), 30, served
    )
    assert alert.version == served.version
    assert alert.detail.get("restarts", 0) >= 1, alert.detail
    wait_for("engine_down alert resolved", lambda: served.resolved(alert), 60, served)
    (again,) = served.engines()
    assert again.pid != engine.pid
    wait_for("kiln_alerts_open back to 0", lambda: served.gauge("engine_down") == 0, 10, served)


def test_kiln_status_shows_figures_open_alerts_and_the_last_drift_share(served: Served) -> None:
    from kiln.monitor import alerts as kiln_alerts

    with session_scope(served.db_url) as session:
        crud.add_drift_report(
            session=session,
            report=DriftReport(
                model_name="digits",
                drift_detected=True,
                drift_share=0.4,
                samples=200,
                method="evidently",
            ),
        )
    # as the drift flow does: the monitor counts it but leaves it to the flow to resolve
    kiln_alerts.fire(
        served.db_url,
        model="digits",
        kind="drift",
        message="40% of columns drifted",
        value=0.4,
        threshold=0.3,
    )
    with Traffic(served, threads=2):
        wait_for("traffic in the gateway's figures", lambda: _status(served)["rps"], 30, served)
        time.sleep(1.0)
    doc = _status(served)
    assert doc["stable"] == served.version and doc["canary"] is None
    assert doc["state"] and doc["canary_weight"] == 0.0
    for figure in ("p50_ms", "p99_ms", "error_rate", "rps"):
        assert isinstance(doc[figure], float | int), (figure, doc)
    assert doc["p50_ms"] <= doc["p99_ms"] and doc["error_rate"] == 0.0 and doc["rps"] > 0
    assert doc["drift_share"] == 0.4 and doc["drift_detected"] is True
    assert [a["kind"] for a in doc["alerts"]] == ["drift"]
    assert doc["alerts"][0]["message"] == "40% of columns drifted"
    wait_for("drift counted in kiln_alerts_open", lambda: served.gauge("drift") == 1, 10, served)
    table = run_kiln("status", env={**served.gw.env, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "digits" in table.stdout and "40%" in table.stdout and "drift" in table.stdout
    kiln_alerts.clear(served.db_url, model="digits", kind="drift")
    assert _status(served)["alerts"] == []


def _status(served: Served) -> dict[str, Any]:
    proc = run_kiln("status", "--json", env=served.gw.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (model,) = json.loads(proc.stdout)["models"]
    assert isinstance(model, dict)
    return model


# --- Prefect: alert events reach a real server; the README's automation turns a drift alert
# into a reoptimize run. The child process is what the drift flow or the gateway would be: it
# fires and clears through kiln.monitor.alerts with PREFECT_API_URL set, and flushes before it exits.
_PREFECT_CHILD = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from kiln.monitor import alerts
from kiln.settings import get_settings

url = get_settings().db_url
automation = alerts.drift_automation(sys.argv[1]).create()


def raise_and_resolve():  # in a worker thread, as the gateway's monitor calls them
    alerts.fire(url, model="digits", kind="drift", message="40% of columns drifted",
                value=0.4, threshold=0.3)
    alerts.fire(url, model="digits", kind="p99", version="0.1.0", message="slow",
                value=900.0, threshold=400.0)
    alerts.clear(url, model="digits", kind="p99", version="0.1.0")


with ThreadPoolExecutor(1) as pool:
    pool.submit(raise_and_resolve).result()
alerts.flush()
print(json.dumps({"automation": str(automation.id)}))
"""


def test_alert_events_reach_prefect_and_a_drift_alert_starts_reoptimize(tmp_path: Path) -> None:
    from flows.up import Stack, UpSettings
    from serving.supervisor import free_port
    from tests.conftest import kiln_env

    home = tmp_path / "kiln-home"
    stack = Stack(
        UpSettings(prefect_port=free_port(), prefect_ui=False),
        home=home,
        gateway_port=free_port(),
        base_env=kiln_env(home),
    )
    stack.logs.mkdir(parents=True, exist_ok=True)
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    api = stack.api_url
    try:
        stack.start_server()
        stack.ensure_work_pool()
        stack.register_deployments()
        deployment = httpx.get(f"{api}/deployments/name/reoptimize/reoptimize", timeout=10)
        assert deployment.status_code == 200, deployment.text
        dep_id = deployment.json()["id"]
        import subprocess
        import sys

        child = subprocess.run(
            [sys.executable, "-c", _PREFECT_CHILD, dep_id],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert child.returncode == 0, child.stderr[-3000:]

        def events() -> list[dict[str, Any]]:
            resp = httpx.post(
                f"{api}/events/filter",
                timeout=10,
                json={"filter": {"event": {"prefix": ["kiln.alert."]}}, "limit": 50},
            )
            assert resp.status_code == 200, resp.text
            return list(resp.json()["events"])

        seen = wait_for(
            "three kiln.alert events on the server",
            lambda: (lambda e: e if len(e) >= 3 else None)(events()),
            30,
            None,
            every=0.5,
        )
        by_name = sorted((e["event"], e["payload"]["kind"]) for e in seen)
        assert by_name == [
            ("kiln.alert.opened", "drift"),
            ("kiln.alert.opened", "p99"),
            ("kiln.alert.resolved", "p99"),
        ]
        drift = next(e for e in seen if e["payload"]["kind"] == "drift")
        assert drift["resource"]["prefect.resource.id"] == "kiln.model.digits"
        assert drift["payload"]["value"] == 0.4

        def triggered() -> list[dict[str, Any]]:
            resp = httpx.post(
                f"{api}/flow_runs/filter",
                timeout=10,
                json={"deployments": {"id": {"any_": [dep_id]}}},
            )
            assert resp.status_code == 200, resp.text
            return [r for r in resp.json() if r["parameters"] == {"model": "digits"}]

        what = "a reoptimize run for digits started by the automation"
        (run,) = wait_for(what, triggered, 60, None, every=0.5)
        assert run["deployment_id"] == dep_id
    finally:
        stack.stop()
