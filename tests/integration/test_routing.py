"""Routing with real processes: stable/canary weights with sticky routing keys, the result cache,
the fallback model when every engine of a model is down, and scaling out under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import (
    RunningGateway,
    copy_home,
    deploy,
    digits_rows,
    infer_request,
    kiln_env,
    register_variants,
    set_model_settings,
)

CANARY_WEIGHT = 0.3


def _set_canary(home: Path, name: str, version: str, weight: float) -> None:
    code = (
        "import sys; from kiln.registry import crud; from kiln.registry.db import session_scope; "
        "from kiln.settings import get_settings\n"
        "with session_scope(get_settings().db_url) as s:\n"
        "    v = crud.require_version(session=s, name=sys.argv[1], version=sys.argv[2])\n"
        "    crud.start_canary(session=s, version=v, weight=float(sys.argv[3]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, name, version, str(weight)],
        env=kiln_env(home),
        check=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def routed(
    validated_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """digits: stable 0.1.0 + canary 0.1.1 at 30 %, result cache on, fallback digits-lite."""
    tmp = tmp_path_factory.mktemp("routing")
    home = copy_home(validated_home, tmp)
    # the canary (0.1.1) and the fallback model: the first version's ONNX file with its last
    # bias nudged (other bytes, the same answers), registered validated (conftest)
    canary, _ = register_variants(home, [{"bias": 0.01}, {"bias": 0.02, "model": "digits-lite"}])
    deploy(home, "digits@0.1.0")
    deploy(home, "digits-lite")
    _set_canary(home, "digits", canary, CANARY_WEIGHT)
    set_model_settings(
        home, "digits", {"serving": {"result_cache": 64, "fallback_model": "digits-lite"}}
    )
    with RunningGateway(home) as gateway:
        yield gateway


def _body(examples: Path, row: int) -> bytes:
    x, _ = digits_rows(examples, row + 1)
    return json.dumps(infer_request("x", x[row : row + 1])).encode()


def _metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    text = httpx.get(gateway.url + "/metrics", headers=gateway.headers).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_canary_weight_and_sticky_routing_keys(routed: RunningGateway, examples: Path) -> None:
    url = routed.url + "/v2/models/digits/infer"
    seen: dict[str, set[str]] = {}
    with httpx.Client(headers=routed.headers, timeout=30) as http:
        for i in range(300):
            key = f"client-{i % 100}"
            resp = http.post(
                url, content=_body(examples, i % 50), headers={"X-Kiln-Routing-Key": key}
            )
            assert resp.status_code == 200, resp.text
            seen.setdefault(key, set()).add(resp.headers["kiln-model-version"])
    assert all(len(v) == 1 for v in seen.values()), "a routing key moved between versions"
    canary_share = sum("0.1.1" in v for v in seen.values()) / len(seen)
    print(f"canary share over 100 routing keys: {canary_share:.2f} (weight {CANARY_WEIGHT})")
    assert 0.12 < canary_share < 0.5
    pinned = httpx.post(
        routed.url + "/v2/models/digits/versions/0.1.0/infer",
        content=_body(examples, 0),
        headers=routed.headers,
    )
    assert pinned.headers["kiln-model-version"] == "0.1.0"


def test_result_cache_answers_repeats_without_the_engine(
    routed: RunningGateway, examples: Path
) -> None:
    url = routed.url + "/v2/models/digits/versions/0.1.0/infer"
    body = _body(examples, 7)
    before = _metric(routed, "kiln_result_cache_hits_total", model="digits")
    first = httpx.post(url, content=body, headers=routed.headers)
    again = [httpx.post(url, content=body, headers=routed.headers) for _ in range(5)]
    assert all(r.json()["outputs"] == first.json()["outputs"] for r in again)
    assert _metric(routed, "kiln_result_cache_hits_total", model="digits") - before >= 5


def test_fallback_model_answers_when_every_engine_is_down(
    routed: RunningGateway, examples: Path
) -> None:
    gateway_proc = psutil.Process(routed.proc.pid)
    digits_engines = [
        c
        for c in gateway_proc.children()
        if "serving.engine" in " ".join(c.cmdline()) and "digits-lite" not in c.cmdline()
    ]
    assert len(digits_engines) == 2  # stable and canary
    for engine in digits_engines:
        os.killpg(engine.pid, signal.SIGKILL)
    codes, fallbacks = [], []
    with httpx.Client(headers=routed.headers, timeout=30) as http:
        for i in range(20):  # inputs no earlier test sent: no cache hits
            resp = http.post(
                routed.url + "/v2/models/digits/infer", content=_body(examples, 100 + i)
            )
            codes.append(resp.status_code)
            fallbacks.append(resp.headers.get("x-kiln-fallback", ""))
    print(
        f"after killing digits' engines: {codes.count(200)}/20 answered, "
        f"{sum(bool(f) for f in fallbacks)} by the fallback model"
    )
    assert codes == [200] * 20
    assert sum("digits-lite" in f for f in fallbacks) >= 10
    routed.wait_ready(timeout=120)  # the supervisor restarts them


def test_scales_out_under_load(routed: RunningGateway, examples: Path) -> None:
    set_model_settings(
        routed.home,
        "digits-lite",
        {"serving": {"min_replicas": 1, "max_replicas": 2, "target_outstanding": 1}},
    )
    url = routed.url + "/v2/models/digits-lite/infer"

    def engines() -> int:
        return sum(
            1 for c in psutil.Process(routed.proc.pid).children() if "digits-lite" in c.cmdline()
        )

    assert engines() == 1
    stop = time.monotonic() + 60

    def hammer(i: int) -> int:
        done = 0
        with httpx.Client(headers=routed.headers, timeout=30) as http:
            while time.monotonic() < stop and engines() < 2:
                http.post(url, content=_body(examples, i % 50))
                done += 1
        return done

    with ThreadPoolExecutor(16) as pool:
        sent = sum(pool.map(hammer, range(16)))
    print(f"replicas of digits-lite after {sent} requests at concurrency 16: {engines()}")
    assert engines() == 2


def test_scaling_in_drains_without_dropping_requests(
    routed: RunningGateway, examples: Path
) -> None:
    """Lowering max_replicas drains the extra replica: it takes no new request, finishes what
    it has, then stops; clients see no failure."""
    url = routed.url + "/v2/models/digits-lite/infer"

    def engines() -> int:
        return sum(
            1
            for c in psutil.Process(routed.proc.pid).children()
            if "digits-lite" in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE
        )

    def ready() -> float:
        return _metric(routed, "kiln_engine_up", model="digits-lite")

    deadline = time.monotonic() + 90
    while ready() < 2 and time.monotonic() < deadline:  # after the scale-out test
        time.sleep(0.5)
    assert engines() == 2 and ready() == 2  # both serve: the drained one has work to finish
    stop = time.monotonic() + 8

    errors: list[str] = []

    def client(i: int) -> list[int]:
        codes = []
        with httpx.Client(headers=routed.headers, timeout=30) as http:
            while time.monotonic() < stop:
                resp = http.post(url, content=_body(examples, i % 50))
                codes.append(resp.status_code)
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")
        return codes

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        time.sleep(2)
        set_model_settings(
            routed.home, "digits-lite", {"serving": {"min_replicas": 1, "max_replicas": 1}}
        )
        codes = [c for f in futures for c in f.result()]
    deadline = time.monotonic() + 30
    while engines() > 1 and time.monotonic() < deadline:
        time.sleep(0.25)
    failed = [c for c in codes if c != 200]
    print(
        f"scale-in under load: {len(codes)} requests, {len(failed)} failed, "
        f"replicas now {engines()}"
    )
    assert engines() == 1
    assert failed == [], errors[:3]
