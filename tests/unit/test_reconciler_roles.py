"""The supervisor's roles on SQLite and PostgreSQL (serving/supervisor.py): one acting reconciler
by the registry's lease, followers routing by the table it publishes, and a reconciler that lost
its lease stepping down before its successor acts. No engine runs here (no deployment): the
engine side is tests/integration/test_cluster.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from kiln.registry import endpoints, lease
from kiln.registry.db import engine_for, session_scope
from kiln.settings import Settings
from serving.metrics import GatewayMetrics
from serving.state import Replica, RoutingState
from serving.supervisor import Supervisor


def _supervisor(db_url: str, home: Path, role: str, name: str) -> Supervisor:
    settings = Settings(home=home, database_url=db_url, lease_ttl_s=1.0)
    return Supervisor(settings, RoutingState(), GatewayMetrics(), role=role, address=name)


def _holder(db_url: str) -> str | None:
    with session_scope(db_url) as session:
        held = lease.current(session=session, name=lease.RECONCILER)
    return None if held is None else str(held["holder"])


def _replica(port: int, *, ready: bool = True) -> Replica:
    return Replica(
        model="digits",
        version="1.0.0",
        url=f"http://127.0.0.1:{port}",
        pid=port,
        channels=[f"127.0.0.1:{port + 1}"],
        ready=ready,
    )


def test_one_acts_the_others_follow_its_table(db_url: str, tmp_path: Path) -> None:
    engine_for(db_url)

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", "all", "127.0.0.2:8000")
        b = _supervisor(db_url, tmp_path / "b", "all", "127.0.0.3:8000")
        gw = _supervisor(db_url, tmp_path / "g", "gateway", "127.0.0.4:8000")
        for s in (a, b, gw):
            await s.reconcile()
        assert (a.acting, b.acting, gw.acting) == (True, False, False)
        assert _holder(db_url) == a.holder and a.holder.startswith("127.0.0.2:8000 (")
        # a's replicas (no process behind them: the table is the subject) reach the followers
        a.state.replicas = {("digits", "1.0.0"): [_replica(9001), _replica(9003, ready=False)]}
        await a._publish_table()
        for follower in (b, gw):
            await follower.reconcile()
            (seen,) = follower.state.replicas.values()
            assert [(r.url, r.ready, r.channels) for r in seen] == [
                ("http://127.0.0.1:9001", True, ["127.0.0.1:9002"]),
                ("http://127.0.0.1:9003", False, ["127.0.0.1:9004"]),
            ]
        # a follower keeps its own view of a replica it knew (requests in flight, breaker)
        gw.state.replicas[("digits", "1.0.0")][0].outstanding = 7
        a.state.replicas[("digits", "1.0.0")][1].ready = True
        await a._publish_table()
        await gw.reconcile()
        first, second = gw.state.replicas[("digits", "1.0.0")]
        assert first.outstanding == 7 and second.ready
        # a clean stop hands over at once: b takes the lease on its next pass, a's rows are gone
        await a.stop()
        await gw.reconcile()
        assert gw.state.replicas == {}
        await b.reconcile()
        assert b.acting and _holder(db_url) == b.holder
        await b.stop()
        await gw.stop()

    asyncio.run(scenario())


def test_a_reconciler_whose_lease_was_taken_stops_acting(db_url: str, tmp_path: Path) -> None:
    """The race the fencing token is for: a's term ran out (a stalled process, a partition),
    b took over, and a, awake again, tries to publish under its old token."""
    engine_for(db_url)

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", "reconciler", "a")
        b = _supervisor(db_url, tmp_path / "b", "reconciler", "b")
        await a.reconcile()
        assert a.acting
        a.state.replicas = {("digits", "1.0.0"): [_replica(9001)]}
        await a._publish_table()
        stale = a.held
        assert stale is not None
        await asyncio.sleep(1.2)  # a's term (1 s) runs out without a renewal
        await b.reconcile()
        assert b.acting and b.held is not None and b.held.token == stale.token + 1
        b.state.replicas = {("digits", "1.0.0"): [_replica(9101)]}
        await b._publish_table()
        # a, which never noticed, writes with its old token as if its own clock had not run
        a.held = dataclasses.replace(stale, sent_at=time.monotonic())
        a.state.replicas = {("digits", "1.0.0"): [_replica(9201)]}
        await a._publish_table()
        assert not a.acting  # refused: a acts no more
        with session_scope(db_url) as session:
            table = endpoints.routable(session=session)
        assert [e.url for e in table] == ["http://127.0.0.1:9101"]  # b's table, untouched
        await a.reconcile()  # b's lease runs: a steps down (stops its engines) and follows
        assert not a.acting and a.held is None
        assert [r.url for rs in a.state.replicas.values() for r in rs] == ["http://127.0.0.1:9101"]
        await b.stop()
        await a.stop()

    asyncio.run(scenario())


def test_a_reconciler_stops_acting_when_its_own_term_ran_out(db_url: str, tmp_path: Path) -> None:
    """Past its term by its own clock a holder writes nothing, even before anyone else took
    over: that is what keeps a partitioned reconciler from acting beside its successor."""
    engine_for(db_url)

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", "all", "a")
        await a.reconcile()
        held = a.held
        assert held is not None
        a.held = dataclasses.replace(held, sent_at=time.monotonic() - 2.0)
        a.state.replicas = {("digits", "1.0.0"): [_replica(9001)]}
        await a._publish_table()
        assert not a.acting
        with session_scope(db_url) as session:
            assert endpoints.routable(session=session) == []
        await a.stop()

    asyncio.run(scenario())


def test_a_late_renewal_takes_the_lease_back_and_keeps_the_engines(
    db_url: str, tmp_path: Path
) -> None:
    """A database that answers late (a busy SQLite file, PostgreSQL restarting): the holder
    stops acting when its term runs out by its own clock, but its engines keep serving, and it
    takes its lease back (token + 1, nobody acted between) when the database answers again."""
    engine_for(db_url)

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", "all", "a")
        await a.reconcile()
        first = a.held
        assert first is not None and a.acting
        a.state.replicas = {("digits", "1.0.0"): [_replica(9001)]}
        await a._publish_table()
        take = a._take_lease

        def unreachable() -> lease.Held | None:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

        a._take_lease = unreachable  # type: ignore[method-assign]
        await asyncio.sleep(1.2)  # the term (1 s) runs out while the database does not answer
        await a.reconcile()
        assert not a.acting and a.held is not None  # not acting, still the last holder
        assert [r.url for rs in a.state.replicas.values() for r in rs] == ["http://127.0.0.1:9001"]
        with session_scope(db_url) as session:
            assert endpoints.routable(session=session) == []  # its rows count no more
        a._take_lease = take  # type: ignore[method-assign]
        await a._keep_lease()  # the lease part of a pass (no plan here owns those replicas)
        await a._publish_table()
        assert a.acting and a.held is not None and a.held.token == first.token + 1
        assert [r.url for rs in a.state.replicas.values() for r in rs] == ["http://127.0.0.1:9001"]
        with session_scope(db_url) as session:  # published again under the new token
            assert [e.url for e in endpoints.routable(session=session)] == ["http://127.0.0.1:9001"]
        await a.stop()

    asyncio.run(scenario())


def test_a_follower_keeps_its_table_while_the_holder_takes_its_lease_back(
    db_url: str, tmp_path: Path
) -> None:
    """Scenario 29 (PostgreSQL restarted): the holder's lease ran out in the database while it
    could not renew it. A follower that reads the table then keeps what it routes by (for up
    to a term), and the holder taking its lease back carries its table over in the same
    transaction, so no follower routes by an empty table meanwhile. A lease nobody takes back
    empties the followers' tables a term later; a clean stop empties them at once (above)."""
    engine_for(db_url)

    def urls(s: Supervisor) -> list[str]:
        return [r.url for rs in s.state.replicas.values() for r in rs]

    def unreachable() -> lease.Held | None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", "all", "a")
        gw = _supervisor(db_url, tmp_path / "g", "gateway", "g")
        await a.reconcile()
        first = a.held
        assert first is not None
        a.state.replicas = {("digits", "1.0.0"): [_replica(9001)]}
        await a._publish_table()
        await gw.reconcile()
        assert urls(gw) == ["http://127.0.0.1:9001"]
        take = a._take_lease
        a._take_lease = unreachable  # type: ignore[method-assign]
        await asyncio.sleep(1.2)  # the term (1 s) runs out while a cannot renew it
        await a.reconcile()
        await gw.reconcile()  # nobody holds the lease: the last table stands
        assert not a.acting and urls(gw) == ["http://127.0.0.1:9001"]
        a._take_lease = take  # type: ignore[method-assign]
        await a._keep_lease()  # taken back: its rows carried over before any publish
        assert a.held is not None and a.held.token == first.token + 1
        with session_scope(db_url) as session:
            assert [e.url for e in endpoints.routable(session=session)] == ["http://127.0.0.1:9001"]
        await gw.reconcile()
        assert urls(gw) == ["http://127.0.0.1:9001"]
        a._take_lease = unreachable  # type: ignore[method-assign]
        await asyncio.sleep(1.2)  # a's lease runs out again, and nobody takes it back
        await gw.reconcile()
        assert urls(gw) == ["http://127.0.0.1:9001"]
        await asyncio.sleep(1.1)  # a term after the follower found it unheld
        await gw.reconcile()
        assert gw.state.replicas == {}
        await a.stop()
        await gw.stop()

    asyncio.run(scenario())


def test_a_gateway_never_takes_the_lease(db_url: str, tmp_path: Path) -> None:
    engine_for(db_url)

    async def scenario() -> None:
        gw = _supervisor(db_url, tmp_path / "g", "gateway", "g")
        for _ in range(3):
            await gw.reconcile()
        assert not gw.acting and _holder(db_url) is None
        await gw.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("role", ["all", "reconciler"])
def test_the_holder_renews_within_its_term(db_url: str, tmp_path: Path, role: str) -> None:
    engine_for(db_url)

    async def scenario() -> None:
        a = _supervisor(db_url, tmp_path / "a", role, "a")
        b = _supervisor(db_url, tmp_path / "b", role, "b")
        deadline = time.monotonic() + 2.5  # more than two terms of 1 s
        while time.monotonic() < deadline:
            await a.reconcile()
            await b.reconcile()
            assert a.acting and not b.acting
            await asyncio.sleep(0.1)
        assert a.held is not None and a.held.token == 1  # renewed, never lost
        await a.stop()
        await b.stop()

    asyncio.run(scenario())
