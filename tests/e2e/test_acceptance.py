"""The acceptance journey on a fresh copy of the repository: `dvc repro`, then `kiln upload`.

The copy holds exactly the files git would see (tracked and untracked, not ignored), so the
example data and models are reproduced from the scripts and ``dvc.yaml`` alone, offline. Then the
three examples are registered through the real `kiln` CLI into a new KILN_HOME.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_kiln

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REPRO_TIMEOUT_S = 420


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in out.split("\0") if name]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project with the examples reproduced by `dvc repro`."""
    copy = tmp_path_factory.mktemp("acceptance") / "repo"
    for name in _git_files(REPO):
        src = REPO / name
        if not src.is_file():  # tracked but deleted in the working tree
            continue
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, copy / name)
    assert "build_minilm" in (copy / "dvc.yaml").read_text()
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=REPRO_TIMEOUT_S,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for out in (
        "data/digits/model.pt2",
        "data/breast_cancer/model.pt2",
        "data/breast_cancer/val.npz",
        "data/minilm/model/kiln.yaml",
        "data/minilm/sentences.npz",
    ):
        assert (copy / out).is_file(), f"dvc repro did not produce {out}"
    return copy


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new KILN_HOME with the default SQLite registry and local DVC remote."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_DVC_REMOTE", raising=False)
    return tmp_path / "home"


def _kiln_json(*args: str, cwd: Path) -> Any:
    proc = run_kiln(*args, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is exactly one JSON document


def _assert_stored(artifact: dict[str, Any], sha: str, home: Path) -> None:
    path = Path(artifact["path"])
    assert artifact["sha256"] == sha
    assert path.is_relative_to(home / "objects") and path.is_file()
    assert _sha256(path) == sha


def test_upload_digits_and_show_it(repo: Path, home: Path) -> None:
    source = repo / "data/digits/model.pt2"
    sha = _sha256(source)
    uploaded = _kiln_json("upload", "digits", "data/digits/model.pt2", cwd=repo)
    assert {k: uploaded[k] for k in ("name", "version", "sha256", "status")} == {
        "name": "digits",
        "version": "0.1.0",
        "sha256": sha,
        "status": "uploaded",
    }

    shown = _kiln_json("show", "digits", cwd=repo)
    assert shown["name"] == "digits" and shown["version"] == "0.1.0"
    assert shown["status"] == "uploaded" and shown["jobs"] == []
    [artifact] = [a for a in shown["artifacts"] if a["sha256"] == sha]
    assert artifact["kind"] == "source" and artifact["selected"] is True
    assert {"kind", "backend", "precision", "sha256", "path", "selected"} <= set(artifact)
    _assert_stored(artifact, sha, home)
    assert Path(artifact["path"]).read_bytes() == source.read_bytes()


def test_upload_examples_with_their_datasets(repo: Path, home: Path) -> None:
    cases = [
        ("minilm", "data/minilm/model", "data/minilm/sentences.npz", "embedding"),
        (
            "breast-cancer",
            "data/breast_cancer/model.pt2",
            "data/breast_cancer/val.npz",
            "classification",
        ),
    ]
    for name, source, dataset, task in cases:
        uploaded = _kiln_json("upload", name, source, "--dataset", dataset, cwd=repo)
        assert uploaded["name"] == name and uploaded["version"] == "0.1.0"
        assert uploaded["status"] == "uploaded" and uploaded["created"] is True
        check = uploaded["dataset"]
        assert check["check_passed"] is True and check["failures"] == [], check
        assert check["sha256"] == _sha256(repo / dataset) and check["rows"] > 0

        shown = _kiln_json("show", name, cwd=repo)
        assert shown["task"] == task and shown["sha256"] == uploaded["sha256"]
        [artifact] = shown["artifacts"]
        _assert_stored(artifact, uploaded["sha256"], home)
        [registered] = shown["datasets"]
        assert registered["check_passed"] is True
        assert _sha256(Path(registered["path"])) == _sha256(repo / dataset)

    models = _kiln_json("models", cwd=repo)
    assert sorted(m["name"] for m in models["models"]) == ["breast-cancer", "minilm"]
    for model in models["models"]:
        assert [v["version"] for v in model["versions"]] == ["0.1.0"]


def test_dvc_metrics_and_plots_of_the_optimize_stage(repo: Path) -> None:
    """`dvc repro` ran Kiln's optimize flow on digits: its metrics and plots are readable."""
    metrics = json.loads((repo / "data/digits/optimize/metrics.json").read_text())
    assert metrics["variants_passed"] >= 1 and metrics["speedup_serving_batch"] > 1.0
    assert metrics["accuracy_drop"] <= 0.005
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    shown = subprocess.run(
        [str(VENV_BIN / "dvc"), "metrics", "show", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "speedup_serving_batch" in shown.stdout
    plots = subprocess.run(
        [str(VENV_BIN / "dvc"), "plots", "show", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plots.returncode == 0, plots.stderr
    assert "variants.csv" in plots.stdout


def test_optimize_digits_on_a_clean_clone(repo: Path) -> None:
    """The optimization journey's promise: upload digits, `kiln optimize digits --json` selects a passing
    variant faster than the baseline. `dvc repro` above ran exactly these two commands in the
    clean copy (data/optimize_digits.py, a private KILN_HOME) and kept what optimize printed."""
    doc = json.loads((repo / "data/digits/optimize/optimize.json").read_text())
    assert doc["status"] == "validated", doc["reason"]
    selected = doc["selected"]
    assert selected["passed"] and selected["backend"] != "torch-eager"
    assert selected["speedup"] >= 1.1
