"""Kiln past one machine, on one machine: each "host" is a set of processes on its own loopback
address with its own KILN_HOME, sharing PostgreSQL (the registry, keys, the reconciler lease and
the routing table) and Redis (per-key rate limits). Real `kiln serve` processes throughout:

- 127.0.0.4: ``kiln serve --role reconciler``, whose engines bind 127.0.0.4 and prove the
  channel secret (KILN_ENGINE_SECRET) to every gateway;
- 127.0.0.2 and 127.0.0.3: ``kiln serve --role gateway``, with empty homes (a gateway needs no
  artifact), routing by the table the reconciler publishes;
- 127.0.0.5 (the last test): a second reconciler waiting for the lease.

The gateways' homes are empty and the reconcilers' hold the artifacts: artifacts in an object
store (so that any host can pull them) are issue 18's third part, not yet here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from kiln.registry import crud, endpoints, lease
from kiln.registry.db import session_scope
from tests.conftest import (
    RunningGateway,
    _pg_exec,
    _pg_schema_url,
    copy_home,
    digits_rows,
    infer_request,
    kiln_env,
    pg_available,
    register_variants,
    require_service,
    run_kiln,
    set_model_settings,
    upload_digits,
)

REDIS = "redis://127.0.0.1:6379/0"
CANARY_WEIGHT = 0.3


def _redis_down() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2, socket_connect_timeout=2).ping()
    except Exception as exc:  # any failure means no Redis to test against
        return f"Redis at 127.0.0.1:6379 does not answer: {exc}"
    return None


@dataclass
class Cluster:
    db_url: str
    env: dict[str, str]  # what every host shares (registry, Redis, channel secret)
    reconciler_home: Path
    reconciler: RunningGateway
    gateways: list[RunningGateway]
    key: str  # admin
    tmp: Path

    def body(self, row: int) -> bytes:
        return _BODIES[row % len(_BODIES)]


_BODIES: list[bytes] = []


def _table(db_url: str) -> list[endpoints.Endpoint]:
    with session_scope(db_url) as session:
        return endpoints.routable(session=session)


def _holder(db_url: str) -> dict[str, object] | None:
    with session_scope(db_url) as session:
        return lease.current(session=session, name=lease.RECONCILER)


def _wait(what: str, check: object, timeout: float, period: float = 0.05) -> float:
    """Poll ``check()`` until truthy; the monotonic time it first was."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, examples: Path) -> Iterator[Cluster]:
    require_service(pg_available())
    require_service(_redis_down())
    schema = f"kiln_{uuid.uuid4().hex[:10]}"
    _pg_exec(f"CREATE SCHEMA {schema}")
    db_url = _pg_schema_url(schema)
    tmp = tmp_path_factory.mktemp("cluster")
    shared = {
        "KILN_DATABASE_URL": db_url,
        "KILN_RATE_LIMIT_STORAGE": REDIS,
        "KILN_ENGINE_SECRET": uuid.uuid4().hex,
    }
    home = tmp / "host-4" / "kiln-home"
    env = kiln_env(home, **shared)
    # the registry in PostgreSQL: digits 0.1.0 optimized for real (ONNX Runtime fp32), 0.1.1 a
    # variant of it (another bias, the same answers) for the canary
    upload_digits(examples / "digits", env=env)
    optimize = {"optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}}
    set_model_settings(home, "digits", optimize, env=env)
    opt = run_kiln("optimize", "digits", "--json", env=env, timeout=900)
    assert opt.returncode == 0, opt.stderr[-3000:]
    assert register_variants(home, [{"bias": 0.01}], env=env) == ["0.1.1"]
    created = run_kiln("keys", "create", "--scope", "admin", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    x, _ = digits_rows(examples, 64)
    _BODIES[:] = [json.dumps(infer_request("x", x[i : i + 1])).encode() for i in range(64)]
    started: list[RunningGateway] = []
    try:
        reconciler = RunningGateway(
            home,
            env={**shared, "KILN_ENGINE_HOST": "127.0.0.4"},
            host="127.0.0.4",
            role="reconciler",
            key=key,
        )
        started.append(reconciler)
        for n in (2, 3):
            gw_home = tmp / f"host-{n}" / "kiln-home"
            started.append(
                RunningGateway(gw_home, env=shared, host=f"127.0.0.{n}", role="gateway", key=key)
            )
        for proc in started:
            proc.wait_ready()
        yield Cluster(db_url, shared, home, reconciler, started[1:], key, tmp)
    finally:
        for proc in started:
            proc.stop()
        _pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> dict[str, float]:
    """digits 0.1.0 deployed (direct) once the cluster runs: when the reconciler published a
    ready replica of it, and when each gateway first answered ready for it."""
    done = run_kiln(
        "deploy", "digits@0.1.0", "--strategy", "direct", "--json",
        env=kiln_env(cluster.reconciler_home, **cluster.env),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    published = _wait(
        "a ready replica of digits@0.1.0 in the routing table",
        lambda: any(e.ready and e.version == "0.1.0" for e in _table(cluster.db_url)),
        timeout=180,
    )
    seen = {}
    for gateway in cluster.gateways:
        seen[gateway.url] = _wait(
            f"{gateway.url} ready for digits@0.1.0", lambda g=gateway: _ready(g, "0.1.0"), 10
        )
    return {"published": published, **seen}


def test_a_deploy_is_seen_by_every_gateway_within_two_seconds(
    cluster: Cluster, deployed: dict[str, float]
) -> None:
    lags = {url: t - deployed["published"] for url, t in deployed.items() if url != "published"}
    print(f"seconds from the reconciler's publish to each gateway routing it: {lags}")
    assert all(lag < 2.0 for lag in lags.values()), lags
    (row,) = _table(cluster.db_url)
    assert row.channels and all(c.startswith("127.0.0.4:") for c in row.channels)
    for gateway in cluster.gateways:  # through the channel, which proved the secret
        resp = httpx.post(
            gateway.url + "/v2/models/digits/infer",
            content=cluster.body(0),
            headers=gateway.headers,
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["kiln-model-version"] == "0.1.0"
    status = run_kiln("status", "--json", env=kiln_env(cluster.reconciler_home, **cluster.env))
    assert status.returncode == 0, status.stderr
    holder = json.loads(status.stdout)["reconciler"]
    assert holder["holder"].startswith("127.0.0.4:") and holder["since"] > 0
    # the reconciler routes nothing; an engine refuses a channel without the secret
    refused = httpx.post(
        cluster.reconciler.url + "/v2/models/digits/infer",
        content=cluster.body(0),
        headers=cluster.reconciler.headers,
    )
    assert refused.status_code == 404 and "reconciler" in refused.json()["error"]
    assert row.url.startswith("http://127.0.0.1:")  # the engine's HTTP API: its host's own


def test_a_canary_gets_its_weight_across_both_gateways(
    cluster: Cluster, deployed: dict[str, float]
) -> None:
    with session_scope(cluster.db_url) as session:
        canary = crud.require_version(session=session, name="digits", version="0.1.1")
        crud.start_canary(session=session, version=canary, weight=CANARY_WEIGHT)
    for gateway in cluster.gateways:
        _wait(f"{gateway.url} routing the canary", lambda g=gateway: _ready(g, "0.1.1"), 180)
    gateways = cluster.gateways

    def send(i: int) -> tuple[int, str, str]:
        gateway = gateways[i % 2]
        headers = dict(gateway.headers)
        if i >= 2000:  # sticky: routing key k, once through each gateway
            headers["X-Kiln-Routing-Key"] = f"client-{(i - 2000) // 2}"
        resp = http[i % 2].post(
            gateway.url + "/v2/models/digits/infer", content=cluster.body(i), headers=headers
        )
        return (
            resp.status_code,
            resp.headers.get("kiln-model-version", ""),
            headers.get("X-Kiln-Routing-Key", ""),
        )

    http = [httpx.Client(timeout=30), httpx.Client(timeout=30)]
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, range(2000 + 2 * 100)))
    finally:
        for client in http:
            client.close()
    assert all(code == 200 for code, _, _ in answers), Counter(c for c, _, _ in answers)
    share = sum(v == "0.1.1" for _, v, _ in answers[:2000]) / 2000
    print(f"canary share over 2,000 requests through two gateways: {share:.3f}")
    assert abs(share - CANARY_WEIGHT) <= 0.05
    by_key: dict[str, set[str]] = {}
    for _, version, routing_key in answers[2000:]:
        by_key.setdefault(routing_key, set()).add(version)
    assert len(by_key) == 100 and all(len(v) == 1 for v in by_key.values()), "a key moved"


def test_a_key_limit_holds_across_both_gateways(
    cluster: Cluster, deployed: dict[str, float]
) -> None:
    created = run_kiln(
        "keys", "create", "--scope", "infer", "--rate", "20", "--json",
        env=kiln_env(cluster.reconciler_home, **cluster.env),
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {json.loads(created.stdout)['key']}"}
    codes: Counter[int] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + 10.0

    def hammer(gateway: RunningGateway) -> None:
        with httpx.Client(headers=headers, timeout=10) as http:
            i = 0
            while time.monotonic() < stop_at:
                resp = http.post(
                    gateway.url + "/v2/models/digits/versions/0.1.0/infer",
                    content=cluster.body(i),
                )
                i += 1
                with lock:
                    codes[resp.status_code] += 1

    threads = [threading.Thread(target=hammer, args=(g,)) for g in cluster.gateways * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"a key limited to 20 req/s, 10 s through two gateways: {dict(codes)}")
    assert set(codes) <= {200, 429}
    assert 150 <= codes[200] <= 250  # 20 per second in total (within 25 %), not per gateway
    assert codes[429] > codes[200]  # they did send more than the limit


def test_a_killed_reconciler_is_replaced_within_ten_seconds(
    cluster: Cluster, deployed: dict[str, float]
) -> None:
    """kill -9 of the acting reconciler while both gateways serve: a second one (127.0.0.5,
    its own home with the same artifacts) takes the lease within 10 s, with the next fencing
    token; the dead one's engines stop on their own; the new holder's engines serve."""
    first = _holder(cluster.db_url)
    assert first is not None and str(first["holder"]).startswith("127.0.0.4:")
    old_pids = [e.pid for e in _table(cluster.db_url)]
    home = copy_home(cluster.reconciler_home, cluster.tmp / "host-5")
    standby = RunningGateway(
        home,
        env={**cluster.env, "KILN_ENGINE_HOST": "127.0.0.5"},
        host="127.0.0.5",
        role="reconciler",
        key=cluster.key,
    )
    codes: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not stop.is_set():
                gateway = cluster.gateways[i % 2]
                resp = http.post(
                    gateway.url + "/v2/models/digits/infer",
                    content=cluster.body(i),
                    headers=gateway.headers,
                )
                codes[resp.status_code] += 1
                i += 1

    loader = threading.Thread(target=load)
    try:
        standby.wait_ready()
        waiting = _holder(cluster.db_url)  # the standby only waits
        assert waiting is not None and waiting["holder"] == first["holder"]
        loader.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(cluster.reconciler.proc.pid, signal.SIGKILL)
        taken = _wait(
            "the standby holding the lease",
            lambda: str((_holder(cluster.db_url) or {}).get("holder", "")).startswith("127.0.0.5:"),
            timeout=15,
            period=0.1,
        )
        took = taken - killed_at
        new = _holder(cluster.db_url)
        assert new is not None and new["token"] == int(str(first["token"])) + 1
        _wait("the dead reconciler's engines gone", lambda: not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in old_pids
        ), timeout=30, period=0.2)  # fmt: skip
        served = _wait(
            "both gateways serving from the new holder's engines",
            lambda: (
                all(_ready(g, "0.1.0") for g in cluster.gateways)
                and all(
                    c.startswith("127.0.0.5:") for e in _table(cluster.db_url) for c in e.channels
                )
            ),
            timeout=180,
            period=0.2,
        )
        time.sleep(1.0)
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        standby.stop()
    print(
        f"lease taken over {took:.1f} s after the kill; serving again after "
        f"{served - killed_at:.1f} s; answers meanwhile: {dict(codes)}"
    )
    assert took < 10.0
    assert codes[200] > 0


class PrivateRedis:
    """A redis-server of this test's own on a free port (no persistence): one it may kill."""

    def __init__(self, tmp: Path) -> None:
        import shutil

        from serving.supervisor import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            require_service("redis-server is not installed (the Redis fault test runs its own)")
        self.binary = str(binary)
        self.port = free_port()
        self.dir = tmp
        self.proc: psutil.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.proc = psutil.Popen(command, stdout=open(self.dir / "redis.log", "ab"))  # noqa: SIM115
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        _wait("the private Redis answering", answers, timeout=10)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _gauge(gateway: RunningGateway, name: str) -> float:
    text = httpx.get(gateway.url + "/metrics", headers=gateway.headers, timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def _open_alerts(home: Path, kind: str) -> list[tuple[str, str, str | None]]:
    with session_scope(f"sqlite:///{home / 'registry.db'}") as session:
        return [
            (a.model_name, a.kind, a.version)
            for a in crud.open_alerts(session=session)
            if a.kind == kind
        ]


def test_redis_down_gateways_serve_on_local_limits_and_share_again_after(
    validated_home: Path, tmp_path: Path, examples: Path
) -> None:
    """Reliability scenario 28: Redis killed under load, then back. No request fails; a key's
    limit holds all along (counted by the gateway alone meanwhile); /metrics and an alert say
    so; shared counting resumes once Redis answers."""
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    home = copy_home(validated_home, tmp_path)
    done = run_kiln("deploy", "digits", "--strategy", "direct", "--json", env=kiln_env(home))
    assert done.returncode == 0, done.stderr
    env = {
        "KILN_RATE_LIMIT_STORAGE": redis_server.url,
        "KILN_ALERT_INTERVAL_S": "1",
        "KILN_ALERT_CLEAR_TICKS": "2",
    }
    x, _ = digits_rows(examples, 8)
    body = json.dumps(infer_request("x", x[:1])).encode()
    try:
        with RunningGateway(home, env=env) as gateway:
            created = run_kiln(
                "keys", "create", "--scope", "infer", "--rate", "10", "--json", env=gateway.env
            )
            assert created.returncode == 0, created.stderr
            limited = {"Authorization": f"Bearer {json.loads(created.stdout)['key']}"}

            def hammer(seconds: float) -> Counter[int]:
                codes: Counter[int] = Counter()
                end = time.monotonic() + seconds
                with httpx.Client(headers=limited, timeout=10) as http:
                    while time.monotonic() < end:
                        resp = http.post(gateway.url + "/v2/models/digits/infer", content=body)
                        codes[resp.status_code] += 1
                return codes

            shared = hammer(3.0)
            assert _gauge(gateway, "kiln_rate_limit_local_fallback") == 0.0
            redis_server.kill()
            down_at = time.monotonic()
            local = hammer(3.0)
            assert _gauge(gateway, "kiln_rate_limit_local_fallback") == 1.0
            _wait(
                "a rate_limit_local alert",
                lambda: _open_alerts(home, "rate_limit_local"),
                timeout=15,
                period=0.2,
            )
            (alert,) = _open_alerts(home, "rate_limit_local")
            assert alert[0] == "*" and alert[2] == gateway.url.removeprefix("http://")
            redis_server.start()
            back_at = time.monotonic()
            again: Counter[int] = Counter()
            while _gauge(gateway, "kiln_rate_limit_local_fallback") != 0.0:
                again += hammer(0.5)
                assert time.monotonic() - back_at < 15, "shared limits did not resume"
            resumed = time.monotonic() - back_at
            _wait(
                "the rate_limit_local alert resolved",
                lambda: not _open_alerts(home, "rate_limit_local"),
                timeout=15,
                period=0.2,
            )
            after = hammer(2.0)
            log = gateway.tail()
    finally:
        redis_server.kill()
    print(
        f"Redis up {dict(shared)}; down {dict(local)} (killed at +0, degraded "
        f"{back_at - down_at:.1f} s); back: shared again after {resumed:.1f} s, {dict(after)}"
    )
    for codes in (shared, local, again, after):
        assert set(codes) <= {200, 429}, codes  # no request failed
    # a 10/s key over 3 s: about 30 admitted (moving window), with Redis and without it
    for codes in (shared, local):
        assert 20 <= codes[200] <= 40 and codes[429] > 0, codes
    assert after[200] <= 30 and after[429] > 0
    assert "counting each key's rate on this gateway alone" in log
    assert "shared limits resume" in log
