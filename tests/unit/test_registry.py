"""The registry on SQLite and PostgreSQL: migrations, CRUD, lifecycle, constraints."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import Session, SQLModel

from kiln import crud
from kiln.db import dispose_engines, engine_for, migrate, session_scope
from kiln.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from kiln.registry import TRANSITIONS, ModelVersion, Task, VersionStatus

SHA = "ab" * 32


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    dispose_engines()


def _model_and_version(session: Session, version: str = "0.1.0") -> ModelVersion:
    model = crud.get_model(session=session, name="m") or crud.create_model(
        session=session, name="m", task=Task.classification)
    return crud.create_version(session=session, model=model, version=version,
                               source_format="pt2", source_sha256=SHA, spec={"inputs": []})


def test_migrations_match_the_models(db_url: str) -> None:
    engine = engine_for(db_url)
    migrate(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert diff == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_sqlite_runs_wal_with_foreign_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with engine_for(url).connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_crud_round_trip(db_url: str) -> None:
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        crud.add_artifact(session=session, version=row, kind="source", path="objects/ab/x.pt2",
                          sha256=SHA, size=10, selected=True)
    with session_scope(db_url) as session:
        found = crud.require_version(session=session, name="m")
        assert found.version == "0.1.0" and found.status == VersionStatus.uploaded
        [artifact] = crud.list_artifacts(session=session, version=found)
        assert artifact.sha256 == SHA and artifact.selected
        model = crud.require_model(session=session, name="m")
        assert crud.next_version(session=session, model=model) == "0.1.1"
        with pytest.raises(NotFound):
            crud.require_version(session=session, name="m", version="9.9.9")
        with pytest.raises(NotFound):
            crud.require_model(session=session, name="nope")


def test_versions_sort_by_semver_not_text(db_url: str) -> None:
    with session_scope(db_url) as session:
        for v in ("0.2.0", "0.10.0", "0.9.1"):
            _model_and_version(session, v)
        model = crud.require_model(session=session, name="m")
        assert [v.version for v in crud.list_versions(session=session, model=model)] == [
            "0.2.0", "0.9.1", "0.10.0"]
        assert crud.next_version(session=session, model=model) == "0.10.1"


def test_versions_are_unique_and_semver(db_url: str) -> None:
    with session_scope(db_url) as session:
        _model_and_version(session)
        with pytest.raises(Conflict):
            _model_and_version(session)
        with pytest.raises(InvalidInput, match="semver"):
            _model_and_version(session, "v1")


def test_database_enforces_unique_version(db_url: str) -> None:
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        session.add(ModelVersion(model_id=row.model_id, version="0.1.0", source_format="pt2",
                                 source_sha256=SHA))
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            session.flush()
        session.rollback()


def test_database_enforces_foreign_keys(db_url: str) -> None:
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with session_scope(db_url) as session:
            session.add(ModelVersion(model_id=12345, version="0.1.0", source_format="pt2",
                                     source_sha256=SHA))


ALL_PAIRS = list(itertools.product(VersionStatus, VersionStatus))


def _path_to(status: VersionStatus) -> list[VersionStatus]:
    """A legal route from `uploaded` to ``status`` (breadth-first over TRANSITIONS)."""
    routes = {VersionStatus.uploaded: [VersionStatus.uploaded]}
    frontier = [VersionStatus.uploaded]
    while frontier:
        nxt = []
        for s in frontier:
            for t in TRANSITIONS[s]:
                if t not in routes:
                    routes[t] = [*routes[s], t]
                    nxt.append(t)
        frontier = nxt
    return routes[status]


@pytest.mark.parametrize(("start", "end"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_lifecycle_edges(tmp_path, start: VersionStatus, end: VersionStatus) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with session_scope(url) as session:
        row = _model_and_version(session)
        for step in _path_to(start)[1:]:
            crud.set_version_status(session=session, version=row, status=step)
        assert row.status == start
        if end in TRANSITIONS[start]:
            crud.set_version_status(session=session, version=row, status=end)
            assert row.status == end
        else:
            with pytest.raises(IllegalTransition, match=f"from {start} to {end}"):
                crud.set_version_status(session=session, version=row, status=end)
            assert row.status == start


def test_lifecycle_is_the_design(tmp_path) -> None:
    edges = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == {
        ("uploaded", "optimizing"), ("optimizing", "validated"), ("optimizing", "rejected"),
        ("validated", "canary"), ("validated", "production"), ("validated", "rejected"),
        ("canary", "production"), ("canary", "rolled_back"), ("production", "retired"),
        ("retired", "production"), ("rolled_back", "canary"),
    }


def test_api_keys_are_stored_hashed(db_url: str) -> None:
    with session_scope(db_url) as session:
        key, row = crud.create_api_key(session=session, scopes=["infer"])
        assert key not in row.key_hash and key.startswith(row.prefix)
    with session_scope(db_url) as session:
        assert crud.find_api_key(session=session, key=key) is not None
        crud.revoke_api_key(session=session, prefix=row.prefix)
        assert crud.find_api_key(session=session, key=key) is None
        assert crud.find_api_key(session=session, key="kiln_x.unknown") is None
        with pytest.raises(InvalidInput):
            crud.create_api_key(session=session, scopes=["root"])
