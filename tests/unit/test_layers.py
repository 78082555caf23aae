"""The layer rules of pyproject.toml's import-linter contracts hold, and they bite.

``lint-imports`` runs over a copy of the repository's packages; a forbidden import written into
the copy (the registry importing a stage, the runtime importing a flow, a task importing a flow,
the core importing the runtime) must break the matching contract, so a wrong import fails CI
instead of a review.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("kiln", "serving", "tasks", "flows")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_repository_keeps_every_contract(tree: Path) -> None:
    proc = _lint(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "kiln/registry/views.py",
            "import kiln.optimize.pipeline",
            "the registry imports no stage",
        ),
        ("serving/heap.py", "import flows.deploy", "the runtime never imports the pipeline"),
        ("tasks/upload.py", "import flows.register", "tasks never import flows"),
        (
            "kiln/store/artifacts.py",
            "import serving.engine",
            "the core (all but kiln.cli) imports no",
        ),
        ("kiln/intake/formats.py", "import kiln.rollout.canary", "the core's layers"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    path = tree / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # added by the test\n")
        proc = _lint(tree)
    finally:
        path.write_text(original)
    assert proc.returncode != 0, proc.stdout
    broken = [ln for ln in proc.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), proc.stdout
