"""The registry's leases (kiln/registry/lease.py) on SQLite and PostgreSQL: one holder at a time,
takeover after expiry with a higher fencing token, and writes of a lost holder refused."""

from __future__ import annotations

import threading
import time

import pytest

from kiln.registry import lease
from kiln.registry.db import engine_for, session_scope
from kiln.registry.lease import LeaseLost


def _acquire(url: str, holder: str, ttl_s: float = 5.0) -> lease.Held | None:
    with session_scope(url) as session:
        return lease.acquire(session=session, name=lease.RECONCILER, holder=holder, ttl_s=ttl_s)


def _fence(url: str, held: lease.Held) -> None:
    with session_scope(url) as session:
        lease.fence(session=session, held=held)


def test_one_holder_at_a_time_and_renewal_keeps_the_token(db_url: str) -> None:
    engine_for(db_url)  # migrated
    a = _acquire(db_url, "host-a")
    assert a is not None and a.token == 1 and a.expires_at - a.since == pytest.approx(5, abs=0.5)
    assert _acquire(db_url, "host-b") is None  # a's lease runs
    renewed = _acquire(db_url, "host-a")
    assert renewed is not None and renewed.token == 1 and renewed.since == a.since
    assert renewed.expires_at >= a.expires_at
    _fence(db_url, renewed)
    with session_scope(db_url) as session:
        now = lease.current(session=session, name=lease.RECONCILER)
    assert now is not None and now["holder"] == "host-a" and now["token"] == 1
    assert 0 < now["expires_in_s"] <= 5


def test_takeover_after_expiry_fences_the_old_holder(db_url: str) -> None:
    engine_for(db_url)
    a = _acquire(db_url, "host-a", ttl_s=0.3)
    assert a is not None
    time.sleep(0.5)
    assert a.valid_for() < 0  # a stopped acting by its own clock before b could take over
    with pytest.raises(LeaseLost, match="no longer held by host-a"):
        _fence(db_url, a)  # expired, even before anyone took it
    b = _acquire(db_url, "host-b")
    assert b is not None and b.token == a.token + 1 and b.since > a.since
    assert _acquire(db_url, "host-a") is None  # a cannot renew what b holds
    with pytest.raises(LeaseLost):
        _fence(db_url, a)
    _fence(db_url, b)


def test_a_holder_taking_back_its_expired_lease_gets_a_new_token(db_url: str) -> None:
    engine_for(db_url)
    a = _acquire(db_url, "host-a", ttl_s=0.2)
    assert a is not None
    time.sleep(0.4)
    again = _acquire(db_url, "host-a")
    assert again is not None and again.token == a.token + 1
    with pytest.raises(LeaseLost):
        _fence(db_url, a)  # writes fenced with the old token stay refused


def test_release_lets_a_successor_in_at_once(db_url: str) -> None:
    engine_for(db_url)
    a = _acquire(db_url, "host-a")
    assert a is not None
    with session_scope(db_url) as session:
        lease.release(session=session, held=a)
        assert lease.current(session=session, name=lease.RECONCILER) is None
    b = _acquire(db_url, "host-b")
    assert b is not None and b.token == 2


def test_contenders_never_share_a_token(db_url: str) -> None:
    """Eight threads race for a short lease for 2 s, each letting it lapse after taking it:
    every token has exactly one holder."""
    engine_for(db_url)
    seen: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    stop = time.monotonic() + 2.0

    def contend(holder: str) -> None:
        try:
            while time.monotonic() < stop:
                held = _acquire(db_url, holder, ttl_s=0.05)
                if held is not None:
                    seen.append((held.token, holder))
                    time.sleep(0.08)  # then let it lapse: the next holder takes over
                time.sleep(0.01)
        except BaseException as exc:  # pragma: no cover - shown by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"host-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    holders: dict[int, set[str]] = {}
    for token, holder in seen:
        holders.setdefault(token, set()).add(holder)
    assert len(holders) > 3, "the lease never changed hands: the race was not exercised"
    assert all(len(h) == 1 for h in holders.values()), holders


def test_takeover_waits_for_a_fenced_write_in_flight(pg_url: str) -> None:
    """PostgreSQL: a write that passed its fence before the lease expired commits before the
    successor's token exists; the old holder's next write is refused."""
    engine_for(pg_url)
    a = _acquire(pg_url, "host-a", ttl_s=0.3)
    assert a is not None
    events: list[str] = []
    with session_scope(pg_url) as session:
        lease.fence(session=session, held=a)  # holds the lease row FOR SHARE until commit
        time.sleep(0.4)  # the lease expires while the write is in flight

        def successor() -> None:
            assert _acquire(pg_url, "host-b") is not None
            events.append("successor took over")

        thread = threading.Thread(target=successor)
        thread.start()
        time.sleep(0.5)
        events.append("write committed")
    thread.join(timeout=10)
    assert events == ["write committed", "successor took over"]
    with pytest.raises(LeaseLost):
        _fence(pg_url, a)
