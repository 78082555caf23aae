"""Reliability scenario 29: PostgreSQL restarted under load (docs/reliability.md).

A PostgreSQL server of the test's own (:class:`PrivatePostgres`: initdb into a temp dir, its own
port; never the shared one at 127.0.0.1:5432) holds the registry of a small cluster of real
`kiln serve` processes on loopback hosts, as in tests/integration/test_cluster.py: a reconciler
(127.0.0.4, whose engines serve) and a gateway (127.0.0.2, an empty home, routing by the table
the reconciler publishes). A client sends ~20 requests a second through the gateway, retrying
nothing, while the database is stopped for longer than the reconciler's lease term and the
gateway's key cache, then started again. Meanwhile:

- every request is answered 200: the gateway routes on its last table and authenticates the
  key it looked up before (serving/auth.py: stale-if-error), the lapsed reconciler keeps its
  engines serving (serving/supervisor.py);
- a deploy attempted while the database is down fails at once, one line on stderr, and leaves
  the deployment as it was (nothing half done);
- once the database is back, the reconciler takes its lease back (token + 1) and a deploy made
  then reaches the gateway: its requests are answered by the new version.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from kiln.registry import crud, lease
from kiln.registry.db import dispose_engines, session_scope
from kiln.registry.tables import DeploymentEvent
from tests.conftest import (
    RunningGateway,
    digits_rows,
    infer_request,
    kiln_env,
    register_variants,
    repo_digits,
    require_service,
    run_kiln,
    set_model_settings,
    upload_digits,
)

RATE = 20.0  # requests a second through the gateway
DOWN_S = 6.5  # the database stays down longer than the 5 s lease and the 1 s key cache
BEFORE_S = 3.0  # load before the stop
AFTER_S = 3.0  # load after the new version is seen
SEEN_WITHIN_S = 60.0  # the deploy after the restart reaches the gateway (an engine warms up)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class PrivatePostgres:
    """A PostgreSQL server of this test's own on a free loopback port (trust authentication,
    fsync off, its socket in its own temp dir): one it may stop and start. As root the server
    runs as the ``postgres`` OS user (initdb refuses root), in a dir that user owns."""

    def __init__(self) -> None:
        from serving.supervisor import free_port

        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            require_service("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        assert initdb is not None and pg_ctl is not None
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.prefix: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                require_service("running PostgreSQL as root needs runuser and a postgres user")
            self.prefix = [str(runuser), "-u", "postgres", "--"]
        self.port = free_port()
        # not under pytest's tmp_path: its parents are root's alone (0700), closed to postgres
        self.root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/kiln"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self.prefix, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{args[:2]} failed: {done.stderr[-2000:]}\n{log}")

    def init(self) -> None:
        self._run(
            self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log),
            "start", "-w", "-t", "60",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "stop", "-m", mode, "-w", "-t", "60")
        self.running = False

    def create_database(self, name: str) -> None:
        from sqlalchemy import create_engine, text

        admin = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()

    def close(self) -> None:
        try:
            if self.running:
                try:
                    self.stop()
                except AssertionError:
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic
    took: float
    status: int  # 0: no answer at all (the client's error in ``detail``)
    version: str
    detail: str = ""


def _deployment(db_url: str) -> tuple[object, ...]:
    """What a deploy changes: the deployment rows (versions, weight, state, last change) and how
    many deployment events there are."""
    with session_scope(db_url) as session:
        events = session.execute(select(func.count()).select_from(DeploymentEvent)).scalar_one()
        return (crud.deployment_fingerprint(session=session), int(events))


def _stable(db_url: str) -> str | None:
    with session_scope(db_url) as session:
        (deployed,) = crud.served_versions(session=session)
        return deployed.stable.version if deployed.stable else None


def _token(db_url: str) -> int | None:
    with session_scope(db_url) as session:
        held = lease.current(session=session, name=lease.RECONCILER)
        return None if held is None else int(held["token"])


def _wait(what: str, check: object, timeout: float, period: float = 0.1) -> float:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic()
        except Exception:  # the database still starting: not yet
            pass
        time.sleep(period)
    raise AssertionError(f"{what}: not within {timeout} s")


def _ready(gateway: RunningGateway, version: str) -> bool:
    try:
        resp = httpx.get(
            f"{gateway.url}/v2/models/digits/versions/{version}/ready",
            headers=gateway.headers,
            timeout=2,
        )
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def test_scenario_29_postgres_restarted_under_load(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    examples = tmp_path_factory.mktemp("examples")
    (examples / "digits").mkdir()
    repo_digits(examples / "digits", "model.pt2", "val.npz", "test.npz")
    x, _ = digits_rows(examples, 64)
    bodies = [json.dumps(infer_request("x", x[i : i + 1])).encode() for i in range(64)]
    postgres = PrivatePostgres()
    try:
        postgres.init()
        postgres.start()
        postgres.create_database("kiln")
        db_url = postgres.url
        shared = {
            "KILN_DATABASE_URL": db_url,
            "KILN_ENGINE_SECRET": uuid.uuid4().hex,
            "KILN_AUTH_CACHE_S": "1",
            "KILN_LEASE_TTL_S": "5",
        }
        home = tmp_path / "host-4" / "kiln-home"
        env = kiln_env(home, **shared)
        # the registry in the private PostgreSQL: digits 0.1.0 optimized for real (ONNX Runtime
        # fp32), 0.1.1 a variant of it (another bias, the same answers)
        upload_digits(examples / "digits", env=env)
        optimize = {
            "optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}
        }
        set_model_settings(home, "digits", optimize, env=env)
        opt = run_kiln("optimize", "digits", "--json", env=env, timeout=900)
        assert opt.returncode == 0, opt.stderr[-3000:]
        assert register_variants(home, [{"bias": 0.01}], env=env) == ["0.1.1"]
        created = run_kiln("keys", "create", "--scope", "admin", "--json", env=env)
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]

        def deploy(version: str) -> subprocess.CompletedProcess[str]:
            return run_kiln(
                "deploy", f"digits@{version}", "--strategy", "direct", "--wait", "0", "--json",
                env=env, timeout=120,
            )  # fmt: skip

        done = deploy("0.1.0")
        assert done.returncode == 0, done.stderr
        with ExitStack() as stack:
            reconciler = stack.enter_context(
                RunningGateway(
                    home,
                    env={**shared, "KILN_ENGINE_HOST": "127.0.0.4"},
                    host="127.0.0.4",
                    role="reconciler",
                    key=key,
                )
            )
            gateway = stack.enter_context(
                RunningGateway(
                    tmp_path / "host-2" / "kiln-home",
                    env=shared,
                    host="127.0.0.2",
                    role="gateway",
                    key=key,
                )
            )
            _wait("the gateway ready for digits@0.1.0", lambda: _ready(gateway, "0.1.0"), 180)
            assert _stable(db_url) == "0.1.0"

            answers: list[Answer] = []
            stop = threading.Event()

            def load() -> None:
                url = gateway.url + "/v2/models/digits/infer"
                with httpx.Client(timeout=30, headers=gateway.headers) as http:
                    i, next_at = 0, time.monotonic()
                    while not stop.is_set():
                        sent = time.monotonic()
                        try:
                            resp = http.post(url, content=bodies[i % len(bodies)])
                            answer = Answer(
                                sent,
                                time.monotonic() - sent,
                                resp.status_code,
                                resp.headers.get("kiln-model-version", ""),
                                "" if resp.status_code == 200 else resp.text[:200],
                            )
                        except httpx.HTTPError as exc:
                            answer = Answer(sent, time.monotonic() - sent, 0, "", repr(exc)[:200])
                        answers.append(answer)
                        i += 1
                        next_at = max(next_at + 1 / RATE, time.monotonic())
                        time.sleep(max(0.0, next_at - time.monotonic()))

            loader = threading.Thread(target=load, name="pg-restart-load")
            loader.start()
            try:
                time.sleep(BEFORE_S)
                token_before = _token(db_url)
                before = _deployment(db_url)
                assert token_before is not None
                stopping = time.monotonic()
                postgres.stop()
                down_at = time.monotonic()
                # a deploy while the database is down: refused at once, nothing written
                refused = deploy("0.1.1")
                refused_in = time.monotonic() - down_at
                time.sleep(max(0.0, down_at + DOWN_S - time.monotonic()))
                postgres.start()
                up_at = time.monotonic()
                after = _deployment(db_url)  # before anything else writes a deployment
                stable_after = _stable(db_url)
                retaken = _wait(
                    "the reconciler holding its lease again",
                    lambda: (_token(db_url) or 0) > token_before,
                    timeout=30,
                )
                token_after = _token(db_url)
                done = deploy("0.1.1")
                assert done.returncode == 0, done.stderr
                deployed_at = time.monotonic()
                _wait(
                    "the gateway answering with digits@0.1.1",
                    lambda: any(a.version == "0.1.1" for a in answers[-5:]),
                    timeout=SEEN_WITHIN_S,
                    period=0.05,
                )
                time.sleep(AFTER_S)
            finally:
                stop.set()
                loader.join(60)
            gateway_log, reconciler_log = gateway.tail(), reconciler.tail()
    finally:
        dispose_engines()  # this process's pooled connections to the private server
        postgres.close()

    codes = Counter(a.status for a in answers)
    during = [a for a in answers if stopping <= a.sent < up_at]
    seen = min(a.sent for a in answers if a.version == "0.1.1")
    versions = Counter(a.version for a in answers)
    worst = max(a.took for a in answers)
    print(
        f"FIGURE postgres restarted under load: {len(answers)} requests at ~{RATE:g}/s, "
        f"{dict(codes)} ({len(during)} while it was down {up_at - stopping:.1f} s, stop took "
        f"{down_at - stopping:.1f} s); slowest answer {worst:.3f} s; a deploy while down "
        f"refused in {refused_in:.1f} s (exit {refused.returncode}); lease token "
        f"{token_before} -> {token_after} {retaken - up_at:.1f} s after the start; the deploy "
        f"made after it answered by the gateway {seen - deployed_at:.1f} s later "
        f"({seen - up_at:.1f} s after the start); versions {dict(versions)}"
    )
    failures = [a for a in answers if a.status != 200]
    assert not failures, (failures[:5], gateway_log[-3000:])
    assert len(during) >= RATE * DOWN_S * 0.5, "the load did not go on while it was down"
    # the deploy while down: a nonzero exit (11: retry later), one line, no traceback
    assert refused.returncode == 11, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "registry database does not answer" in lines[0], lines[:20]
    # ... and nothing half done: the deployment as it was, digits@0.1.0 stable
    assert after == before and stable_after == "0.1.0"
    # the reconciler took its lease back (it ran out while the database was down) and nobody
    # else acted: the next token
    assert token_after == token_before + 1, reconciler_log[-3000:]
    assert "took the reconciler lease back" in reconciler_log
    assert seen - deployed_at < SEEN_WITHIN_S
