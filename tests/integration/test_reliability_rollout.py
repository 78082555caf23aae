"""docs/reliability.md scenarios 20, 21, 23 and 25: rollouts that meet a fault, against a real
`kiln serve` (scenario 21 against the registry alone, on SQLite and PostgreSQL).

- 20: a canary whose stored artifact was bit-flipped, then one truncated, while the stable
  serves light traffic: the engine refuses to load it (sha256, exit code 5), the canary is never
  ready, every answer is the stable's.
- 21: a promote, rollback or direct deploy SIGKILLed inside its transaction (a failpoint in
  :mod:`kiln.registry.crud`): nothing of it lands, the database is intact, a retry succeeds. The other
  half of 21 (20 concurrent promotes: one winner, 19 get 409) is
  ``tests/unit/test_rollout_crud.py::test_twenty_concurrent_promotes_have_one_winner``.
- 23: the canary's engine SIGKILLed under 20 rps: removed from routing within one health period,
  no request fails.
- 25: promote, rollback and reloads (a direct deploy, a rollback to the previous stable) under
  20 rps: no request dropped; readiness is 503 from the moment a new version is deployed until
  its engine has warmed up, while the outgoing stable keeps answering (make-before-break: the
  supervisor keeps it routed as ``previous`` until the new one is ready).

One gateway serves 20, 23 and 25 (module fixture ``rollout``): digits 0.1.0 (ONNX Runtime) is
stable, and five more versions are registered beside it: its ONNX file with the last bias nudged
(so each version's answers are its own), kept in the artifact store, marked validated without
running the optimizer (the gates are not what these scenarios test). Every engine call takes
50 ms more than the model (``KILN_ENGINE_FAULTS``), so requests are in flight whenever something
changes. Every answered request is compared with its version's (``Kiln-Model-Version``) answer
for that row.

Each test prints ``FIGURE scenario N:`` lines (``pytest -s | grep FIGURE``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import psutil
import pytest
from sqlalchemy import create_engine, text

from kiln.registry import crud
from kiln.registry.db import dispose_engines, session_scope
from kiln.registry.tables import VersionStatus
from kiln.settings import Settings
from tests.conftest import (
    RunningGateway,
    copy_home,
    deploy,
    digits_rows,
    infer_request,
    register_validated,
    register_variants,
)
from tests.integration.test_reliability_serving import metric_sum, percentile

HEALTH_PERIOD_S = float(Settings.model_fields["health_interval_s"].default)
ENGINE_DELAY_MS = 50  # added to every engine call: requests are in flight at every change
ROWS = 16  # distinct digits the clients send (row i of the test split)
RPS = 20
# one version's answers for one row agree to this whatever the batch around them; two
# versions' answers differ by 0.01 or more on every logit (Rollout.learn checks)
ATOL = 1e-4


# ----------------------------------------------------------------------------- the gateway
@dataclass
class Rollout:
    """digits served by a real gateway, its registry, and each version's answers per row."""

    gw: RunningGateway
    home: Path
    db_url: str
    stable: str  # the version deployed first (ONNX Runtime)
    spare: list[str]  # validated versions nobody serves yet, oldest first
    x: np.ndarray  # ROWS real digits
    refs: dict[str, np.ndarray] = field(default_factory=dict)  # version -> [ROWS, 10] logits

    def body(self, rows: slice) -> bytes:
        return json.dumps(infer_request("x", self.x[rows])).encode()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.gw.url + path, headers=self.gw.headers, timeout=15)

    def pinned(self, version: str) -> httpx.Response:
        return httpx.post(
            f"{self.gw.url}/v2/models/digits/versions/{version}/infer",
            content=self.body(slice(0, ROWS)),
            headers=self.gw.headers,
            timeout=30,
        )

    def learn(self, version: str) -> None:
        """Record ``version``'s answers for every row (it must be served now)."""
        if version in self.refs:
            return
        resp = self.pinned(version)
        assert resp.status_code == 200, resp.text
        assert resp.headers["kiln-model-version"] == version
        logits = _logits(resp.json())
        # the wrong-answer checks rest on this: no two versions answer alike
        assert all(np.abs(logits - known).min() > 10 * ATOL for known in self.refs.values())
        self.refs[version] = logits

    def deployment(self) -> tuple[str | None, str | None]:
        """(stable, canary) in the registry."""
        with session_scope(self.db_url) as session:
            model = crud.require_model(session=session, name="digits")
            dep = crud.get_deployment(session=session, model=model)
            assert dep is not None
            names = {v.id: v.version for v in crud.list_versions(session=session, model=model)}
            return names.get(dep.stable_version_id), names.get(dep.canary_version_id)

    def change(self, action: str, version: str | None = None, weight: float = 0.5) -> None:
        """A rollout step, as the CLI and flows make it: one CRUD call in one transaction."""
        with session_scope(self.db_url) as session:
            model = crud.require_model(session=session, name="digits")
            row = (
                crud.require_version(session=session, name="digits", version=version)
                if version is not None
                else None
            )
            if action == "canary":
                assert row is not None
                crud.start_canary(session=session, version=row, weight=weight)
            elif action == "promote":
                crud.promote(session=session, model=model)
            elif action == "rollback":
                crud.rollback(session=session, model=model, to_version=row)
            elif action == "deploy":
                assert row is not None
                crud.make_stable(session=session, version=row)
            else:
                raise ValueError(action)

    def engine_pids(self, version: str) -> list[int]:
        """Process-group leaders of ``version``'s live engines (the gateway's children)."""
        try:
            children = psutil.Process(self.gw.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                cmd = child.cmdline()
                if (
                    child.status() != psutil.STATUS_ZOMBIE
                    and "serving.engine" in " ".join(cmd)
                    and cmd[cmd.index("--version") + 1] == version
                ):
                    pids.append(child.pid)
            except (psutil.Error, ValueError, IndexError):
                continue
        return pids

    def engine_health(self, version: str) -> int:
        """Status of ``GET /health`` on ``version``'s engine (0: no engine listening)."""
        for pid in self.engine_pids(version):
            try:
                cmd = psutil.Process(pid).cmdline()
                port = cmd[cmd.index("--port") + 1]
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except (psutil.Error, httpx.TransportError):
                continue
        return 0

    def version_ready(self, version: str) -> int:
        return self.get(f"/v2/models/digits/versions/{version}/ready").status_code

    def wait_version_ready(self, version: str, timeout: float = 120.0) -> float:
        """Seconds until the gateway calls ``version`` ready."""
        start = time.monotonic()
        while self.version_ready(version) != 200:
            assert time.monotonic() - start < timeout, f"{version} not ready:\n{self.gw.tail()}"
            time.sleep(0.1)
        return time.monotonic() - start

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.get("/metrics").text, name, **labels)


def _logits(doc: dict[str, Any]) -> np.ndarray:
    out = doc["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def rollout(
    validated_home: Path, examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rollout]:
    tmp = tmp_path_factory.mktemp("rollout")
    home = copy_home(validated_home, tmp)
    stable = deploy(home)["version"]
    # its ONNX file with the last bias nudged by 0.01 more each time: each version's answers
    # are its own
    spare = register_variants(home, [{"bias": 0.01 * (i + 1)} for i in range(5)])
    gw = RunningGateway(home, env={"KILN_ENGINE_FAULTS": f"delay_ms={ENGINE_DELAY_MS}"})
    db_url = f"sqlite:///{home / 'registry.db'}"
    try:
        gw.wait_ready()
        x, _ = digits_rows(examples, ROWS)
        served = Rollout(gw=gw, home=home, db_url=db_url, stable=str(stable), spare=spare, x=x)
        served.learn(served.stable)
        yield served
    finally:
        gw.stop()
        dispose_engines()


# ----------------------------------------------------------------------------- the clients
@dataclass
class Outcome:
    """One client request."""

    due: float  # monotonic time it was sent (open loop: on schedule, whatever the answers)
    row: int
    first: int = -1  # the first attempt's status (0: no answer)
    final: int = -1  # after retrying 503s and lost connections
    attempts: int = 0
    done: float = 0.0
    version: str = ""  # Kiln-Model-Version of the 200
    fallback: str = ""  # X-Kiln-Fallback
    logits: np.ndarray | None = None


class Traffic:
    """Open-loop load: ``rps`` single-row requests a second whatever the answers (asyncio, in
    a thread of its own). A request answered 503 or not at all is retried every 100 ms for up
    to ``retry_s`` (a client with retry); its first status is what a client without retry
    would have got."""

    def __init__(self, s: Rollout, rps: float = RPS, retry_s: float = 15.0) -> None:
        self.s, self.rps, self.retry_s = s, rps, retry_s
        self.url = f"{s.gw.url}/v2/models/digits/infer"
        self.bodies = [s.body(slice(i, i + 1)) for i in range(ROWS)]
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.retry_s + 60)
        assert not self._thread.is_alive(), "the load's requests did not finish"

    async def _run(self) -> None:
        headers = {**self.s.gw.headers, "Content-Type": "application/json"}
        async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            tasks: list[asyncio.Future[None]] = []
            start = time.monotonic()
            while not self._stop.is_set():
                due = start + len(tasks) / self.rps
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                out = Outcome(due=due, row=len(tasks) % ROWS)
                tasks.append(asyncio.ensure_future(self._one(http, out)))
            await asyncio.gather(*tasks)

    async def _one(self, http: aiohttp.ClientSession, out: Outcome) -> None:
        give_up = time.monotonic() + self.retry_s
        while True:
            out.attempts += 1
            try:
                async with http.post(self.url, data=self.bodies[out.row]) as resp:
                    status, body, headers = resp.status, await resp.read(), resp.headers
            except (aiohttp.ClientError, TimeoutError):
                status, body, headers = 0, b"", None
            if out.first < 0:
                out.first = status
            if status in (0, 503) and time.monotonic() < give_up:
                await asyncio.sleep(0.1)
                continue
            break
        out.final, out.done = status, time.monotonic()
        if status == 200 and headers is not None:
            out.version = headers.get("kiln-model-version", "")
            out.fallback = headers.get("x-kiln-fallback", "")
            out.logits = _logits(json.loads(body))[0]
        self.outcomes.append(out)

    def between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.due < end]

    def in_flight_at(self, moment: float) -> int:
        return sum(o.due <= moment <= o.done for o in self.outcomes)


def wrong_answers(s: Rollout, outcomes: list[Outcome]) -> list[Outcome]:
    """Answered requests whose outputs are not their version's answers for their row."""
    return [
        o
        for o in outcomes
        if o.final == 200
        and (
            o.version not in s.refs
            or o.logits is None
            or not np.allclose(o.logits, s.refs[o.version][o.row], atol=ATOL, rtol=ATOL)
        )
    ]


@dataclass
class Sample:
    at: float
    status: int  # GET /v2/health/ready (0: no answer)
    waiting_for: list[str]
    engine: int | None = None  # the watched version's engine /health, asked after a 200


class ReadyProbe:
    """Polls ``GET /v2/health/ready`` every ``period`` s. Once a 503 has named the watched
    version (the gateway knows it is deployed), each later 200 is followed by a look at that
    version's engine: its ``/health`` must be 200 (warm-up over) whenever the gateway says ready.
    """

    def __init__(self, s: Rollout, period: float = 0.05) -> None:
        self.s, self.period = s, period
        self.samples: list[Sample] = []
        self.watch: str | None = None
        self._named = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def watching(self, version: str | None) -> None:
        self.watch, self._named = version, False

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(self.period):
                try:
                    resp = http.get(self.s.gw.url + "/v2/health/ready")
                    status, waiting = resp.status_code, resp.json().get("waiting_for", [])
                except (httpx.TransportError, ValueError):
                    status, waiting = 0, []
                sample = Sample(time.monotonic(), status, waiting)
                watch = self.watch
                if watch is not None and f"digits@{watch}" in waiting:
                    self._named = True
                if watch is not None and self._named and status == 200:
                    sample.engine = self.s.engine_health(watch)
                self.samples.append(sample)

    def between(self, start: float, end: float = float("inf")) -> list[Sample]:
        return [p for p in self.samples if start <= p.at < end]

    def wait_named_then_ready(self, version: str, since: float, timeout: float = 120.0) -> None:
        """Until a 503 after ``since`` named ``version`` and a 200 followed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            named = [p.at for p in self.between(since) if f"digits@{version}" in p.waiting_for]
            if named and any(p.status == 200 for p in self.between(named[0])):
                return
            time.sleep(0.1)
        raise AssertionError(f"readiness never went 503 -> 200 for {version}:\n{self.s.gw.tail()}")


def not_ready_spans(samples: list[Sample]) -> list[float]:
    """Lengths (s) of the runs of 503s among ``samples`` (a run still open at the end counts up
    to the last sample)."""
    spans, began = [], None
    for p in samples:
        if p.status != 200 and began is None:
            began = p.at
        elif p.status == 200 and began is not None:
            spans.append(p.at - began)
            began = None
    if began is not None:
        spans.append(samples[-1].at - began)
    return spans


# ----------------------------------------------------------------------------- scenario 20
def _flip(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    _rewrite(path, bytes(data))
    return "one bit flipped"


def _truncate(path: Path) -> str:
    data = path.read_bytes()
    _rewrite(path, data[: len(data) // 2])
    return f"truncated to {len(data) // 2} of {len(data)} bytes"


def _rewrite(path: Path, data: bytes) -> None:
    """Replace the stored file's bytes (a new inode: a DVC cache file linked to it keeps its
    own)."""
    path.unlink()
    path.write_bytes(data)


def _selected_file(s: Rollout, version: str) -> Path:
    with session_scope(s.db_url) as session:
        row = crud.require_version(session=session, name="digits", version=version)
        (artifact,) = [a for a in crud.list_artifacts(session=session, version=row) if a.selected]
        return s.home / artifact.path


def _exit_codes(s: Rollout, version: str) -> list[int]:
    """Exit codes of ``version``'s engines, as the supervisor logged them."""
    pattern = rf"engine digits@{re.escape(version)} \(pid \d+\) exited with code (-?\d+)"
    log = (s.home / "gateway.log").read_text(errors="replace")
    return [int(code) for code in re.findall(pattern, log)]


def test_scenario_20_a_corrupt_artifact_is_never_served(rollout: Rollout) -> None:
    s = rollout
    _drop_canary(s)
    stable = s.deployment()[0]
    assert stable is not None
    s.learn(stable)
    for corrupt in (_flip, _truncate):
        version = s.spare.pop(0)
        what = corrupt(_selected_file(s, version))
        restarts = s.metric("kiln_engine_restarts_total", version=version)
        with Traffic(s, rps=10, retry_s=0) as traffic:
            time.sleep(1.0)
            began = time.monotonic()
            s.change("canary", version, weight=0.5)
            deadline = began + 60
            while len(_exit_codes(s, version)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)  # the first start and one restart after its backoff
            ready = s.get("/v2/health/ready")
            version_ready = s.version_ready(version)
            pinned = s.pinned(version)
            time.sleep(1.0)
        s.change("rollback")
        codes = _exit_codes(s, version)
        engine_logs = "".join(
            p.read_text(errors="replace")
            for p in (s.home / "logs").glob(f"engine-digits-{version}-*.log")
        )
        during = traffic.between(began)
        wrong = wrong_answers(s, traffic.outcomes)
        not_stable = [o for o in traffic.outcomes if o.final == 200 and o.version != stable]
        failed = [o for o in traffic.outcomes if o.final != 200]
        fallbacks = sum(bool(o.fallback) for o in during)
        print(
            f"FIGURE scenario 20 ({what}): canary {version} at weight 0.5 beside stable "
            f"{stable}: corrupted responses {len(wrong) + len(not_stable)}, failed requests "
            f"{len(failed)} of {len(traffic.outcomes)} ({len(during)} after the canary "
            f"started, {fallbacks} of them picked the canary and were answered by the stable);"
            f" canary engine exit codes {codes}, restarts "
            f"{s.metric('kiln_engine_restarts_total', version=version) - restarts:.0f}; "
            f"in the gateway: /v2/health/ready {ready.status_code} {ready.json()}, "
            f"versions/{version}/ready {version_ready}, pinned infer {pinned.status_code}"
        )
        assert "sha256" in engine_logs and "corrupt" in engine_logs, engine_logs[-2000:]
        assert codes and set(codes) == {5}, codes
        assert ready.status_code == 503 and f"digits@{version}" in ready.json()["waiting_for"]
        assert version_ready == 503 and pinned.status_code == 503
        assert not wrong and not not_stable
        assert not failed, {o.first for o in failed}
        assert len(during) >= 20 and fallbacks > 0
        s.gw.wait_ready()


def _drop_canary(s: Rollout) -> None:
    if s.deployment()[1] is not None:
        s.change("rollback")


# ----------------------------------------------------------------------------- scenario 21
# A child process: one rollout step, with KILN_FAILPOINTS killing it inside the transaction.
_STEP = r"""
import sys
from kiln.registry import crud
from kiln.registry.db import session_scope

url, action, version = sys.argv[1], sys.argv[2], sys.argv[3]
with session_scope(url) as session:
    model = crud.require_model(session=session, name="m")
    if action == "promote":
        crud.promote(session=session, model=model)
    elif action == "rollback":
        crud.rollback(session=session, model=model)
    elif action == "deploy":
        crud.make_stable(session=session, version=crud.require_version(
            session=session, name="m", version=version))
print("the failpoint was not reached")
"""


def _snapshot(db_url: str) -> dict[str, Any]:
    """Every row a rollout step writes: the deployment, version statuses, the event count."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            dep = [tuple(r) for r in conn.execute(text("SELECT * FROM deployment"))]
            versions = {
                str(k): str(v)
                for k, v in conn.execute(text("SELECT version, status FROM modelversion"))
            }
            events = conn.execute(text("SELECT count(*) FROM deploymentevent")).scalar_one()
    finally:
        engine.dispose()
    return {"deployment": dep, "versions": versions, "events": events}


def _invariant_violations(db_url: str) -> list[str]:
    """What is wrong with the registry: a broken database file (SQLite), or rows that disagree
    (the deployment's stable is the one production version; its canary, and only it, is a
    canary)."""
    wrong: list[str] = []
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                wrong.append(f"integrity_check: {check}")
            if conn.execute("PRAGMA foreign_key_check").fetchall():
                wrong.append("foreign_key_check found dangling rows")
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        dep = crud.get_deployment(session=session, model=model)
        assert dep is not None
        status = {
            v.id: VersionStatus(v.status) for v in crud.list_versions(session=session, model=model)
        }
    production = [i for i, st in status.items() if st == VersionStatus.production]
    canaries = [i for i, st in status.items() if st == VersionStatus.canary]
    if production != [dep.stable_version_id]:
        wrong.append(f"production versions {production}, stable {dep.stable_version_id}")
    if canaries != ([dep.canary_version_id] if dep.canary_version_id else []):
        wrong.append(f"canary versions {canaries}, deployment canary {dep.canary_version_id}")
    if dep.canary_version_id is None and dep.canary_weight != 0.0:
        wrong.append(f"weight {dep.canary_weight} without a canary")
    return wrong


def _do(db_url: str, action: str, version: str = "") -> None:
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        if action == "canary":
            crud.start_canary(
                session=session,
                weight=0.5,
                version=crud.require_version(session=session, name="m", version=version),
            )
        elif action == "promote":
            crud.promote(session=session, model=model)
        elif action == "rollback":
            crud.rollback(session=session, model=model)
        elif action == "deploy":
            crud.make_stable(
                session=session,
                version=crud.require_version(session=session, name="m", version=version),
            )


def test_scenario_21_a_rollout_step_killed_inside_its_transaction_leaves_nothing(
    db_url: str,
) -> None:
    """Each step is SIGKILLed at a failpoint inside its transaction (after its first write,
    or after its last one, before the commit); then the registry must be exactly as before and
    consistent, and the same step, retried, must succeed."""
    register_validated(db_url, "1.0.0", "2.0.0", "3.0.0", "4.0.0")
    _do(db_url, "deploy", "1.0.0")
    _do(db_url, "canary", "2.0.0")
    # (failpoint, step, version, retried: what the registry holds after the retry)
    steps = [
        ("promote.after_swap", "promote", "", None),
        ("promote.after_event", "promote", "", {"1.0.0": "retired", "2.0.0": "production"}),
        ("canary", "", "3.0.0", None),  # set up: 3.0.0 becomes the canary (no kill)
        ("canary_rollback.after_swap", "rollback", "", {"3.0.0": "rolled_back"}),
        ("rollback.after_swap", "rollback", "", None),  # back to 1.0.0, the retired stable
        ("rollback.after_event", "rollback", "", {"1.0.0": "production", "2.0.0": "retired"}),
        ("deploy.after_status", "deploy", "4.0.0", {"1.0.0": "retired", "4.0.0": "production"}),
    ]
    violations: list[str] = []
    kills = 0
    for failpoint, action, version, retried in steps:
        if failpoint == "canary":
            _do(db_url, "canary", version)
            continue
        before = _snapshot(db_url)
        child = subprocess.run(
            [sys.executable, "-c", _STEP, db_url, action, version or "-"],
            env={**os.environ, "KILN_FAILPOINTS": failpoint},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == -signal.SIGKILL, (
            failpoint,
            child.returncode,
            child.stderr[-2000:],
        )
        kills += 1
        after = _snapshot(db_url)
        if after != before:
            violations.append(f"{failpoint}: {before} -> {after}")
        violations += [f"{failpoint}: {w}" for w in _invariant_violations(db_url)]
        if retried is not None:
            started = time.monotonic()
            _do(db_url, action, version)
            took = time.monotonic() - started
            now = _snapshot(db_url)["versions"]
            if any(now[k] != v for k, v in retried.items()):
                violations.append(f"{failpoint}: the retried {action} left {now}")
            events = _snapshot(db_url)["events"] - before["events"]
            if events != 1:
                violations.append(f"{failpoint}: the retry wrote {events} events")
            violations += [f"{failpoint} (retried): {w}" for w in _invariant_violations(db_url)]
            assert took < 10, f"the retried {action} waited {took:.1f} s (a lock left behind?)"
    dialect = db_url.split(":", 1)[0].split("+")[0]
    print(
        f"FIGURE scenario 21 ({dialect}): {kills} rollout steps SIGKILLed inside their "
        f"transaction (promote and rollback to the previous stable, each after its first "
        f"write and after its last; canary rollback and direct deploy mid-way), then "
        f"retried: invariant violations {len(violations)}"
        f"{' ' + repr(violations) if violations else ''}; 20 concurrent promotes: "
        "tests/unit/test_rollout_crud.py::test_twenty_concurrent_promotes_have_one_winner"
    )
    assert kills == 6
    assert not violations, violations


# ----------------------------------------------------------------------------- scenario 23
def _ensure_canary(s: Rollout, version: str) -> None:
    """``version`` is the canary at 0.5, its engine ready, its answers known."""
    if s.deployment()[1] not in (None, version):
        s.change("rollback")
    if s.deployment()[1] is None:
        s.change("canary", version, weight=0.5)
    s.gw.wait_ready()
    s.wait_version_ready(version)
    s.learn(version)


def test_scenario_23_a_killed_canary_engine_is_removed_and_no_request_fails(
    rollout: Rollout,
) -> None:
    s = rollout
    canary = s.spare[0]  # scenario 25 promotes it
    _ensure_canary(s, canary)
    stable = s.deployment()[0]
    assert stable is not None
    s.learn(stable)
    (pid,) = s.engine_pids(canary)
    retries = s.metric("kiln_retries_total", version=canary)
    with Traffic(s) as traffic:
        time.sleep(3.0)
        killed = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        while s.version_ready(canary) == 200:
            assert time.monotonic() - killed < 30, "the dead canary stayed ready"
            time.sleep(0.01)
        removal = time.monotonic() - killed
        back = removal + s.wait_version_ready(canary)
        time.sleep(2.0)
    in_flight = traffic.in_flight_at(killed)
    caught = sum(o.due <= killed <= o.done and bool(o.fallback) for o in traffic.outcomes)
    after = traffic.between(killed)
    first_failed = [o for o in traffic.outcomes if o.first != 200]
    failed = [o for o in traffic.outcomes if o.final != 200]
    wrong = wrong_answers(s, traffic.outcomes)
    rescued = [o.done - o.due for o in after if o.fallback]
    direct = [o.done - o.due for o in after if not o.fallback]
    print(
        f"FIGURE scenario 23: canary {canary} (weight 0.5) engine SIGKILLed under {RPS} rps "
        f"({in_flight} requests in flight, {caught} of them in the canary and answered by the "
        f"stable): removed from routing after {removal:.2f} s "
        f"(health period {HEALTH_PERIOD_S:g} s), back after {back:.1f} s; failed requests "
        f"{len(failed)} with client retry, {len(first_failed)} without, of "
        f"{len(traffic.outcomes)} ({len(after)} after the kill, {len(rescued)} of them picked "
        f"the canary and were answered by stable {stable}, in "
        f"{percentile(rescued, 50) * 1000:.0f} ms median against "
        f"{percentile(direct, 50) * 1000:.0f} ms for the rest; gateway retries of the canary "
        f"{s.metric('kiln_retries_total', version=canary) - retries:.0f}); wrong answers "
        f"{len(wrong)}"
    )
    assert removal <= HEALTH_PERIOD_S, removal
    assert not failed and not first_failed, [(o.first, o.final) for o in failed + first_failed]
    assert not wrong
    assert len(after) >= 3 * RPS


# ----------------------------------------------------------------------------- scenario 25
@dataclass
class Step:
    label: str
    at: float  # monotonic time of the commit
    new: str | None  # the version whose engine must start (None: every engine is running)


class Changes:
    """Rollout steps made under :class:`Traffic` and watched by :class:`ReadyProbe`."""

    def __init__(self, s: Rollout, traffic: Traffic, probe: ReadyProbe) -> None:
        self.s, self.traffic, self.probe = s, traffic, probe
        self.steps: list[Step] = []

    def step(self, label: str, change: Callable[[], None], new: str | None) -> None:
        """Make ``change``; when it deploys ``new`` (an engine to start), wait until the gateway
        has gone not ready and ready again; then let the load run on for 2.5 s."""
        self.probe.watching(new)
        change()
        self.steps.append(Step(label, time.monotonic(), new))
        if new is not None:
            self.probe.wait_named_then_ready(new, self.steps[-1].at)
            self.s.wait_version_ready(new)
            self.s.learn(new)
        time.sleep(2.5)

    def report(self, title: str) -> tuple[dict[str, int], list[str]]:
        """Print the figure; return the totals and one line per step."""
        rows = []
        totals = {"requests": 0, "dropped": 0, "first_failed": 0, "premature": 0, "checked": 0}
        steps = self.steps
        for i, st in enumerate(steps):
            # a step's requests: from 1 s before it (those in flight at the change) to 1 s
            # before the next one; the first and the last step take the load's start and end
            since = st.at - 1.0 if i else 0.0
            until = steps[i + 1].at - 1.0 if i + 1 < len(steps) else float("inf")
            sent = self.traffic.between(since, until)
            samples = self.probe.between(since, until)
            dropped = [o for o in sent if o.final != 200]
            first = [o for o in sent if o.first != 200]
            checked = [p for p in samples if p.engine is not None]
            premature = [p for p in checked if p.engine != 200]
            spans = not_ready_spans(samples)
            codes = sorted({o.first for o in first})
            rows.append(
                f"{st.label}: {len(sent)} requests, {self.traffic.in_flight_at(st.at)} "
                f"in flight at the change, dropped {len(dropped)} with client retry, "
                f"{len(first)} without{f' ({codes})' if codes else ''}, not ready "
                f"{sum(spans):.2f} s" + (f" (engine warm-up of {st.new})" if st.new else "")
            )
            for key, found in (
                ("requests", sent),
                ("dropped", dropped),
                ("first_failed", first),
                ("premature", premature),
                ("checked", checked),
            ):
                totals[key] += len(found)
            if st.new is None:
                assert not spans, (st.label, spans)
            else:
                assert spans, f"{st.label}: readiness never went 503"
                assert checked, f"{st.label}: the engine was never looked at after a 200"
        wrong = wrong_answers(self.s, self.traffic.outcomes)
        totals["wrong"] = len(wrong)
        print(
            f"FIGURE scenario 25 ({title}, {RPS} rps): "
            + "; ".join(rows)
            + f"; wrong answers {len(wrong)}; ready while the new engine had not warmed up: "
            f"{totals['premature']} of {totals['checked']} looks"
        )
        return totals, rows


def test_scenario_25_promote_and_rollback_under_load_drop_nothing(rollout: Rollout) -> None:
    """(a) the canary is promoted; (b) a new canary starts (readiness 503 while it warms up)
    and is rolled back."""
    s = rollout
    promoted, dropped_canary = s.spare[0], s.spare[1]
    _ensure_canary(s, promoted)
    stable = s.deployment()[0]
    assert stable is not None
    s.learn(stable)
    with Traffic(s) as traffic, ReadyProbe(s) as probe:
        changes = Changes(s, traffic, probe)
        time.sleep(1.5)
        changes.step("(a) promote", lambda: s.change("promote"), None)
        changes.step("(b) canary start", lambda: s.change("canary", dropped_canary), dropped_canary)
        changes.step("(b) rollback", lambda: s.change("rollback"), None)
    assert s.deployment() == (promoted, None)
    totals, rows = changes.report("promote, canary rollback")
    assert totals["wrong"] == 0 and totals["premature"] == 0
    assert totals["dropped"] == 0 and totals["first_failed"] == 0, rows


def test_scenario_25_reloads_under_load_drop_nothing(rollout: Rollout) -> None:
    """(c) a reload: a new version deployed directly; (d) a rollback to the previous stable,
    whose engine (c) stopped."""
    s = rollout
    _drop_canary(s)
    previous = s.deployment()[0]
    assert previous is not None
    s.learn(previous)
    reloaded = s.spare[2]
    with Traffic(s) as traffic, ReadyProbe(s) as probe:
        changes = Changes(s, traffic, probe)
        time.sleep(1.5)
        changes.step("(c) reload: direct deploy", lambda: s.change("deploy", reloaded), reloaded)
        changes.step("(d) rollback to the previous stable", lambda: s.change("rollback"), previous)
    assert s.deployment() == (previous, None)
    totals, rows = changes.report("reloads")
    assert totals["wrong"] == 0 and totals["premature"] == 0
    assert totals["dropped"] == 0, rows  # a client that retries 503s for 15 s loses nothing
    # make-before-break: the outgoing stable answers until the incoming one is ready, so not
    # even a first try fails
    assert totals["first_failed"] == 0, rows
