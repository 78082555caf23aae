"""Shared fixtures: every test gets its own KILN_HOME, registry and DVC remote.

Tests are marked by folder (unit / integration / e2e). Fixtures own every temp dir, schema and
process they create, and remove them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.settings import apply_privacy_env

REPO = Path(__file__).resolve().parents[1]
PG_BASE = os.environ.get("KILN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
apply_privacy_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        scope = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if scope in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, scope))


def _reset_caches() -> None:
    from kiln.db import dispose_engines
    from kiln.settings import get_settings

    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture
def kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh KILN_HOME (SQLite registry, local DVC remote) for this test."""
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_DVC_REMOTE", raising=False)
    _reset_caches()
    yield home
    _reset_caches()


def _pg_schema_url(schema: str) -> str:
    return f"{PG_BASE}?options=-csearch_path%3D{schema}"


def _pg_exec(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        _pg_exec("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at 127.0.0.1:5432 (database test) does not answer: {exc}"[:300]
    return None


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A private schema in PostgreSQL's `test` database, dropped afterwards."""
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    schema = f"kiln_{uuid.uuid4().hex[:10]}"
    _pg_exec(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(schema)
    finally:
        _reset_caches()
        _pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry URL under test: SQLite in tmp_path, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer classifier exported with torch.export (dynamic batch) to a .pt2."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 8)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),),
                                  dynamic_shapes={"x": {0: batch}})
    path = tmp_path_factory.mktemp("models") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


def run_kiln(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `kiln` console script in a child process."""
    kiln = Path(sys.executable).with_name("kiln")
    return subprocess.run([str(kiln), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def run_data_script(script: str, *args: str | Path) -> None:
    """Run one of data/'s scripts as `dvc repro` does (a subprocess from the repo root)."""
    proc = subprocess.run([sys.executable, str(REPO / "data" / script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models and data, built once per session as `dvc repro` builds them.

    Layout: ``digits/{train,val,test}.npz, model.pt2``, ``breast_cancer/...`` and
    ``minilm/{model/, sentences.npz}``.
    """
    root = tmp_path_factory.mktemp("examples")
    for name in ("digits", "breast_cancer"):
        run_data_script(f"prepare_{name}.py", "--out", root / name)
        run_data_script(f"train_{name}.py", "--data", root / name, "--out", root / name)
    run_data_script("build_minilm.py", "--out", root / "minilm")
    return root
