"""The deploy flow's canary against a real `kiln serve` (gateway, supervisor, ONNX Runtime
engines): a good canary is promoted, a bad one (errors, NaN, slow) rolled back with 0 failed
client requests, a worse candidate rejected before any traffic, and the operator commands
(`kiln promote`, `kiln rollback --to`, `kiln status`) on the same state.

Faults are injected into the candidate's engine only (``KILN_ENGINE_FAULTS=versions=...``).
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import (
    RunningGateway,
    copy_home,
    deploy,
    digits_rows,
    infer_request,
    kiln_env,
    register_variants,
    run_kiln,
    set_model_settings,
)

FAST_ROLLOUT = {
    "rollout": {"step_seconds": 3, "warmup_s": 3, "max_extra_s": 45, "replay_concurrency": 3}
}


@pytest.fixture(scope="module")
def canary_home(
    validated_home: Path, examples: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """digits 0.1.0 in production; 0.2.0 (its bias nudged by 1e-6: the same answers, other
    bytes) and 0.3.0 (always answers class 0: accuracy ~0.1) validated beside it."""
    home = copy_home(validated_home, tmp_path_factory.mktemp("canary"))
    made = register_variants(
        home, [{"version": "0.2.0", "bias": 1e-6}, {"version": "0.3.0", "favour": 0}]
    )
    assert made == ["0.2.0", "0.3.0"]
    set_model_settings(home, "digits", FAST_ROLLOUT)
    doc = deploy(home, "digits@0.1.0")
    assert doc["version"] == "0.1.0"
    return home


class Client:
    """~``rps`` single-row requests per second in a thread, each with a random routing key and
    up to 3 tries on a 5xx or a broken connection (a client that retries, as docs/reliability.md
    scenario 22's "no client failures (retried on stable)" assumes); counts final statuses."""

    def __init__(self, gateway: RunningGateway, examples: Path, rps: float = 20.0) -> None:
        self.gateway, self.rps = gateway, rps
        self.x, self.labels = digits_rows(examples, 64)
        self.statuses: dict[int, int] = {}
        self.versions: dict[str, int] = {}
        self.fallbacks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def failures(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != 200)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(headers=self.gateway.headers, timeout=15) as http:
            while not self._stop.is_set():
                i = rng.randrange(len(self.x))
                body = infer_request("x", self.x[i : i + 1])
                status = 0
                for _attempt in range(3):
                    try:
                        resp = http.post(
                            f"{self.gateway.url}/v2/models/digits/infer",
                            json=body,
                            headers={"X-Kiln-Routing-Key": str(rng.random())},
                        )
                        status = resp.status_code
                    except httpx.HTTPError:
                        status = 0
                    if status not in (0, 500, 503, 504):
                        break
                    time.sleep(0.2)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    version = resp.headers.get("kiln-model-version", "?")
                    self.versions[version] = self.versions.get(version, 0) + 1
                    self.fallbacks += "x-kiln-fallback" in resp.headers
                self._stop.wait(1 / self.rps)


@pytest.fixture
def home(canary_home: Path, tmp_path: Path) -> Iterator[Path]:
    yield copy_home(canary_home, tmp_path)


def deploy_canary(gateway: RunningGateway, ref: str, *extra: str) -> tuple[int, dict[str, object]]:
    proc = run_kiln("deploy", ref, "--json", *extra, env=gateway.env, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def registry_status(home: Path) -> dict[str, object]:
    proc = run_kiln("status", "--json", env=kiln_env(home))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["models"][0]  # type: ignore[no-any-return]


def test_a_good_canary_with_one_percent_errors_is_promoted(home: Path, examples: Path) -> None:
    faults = {"KILN_ENGINE_FAULTS": "versions=0.2.0,error_rate=0.01,seed=3"}
    # This test is about the error guardrail. On two saturated cores a 10 % canary's engine
    # gets its requests one by one while the stable batches them, and its tail can sit 2x the
    # stable's for a 3 s step (seen: 12-16 of ~200 requests over the 1.2x + 10 ms limit): a
    # wider latency slack here keeps that host effect out of it (the slow canary test below
    # keeps the default slack).
    set_model_settings(home, "digits", {"rollout": {**FAST_ROLLOUT["rollout"], "p99_slack_ms": 60}})
    with RunningGateway(home, env=faults) as gateway, Client(gateway, examples) as client:
        started = time.monotonic()
        code, doc = deploy_canary(gateway, "digits@0.2.0")
        seconds = time.monotonic() - started
        status = registry_status(home) | {}
        live = json.loads(run_kiln("status", "--json", env=gateway.env).stdout)["models"][0]
    print(
        f"FIGURE canary_promoted seconds={seconds:.1f} steps={len(doc['steps'])} "
        f"client={client.statuses} versions={client.versions}"
    )
    assert code == 0 and doc["outcome"] == "promoted", doc
    assert doc["strategy"] == "canary"
    assert [s["weight"] for s in doc["steps"]] == [0.1, 0.5, 1.0]  # type: ignore[index]
    assert doc["gate"]["passed"] is True  # type: ignore[index]
    assert status["stable"] == "0.2.0" and status["canary"] is None
    assert live["p99_ms"] is not None and live["rps"] is not None
    assert client.failures == 0, client.statuses
    assert client.versions.get("0.2.0", 0) > 0


@pytest.mark.parametrize("fault", ["error_rate=0.1", "nan_rate=0.1", "delay_ms=60"])
def test_a_bad_canary_is_rolled_back_without_failed_requests(
    home: Path, examples: Path, fault: str
) -> None:
    """docs/reliability.md scenario 22 (500s, NaN at 10 % of 20 rps) and a slow canary (p99)."""
    faults = {"KILN_ENGINE_FAULTS": f"versions=0.2.0,{fault},seed=5"}
    with RunningGateway(home, env=faults) as gateway, Client(gateway, examples) as client:
        code, doc = deploy_canary(gateway, "digits@0.2.0")
        time.sleep(1.0)  # traffic after the rollback: all stable
        after = dict(client.versions)
        time.sleep(1.0)
        status = registry_status(home)
    failing = doc["steps"][-1]  # type: ignore[index]
    print(
        f"FIGURE scenario=22 fault={fault} rollback_seconds={failing['seconds']} "
        f"step={failing['weight']} client={client.statuses} fallbacks={client.fallbacks} "
        f"reason={doc['reason']!r}"
    )
    assert code == 9 and doc["outcome"] == "rolled_back", doc
    expected = "p99" if fault.startswith("delay") else "error rate"
    assert expected in str(doc["reason"])
    assert status["stable"] == "0.1.0" and status["canary"] is None
    assert client.failures == 0, client.statuses
    assert client.versions == after or set(client.versions) - set(after) == set()


def test_a_worse_candidate_is_rejected_before_any_traffic(home: Path) -> None:
    proc = run_kiln("deploy", "digits@0.3.0", "--json", env=kiln_env(home), timeout=600)
    doc = json.loads(proc.stdout)
    print(f"FIGURE champion_gate gate={doc['gate']}")
    assert proc.returncode == 7 and doc["outcome"] == "rejected", doc
    gate = doc["gate"]
    assert gate["champion_metric"] > 0.9 and gate["candidate_metric"] < 0.5
    assert "champion/challenger" in doc["reason"] and "0.1.0" in doc["reason"]
    shown = json.loads(run_kiln("show", "digits@0.3.0", "--json", env=kiln_env(home)).stdout)
    assert shown["status"] == "rejected"
    status = registry_status(home)
    assert status["stable"] == "0.1.0" and status["canary"] is None
    # a re-run changes nothing and says so
    again = json.loads(run_kiln("deploy", "digits@0.3.0", "--json", env=kiln_env(home)).stdout)
    assert again["outcome"] == "rejected" and "rejected before" in again["reason"]


def test_promote_rollback_to_and_status_commands(home: Path) -> None:
    env = kiln_env(home)
    # a canary set by hand (weight 0.3), promoted by hand
    code = (
        "import sys; from kiln.registry import crud; from kiln.registry.db import session_scope; "
        "from kiln.settings import get_settings\n"
        "with session_scope(get_settings().db_url) as s:\n"
        "    v = crud.require_version(session=s, name='digits', version='0.2.0')\n"
        "    crud.start_canary(session=s, version=v, weight=0.3)"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    status = registry_status(home)
    assert status["canary"] == "0.2.0" and status["canary_weight"] == 0.3
    assert status["p99_ms"] is None  # no gateway: figures are null, not made up
    promoted = run_kiln("promote", "digits", "--json", env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["previous"] == "0.1.0"
    assert registry_status(home)["stable"] == "0.2.0"
    again = run_kiln("promote", "digits", env=env)
    assert again.returncode == 4 and "no canary" in again.stderr

    # rollback to 0.1.0 with its artifact gone from the store: pulled back from the DVC remote
    shown = json.loads(run_kiln("show", "digits@0.1.0", "--json", env=env).stdout)
    selected = next(a for a in shown["artifacts"] if a["selected"])
    artifact = (
        home / "objects" / selected["path"]
        if not Path(selected["path"]).is_absolute()
        else Path(selected["path"])
    )
    if not artifact.exists():
        artifact = next(
            p
            for p in home.rglob(Path(selected["path"]).name)
            if p.is_file()
            and ".dvc" not in p.suffixes
            and "cache" not in p.parts
            and "remote" not in p.parts
        )
    artifact.unlink()
    back = run_kiln("rollback", "digits", "--to", "0.1.0", "--json", env=env)
    assert back.returncode == 0, back.stderr
    doc = json.loads(back.stdout)
    assert doc["restored"] is True and artifact.is_file()
    assert registry_status(home)["stable"] == "0.1.0"
    bad = run_kiln("rollback", "digits", "--to", "0.3.0", env=env)
    assert bad.returncode != 0 and "retired" in bad.stderr
    shutil.rmtree(home / "logs", ignore_errors=True)


def test_rollback_figures_are_null_without_traffic() -> None:
    from kiln.rollout.commands import _merge

    assert _merge({}) == {}
    merged = _merge(
        {
            "0.1.0": {"requests": 90, "errors": 0, "p50_ms": 1.0, "p99_ms": 3.0, "rps": 9.0},
            "0.2.0": {"requests": 10, "errors": 1, "p50_ms": 2.0, "p99_ms": 5.0, "rps": 1.0},
        }
    )
    assert merged["error_rate"] == pytest.approx(0.01)
    assert merged["p50_ms"] == pytest.approx(1.1) and merged["p99_ms"] == 5.0
    assert merged["rps"] == 10.0
    assert np.isfinite(merged["p50_ms"])
