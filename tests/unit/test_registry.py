"""The registry on SQLite and PostgreSQL: migrations, CRUD, lifecycle, constraints."""

from __future__ import annotations

import functools
import itertools

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import Session, SQLModel

from kiln.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from kiln.registry import crud
from kiln.registry.db import dispose_engines, engine_for, migrate, session_scope
from kiln.registry.tables import TRANSITIONS, ModelVersion, Task, VersionStatus

SHA = "ab" * 32


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    dispose_engines()


def _model_and_version(session: Session, version: str = "0.1.0") -> ModelVersion:
    model = crud.get_model(session=session, name="m") or crud.create_model(
        session=session, name="m", task=Task.classification
    )
    return crud.create_version(
        session=session,
        model=model,
        version=version,
        source_format="pt2",
        source_sha256=SHA,
        spec={"inputs": []},
    )


def test_migrations_match_the_models(db_url: str) -> None:
    engine = engine_for(db_url)
    migrate(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert diff == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"


def test_sqlite_runs_wal_with_foreign_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with engine_for(url).connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_crud_round_trip(db_url: str) -> None:
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        crud.add_artifact(
            session=session,
            version=row,
            kind="source",
            path="objects/ab/x.pt2",
            sha256=SHA,
            size=10,
            selected=True,
        )
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
            "0.2.0",
            "0.9.1",
            "0.10.0",
        ]
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
        session.add(
            ModelVersion(
                model_id=row.model_id, version="0.1.0", source_format="pt2", source_sha256=SHA
            )
        )
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            session.flush()
        session.rollback()


def test_database_enforces_foreign_keys(db_url: str) -> None:
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with session_scope(db_url) as session:
            session.add(
                ModelVersion(
                    model_id=12345, version="0.1.0", source_format="pt2", source_sha256=SHA
                )
            )


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
        ("uploaded", "optimizing"),
        ("optimizing", "validated"),
        ("optimizing", "rejected"),
        ("validated", "canary"),
        ("validated", "production"),
        ("validated", "rejected"),
        ("canary", "production"),
        ("canary", "rolled_back"),
        ("production", "retired"),
        ("retired", "production"),
        ("rolled_back", "canary"),
    }


def test_api_keys_are_stored_hashed(db_url: str) -> None:
    with session_scope(db_url) as session:
        issued = crud.create_api_key(session=session, scopes=["infer"])
        key, row = issued.key, issued.row
        assert key not in row.key_hash and key.startswith(row.prefix)
    with session_scope(db_url) as session:
        assert crud.find_api_key(session=session, key=key) is not None
        crud.revoke_api_key(session=session, prefix=row.prefix)
        assert crud.find_api_key(session=session, key=key) is None
        assert crud.find_api_key(session=session, key="kiln_x.unknown") is None
        with pytest.raises(InvalidInput):
            crud.create_api_key(session=session, scopes=["root"])


def test_alerts_open_once_refresh_and_resolve(db_url: str) -> None:
    with session_scope(db_url) as session:
        p99 = functools.partial(
            crud.raise_alert, session=session, model="m", kind="p99", version="0.1.0", threshold=50
        )
        first = p99(message="p99 120 ms over 50 ms", value=120)
        assert first.opened
        again = p99(message="p99 130 ms over 50 ms", value=130)
        assert not again.opened and again.alert.id == first.alert.id and again.alert.value == 130
        other = crud.raise_alert(
            session=session, model="m", kind="engine_down", version="0.1.0", message="no engine"
        )
        assert other.opened and other.alert.id != first.alert.id
    with session_scope(db_url) as session:
        assert {a.kind for a in crud.open_alerts(session=session, model="m")} == {
            "p99",
            "engine_down",
        }
        alert = crud.find_open_alert(session=session, model="m", kind="p99", version="0.1.0")
        assert alert is not None
        crud.resolve_alert(session=session, alert=alert, detail={"cleared_at_ms": 12})
    with session_scope(db_url) as session:
        assert [a.kind for a in crud.open_alerts(session=session)] == ["engine_down"]
        resolved = crud.list_alerts(session=session, model="m")[-1]
        assert resolved.state == "resolved" and resolved.resolved_at is not None
        assert resolved.detail["cleared_at_ms"] == 12
        # the next breach is a new alert, not the resolved one reopened
        assert crud.raise_alert(
            session=session, model="m", kind="p99", version="0.1.0", message="again"
        ).opened


def test_inference_records_round_trip_and_retention(db_url: str) -> None:
    from datetime import timedelta

    import numpy as np

    from kiln.registry import records
    from kiln.registry.tables import InferenceRecord, utcnow

    now = utcnow()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    rows = [
        InferenceRecord(
            model_name="m",
            version="0.1.0",
            input=records.encode({"x": x}),
            output=records.encode({"y": x[:, :1]}),
            latency_ms=1.5,
            timestamp=now - timedelta(days=age),
        )
        for age in (0, 1, 10)
    ]
    with session_scope(db_url) as session:
        assert crud.add_inference_records(session=session, records=rows) == 3
    with session_scope(db_url) as session:
        recent = crud.recent_inferences(session=session, model="m", since=now - timedelta(days=2))
        assert len(recent) == 2
        np.testing.assert_array_equal(
            records.rows([r.input for r in recent], "x"), np.concatenate([x, x])
        )
        assert crud.purge_inferences(session=session, older_than=now - timedelta(days=7)) == 1
    with session_scope(db_url) as session:
        assert len(crud.recent_inferences(session=session, model="m")) == 2


def test_bulk_inference_rows_from_arrays_read_back_as_sent(db_url: str) -> None:
    """The gateway writer's path: tensors left as arrays (orjson writes them), NaN as null."""
    import numpy as np

    from kiln.registry import records
    from kiln.registry.tables import utcnow

    x = np.array([[0.1, np.nan, -2.5, 1e-7]], dtype=np.float32)
    y = np.array([[3, 1]], dtype=np.int64)
    text = np.array([b"caf\xc3\xa9", b"\xff"], dtype=object)
    row = {
        "model_name": "m",
        "version": "0.1.0",
        "input": records.encode({"x": x, "t": text}, arrays=True),
        "output": records.encode({"y": y}, arrays=True),
        "latency_ms": 2.0,
        "status": 200,
        "batch_id": None,
        "timestamp": utcnow(),
    }
    assert isinstance(row["input"]["x"]["data"], np.ndarray)
    with session_scope(db_url) as session:
        assert crud.insert_inference_rows(session=session, rows=[row, row]) == 2
    with session_scope(db_url) as session:
        got = crud.recent_inferences(session=session, model="m")
        assert len(got) == 2
        back = records.decode(got[0].input)
        np.testing.assert_array_equal(back["x"], x)  # NaN where NaN was: assert_array_equal
        assert back["x"].dtype == np.float32
        assert list(back["t"]) == ["caf\u00e9", "\ufffd"]
        np.testing.assert_array_equal(records.decode(got[0].output)["y"], y)


def test_drift_reports_latest_first(db_url: str) -> None:
    from kiln.registry.tables import DriftReport

    with session_scope(db_url) as session:
        crud.add_drift_report(
            session=session,
            report=DriftReport(
                model_name="m", drift_detected=None, samples=12, method="not enough data"
            ),
        )
        crud.add_drift_report(
            session=session,
            report=DriftReport(
                model_name="m",
                drift_detected=True,
                drift_share=0.8,
                samples=300,
                method="evidently DataDriftPreset",
                report_path="objects/cd/report.html",
            ),
        )
    with session_scope(db_url) as session:
        latest = crud.latest_drift_report(session=session, model="m")
        assert latest is not None and latest.drift_detected and latest.drift_share == 0.8
        assert crud.latest_drift_report(session=session, model="other") is None
        # the store's sweep keeps what a drift report names
        assert "objects/cd/report.html" in crud.stored_paths(session=session)


def test_lookups_by_id_and_the_last_optimize_run(db_url: str) -> None:
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        done = crud.create_job(session=session, version=row, optimization_type="optimize")
        crud.update_job(session=session, job=done, status="done", metrics={"n": 1})
        newer = crud.create_job(session=session, version=row, optimization_type="optimize")
        crud.update_job(session=session, job=newer, status="done", metrics={"n": 2})
        crud.create_job(session=session, version=row, optimization_type="optimize")  # running
        variant = crud.create_job(session=session, version=row, optimization_type="onnx/fp32")
        crud.update_job(session=session, job=variant, status="done")
        ids = row.id, newer.id
        other = _model_and_version(session, "0.2.0")
    with session_scope(db_url) as session:
        found = crud.get_version_by_id(session=session, version_id=ids[0])
        assert found is not None and found.version == "0.1.0"
        assert crud.get_version_by_id(session=session, version_id=None) is None
        assert crud.get_version_by_id(session=session, version_id=10_000) is None
        job = crud.get_job(session=session, job_id=ids[1])
        assert job is not None and job.metrics == {"n": 2}
        assert crud.get_job(session=session, job_id=10_000) is None
        last = crud.last_optimize_run(session=session, version=found)
        assert last is not None and last.id == ids[1]  # newest done optimize, not the variant
        assert crud.last_optimize_run(session=session, version=other) is None


def test_a_version_records_its_optimization_config(db_url: str) -> None:
    with session_scope(db_url) as session:
        model = crud.create_model(session=session, name="m", task=Task.classification)
        crud.create_version(
            session=session,
            model=model,
            version="0.1.0",
            source_format="pt2",
            source_sha256=SHA,
            spec={},
            optimization_config={"backends": ["onnxruntime"]},
        )
        plain = _model_and_version(session, "0.2.0")
        assert plain.optimization_config == {}
    with session_scope(db_url) as session:
        row = crud.require_version(session=session, name="m", version="0.1.0")
        assert row.optimization_config == {"backends": ["onnxruntime"]}


def test_mark_selected_artifact_keeps_one_served(db_url: str) -> None:
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        for kind, path in (("source", "objects/s.pt2"), ("onnx", "objects/o.onnx")):
            crud.add_artifact(
                session=session, version=row, kind=kind, path=path, sha256=SHA, size=1
            )
        crud.mark_selected_artifact(session=session, version=row, path="objects/o.onnx")
    with session_scope(db_url) as session:
        row = crud.require_version(session=session, name="m")
        served = [a.path for a in crud.list_artifacts(session=session, version=row) if a.selected]
        assert served == ["objects/o.onnx"]
        crud.mark_selected_artifact(session=session, version=row, path=None)  # the baseline won
    with session_scope(db_url) as session:
        row = crud.require_version(session=session, name="m")
        served = [a.path for a in crud.list_artifacts(session=session, version=row) if a.selected]
        assert served == ["objects/s.pt2"]


def test_deployment_fingerprint_changes_with_desired_state_only(db_url: str) -> None:
    def fingerprint() -> tuple[tuple[str, ...], ...]:
        with session_scope(db_url) as session:
            return crud.deployment_fingerprint(session=session)

    assert fingerprint() == ()
    with session_scope(db_url) as session:
        row = _model_and_version(session)
        crud.set_version_status(session=session, version=row, status=VersionStatus.optimizing)
        crud.set_version_status(session=session, version=row, status=VersionStatus.validated)
        crud.make_stable(session=session, version=row)
    deployed = fingerprint()
    assert len(deployed) == 1 and str(row.id) in deployed[0]
    with session_scope(db_url) as session:
        _model_and_version(session, "0.2.0")  # a new version is not desired state
    assert fingerprint() == deployed
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        crud.update_model_settings(session=session, model=model, settings={"replicas": 2})
    assert fingerprint() != deployed


def test_detached_rows_outlive_their_session(db_url: str) -> None:
    with session_scope(db_url) as session:
        alert = crud.raise_alert(session=session, model="m", kind="p99", message="slow").alert
        session.commit()
        assert crud.detached(session=session, row=alert) is alert
        assert alert not in session
    assert alert.id is not None and alert.opened_at is not None and alert.message == "slow"
