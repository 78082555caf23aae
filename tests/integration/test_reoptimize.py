"""The reoptimize flow against a real `kiln serve`: digits in production as its slow eager
baseline (optimized with every optimization turned off); the model's settings then allow ONNX
Runtime fp32, and re-optimization registers 0.1.1 (same source, ``reoptimized_from``), finds it
faster at equal accuracy, and takes it through the canary to production. A second run finds
nothing faster (the same artifact): "no improvement", and the registry and the artifact store
are exactly as before it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    RunningGateway,
    deploy,
    kiln_env,
    repo_digits,
    run_kiln,
    set_model_settings,
    upload_digits,
)

# short steps; the extra time a step may wait for enough requests is generous, because on a
# loaded CI host the eager stable answers slowly and a 10 % step needs 200 canary requests
FAST_ROLLOUT = {"rollout": {"step_seconds": 3, "max_extra_s": 150, "replay_concurrency": 4}}
EAGER_ONLY = {"optimize": {"backends": ["torch-eager"]}}  # no variant: the baseline is served
ORT_FP32 = {"optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}}
TABLES = (
    "model",
    "modelversion",
    "artifact",
    "dataset",
    "optimizationjob",
    "deployment",
    "deploymentevent",
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt2 and val.npz: the repo's `dvc repro` outputs when present, else built here."""
    return repo_digits(tmp_path_factory.mktemp("digits"), "model.pt2", "val.npz")


@pytest.fixture
def weak_home(digits: Path, tmp_path: Path) -> Path:
    """digits 0.1.0 in production serving its fp32 eager baseline (no optimization built)."""
    home = tmp_path / "kiln-home"
    env = kiln_env(home)
    upload_digits(digits, env=env)
    set_model_settings(home, "digits", {**EAGER_ONLY, **FAST_ROLLOUT})
    opt = run_kiln("optimize", "digits", "--json", env=env, timeout=900)
    assert opt.returncode == 0, opt.stderr[-3000:]
    assert json.loads(opt.stdout)["selected"]["backend"] == "torch-eager"
    assert deploy(home, "digits")["version"] == "0.1.0"
    return home


def run_reoptimize(env: dict[str, str], out: Path, **kwargs: object) -> dict:
    """The flow in a child process (its own Prefect ephemeral API), as the CLI runs flows."""
    code = (
        "import json, sys\n"
        "from flows.reoptimize import reoptimize\n"
        "doc = reoptimize(**json.loads(sys.argv[1]))\n"
        "open(sys.argv[2], 'w').write(json.dumps(doc))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs), str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def snapshot(home: Path) -> dict[str, object]:
    """What "nothing changed" means: `kiln models --json`, the store's files (objects, DVC
    pointers, DVC cache) and every registry row that records versions and their history."""
    models = run_kiln("models", "--json", env=kiln_env(home))
    assert models.returncode == 0, models.stderr
    files = sorted(
        p.relative_to(home).as_posix()
        for root in ("objects", ".dvc/cache")
        for p in (home / root).rglob("*")
    )
    with sqlite3.connect(home / "registry.db") as db:
        rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}
    return {"models": json.loads(models.stdout), "files": files, "rows": rows}


def version_meta(home: Path, version: str) -> dict[str, object]:
    with sqlite3.connect(home / "registry.db") as db:
        row = db.execute("SELECT meta FROM modelversion WHERE version = ?", (version,)).fetchone()
    assert row is not None, version
    return json.loads(row[0])  # type: ignore[no-any-return]


def test_reoptimize_promotes_a_faster_build_then_changes_nothing(
    weak_home: Path, tmp_path: Path
) -> None:
    home = weak_home
    set_model_settings(home, "digits", ORT_FP32)  # today's settings: ONNX Runtime allowed
    with RunningGateway(home) as gateway:
        started = time.monotonic()
        first = run_reoptimize(gateway.env, tmp_path / "first.json")
        first_s = time.monotonic() - started
        status = json.loads(run_kiln("status", "--json", env=gateway.env).stdout)["models"][0]
        before = snapshot(home)
        started = time.monotonic()
        second = run_reoptimize(gateway.env, tmp_path / "second.json", model="digits")
        second_s = time.monotonic() - started
        after = snapshot(home)
    print(
        f"FIGURE reoptimize first={first_s:.1f}s second={second_s:.1f}s "
        f"first={json.dumps(first['models'][0].get('comparison'))} "
        f"second={second['models'][0]['reason']!r}"
    )

    [row] = first["models"]
    assert row["model"] == "digits" and row["production"] == "0.1.0", row
    assert row["candidate"] == "0.1.1", row
    assert row["outcome"] == "promoted", (row["reason"], row.get("deploy"))
    assert row["speedup"] >= 1.1, row
    assert row["comparison"]["candidate_variant"] == "onnxruntime/fp32", row
    assert row["comparison"]["production_variant"] == "torch-eager/fp32", row
    assert row["deploy"]["strategy"] == "canary", row
    assert [s["weight"] for s in row["deploy"]["steps"]] == [0.1, 0.5, 1.0], row
    assert status["stable"] == "0.1.1" and status["canary"] is None, status
    assert version_meta(home, "0.1.1")["reoptimized_from"] == "0.1.0"
    versions = {v["version"]: v for v in before["models"]["models"][0]["versions"]}
    assert versions["0.1.0"]["status"] == "retired"
    assert versions["0.1.1"]["status"] == "production"
    assert versions["0.1.1"]["sha256"] == versions["0.1.0"]["sha256"]  # the same source

    [again] = second["models"]
    assert again["production"] == "0.1.1" and again["candidate"] == "0.1.2", again
    assert again["outcome"] == "no improvement", again
    assert after == before  # the candidate's rows and stored objects are gone again

    # deleting is only for versions that never reached traffic: the served ones are refused
    from kiln.errors import IllegalTransition
    from kiln.registry import crud
    from kiln.registry.db import dispose_engines, session_scope

    url = f"sqlite:///{home / 'registry.db'}"
    try:
        for version in ("0.1.0", "0.1.1"):  # retired, production
            with (
                pytest.raises(IllegalTransition, match="never deployed"),
                session_scope(url) as session,
            ):
                row = crud.require_version(session=session, name="digits", version=version)
                crud.delete_version(session=session, version=row)
    finally:
        dispose_engines()
    assert snapshot(home) == before
