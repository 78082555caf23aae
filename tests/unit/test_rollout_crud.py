"""Deployment state changes: direct deploy, canary, promote, rollback; one winner under
concurrency, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln.errors import Conflict, IllegalTransition, NotFound
from kiln.registry import crud
from kiln.registry.db import session_scope
from tests.conftest import register_validated


def _status(db_url: str) -> dict[str, str]:
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        return {v.version: str(v.status) for v in crud.list_versions(session=session, model=model)}


def _deployment(db_url: str) -> tuple[str | None, str | None, float]:
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        dep = crud.get_deployment(session=session, model=model)
        assert dep is not None
        name = {v.id: v.version for v in crud.list_versions(session=session, model=model)}
        return (name.get(dep.stable_version_id), name.get(dep.canary_version_id), dep.canary_weight)


def _make_stable(db_url: str, version: str) -> None:
    with session_scope(db_url) as session:
        crud.make_stable(
            session=session,
            version=crud.require_version(session=session, name="m", version=version),
        )


def _start_canary(db_url: str, version: str, weight: float) -> None:
    with session_scope(db_url) as session:
        crud.start_canary(
            session=session,
            weight=weight,
            version=crud.require_version(session=session, name="m", version=version),
        )


def _event_kinds(db_url: str) -> list[str]:
    with session_scope(db_url) as session:
        model = crud.require_model(session=session, name="m")
        dep = crud.get_deployment(session=session, model=model)
        return [e.kind for e in crud.list_deployment_events(session=session, deployment=dep)]


def _on_model(db_url: str, op: Callable[..., object], **kwargs: object) -> None:
    """``op`` (a crud function of ``session`` and ``model``) on m, in a transaction of its own."""
    with session_scope(db_url) as session:
        op(session=session, model=crud.require_model(session=session, name="m"), **kwargs)


def test_deploy_canary_promote_rollback(db_url: str) -> None:
    register_validated(db_url, "1.0.0", "1.1.0", "1.2.0")
    _make_stable(db_url, "1.0.0")
    _start_canary(db_url, "1.1.0", 0.1)
    assert _deployment(db_url) == ("1.0.0", "1.1.0", 0.1)
    _on_model(db_url, crud.set_canary_weight, weight=0.5, reason="step")
    _on_model(db_url, crud.promote)
    assert _deployment(db_url) == ("1.1.0", None, 0.0)
    assert _status(db_url) == {"1.0.0": "retired", "1.1.0": "production", "1.2.0": "validated"}
    _start_canary(db_url, "1.2.0", 0.1)  # a canary that fails its guardrails
    _on_model(db_url, crud.rollback, reason="p99 over 1.2x stable")
    assert _deployment(db_url) == ("1.1.0", None, 0.0)
    assert _status(db_url)["1.2.0"] == "rolled_back"
    _on_model(db_url, crud.rollback)  # back to an earlier production version
    assert _deployment(db_url) == ("1.0.0", None, 0.0)
    assert _status(db_url) == {"1.0.0": "production", "1.1.0": "retired", "1.2.0": "rolled_back"}
    kinds = _event_kinds(db_url)
    assert kinds == ["deploy", "canary", "weight", "promote", "canary", "rollback", "rollback"]


def test_illegal_changes_are_refused_and_change_nothing(db_url: str) -> None:
    register_validated(db_url, "1.0.0")
    with session_scope(db_url) as session:
        with pytest.raises(NotFound):  # not deployed: nothing to promote
            crud.promote(session=session, model=crud.require_model(session=session, name="m"))
    _make_stable(db_url, "1.0.0")
    with session_scope(db_url) as session, pytest.raises(Conflict, match="no canary"):
        crud.promote(session=session, model=crud.require_model(session=session, name="m"))
    with session_scope(db_url) as session, pytest.raises(IllegalTransition):
        crud.start_canary(
            session=session,
            weight=0.1,
            version=crud.require_version(session=session, name="m", version="1.0.0"),
        )  # production cannot be a canary
    assert _deployment(db_url) == ("1.0.0", None, 0.0)


def test_twenty_concurrent_promotes_have_one_winner(db_url: str) -> None:
    register_validated(db_url, "1.0.0", "2.0.0")
    _make_stable(db_url, "1.0.0")
    _start_canary(db_url, "2.0.0", 0.5)

    def promote(_: int) -> str:
        try:
            _on_model(db_url, crud.promote)
            return "won"
        except Conflict:
            return "409"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(promote, range(20)))
    print(f"20 concurrent promotes: {outcomes.count('won')} won, {outcomes.count('409')} got 409")
    assert outcomes.count("won") == 1 and outcomes.count("409") == 19
    assert _deployment(db_url) == ("2.0.0", None, 0.0)
    assert _status(db_url) == {"1.0.0": "retired", "2.0.0": "production"}
    assert _event_kinds(db_url).count("promote") == 1
