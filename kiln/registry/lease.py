"""Named leases in the registry's database: one holder at a time, with a fencing token.

The reconciler's lease says which ``kiln serve`` may act (start and stop engines, write desired
state); every other process only routes. A lease is a row (``tables.Lease``) with its holder,
its fencing token and its expiry, all by the database's clock, so the hosts' clocks never have to
agree. :func:`acquire` takes a free or expired lease (the token goes up by one) or renews the
caller's own (the token stays) in one statement; :func:`fence` is what every write of the holder
runs first, in the write's own transaction: it fails with :class:`LeaseLost` once the token is no
longer current. On PostgreSQL it takes the row ``FOR SHARE``, so a successor's takeover waits
for writes in flight to commit, and every later write of the old holder is refused; SQLite has
one writer at a time, so the same check in the write's transaction is enough there.

A holder must also stop acting on its own once its last renewal's term has run out by its own
clock (:meth:`Held.valid_for`), before anyone else can take the lease: that, not the token, is
what keeps a partitioned holder from acting while it cannot reach the database at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from kiln.errors import Conflict
from kiln.registry.tables import Lease

RECONCILER = "reconciler"  # the lease that lets one `kiln serve` reconcile

_TABLE: Any = Lease.__table__  # type: ignore[attr-defined]


class LeaseLost(Conflict):
    """This process no longer holds the lease it acted under: it must stop acting."""


@dataclass(frozen=True)
class Held:
    """A lease as its holder last saw it: the token to fence writes with, and its expiry."""

    name: str
    holder: str
    token: int
    since: float  # database clock, epoch seconds
    expires_at: float  # database clock, epoch seconds
    ttl_s: float
    sent_at: float  # this process's time.monotonic() just before it asked

    def valid_for(self, now: float | None = None) -> float:
        """Seconds this holder may still act on it, by its own clock. Counted from before it
        asked, so the holder's own deadline always comes before the database's expiry; <= 0:
        stop acting."""
        return self.sent_at + self.ttl_s - (time.monotonic() if now is None else now)


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def db_now(session: Session) -> ColumnElement[Any]:
    """The database's clock in epoch seconds, as a SQL expression."""
    if _postgres(session):
        return func.extract("epoch", func.clock_timestamp())
    return (func.julianday("now") - 2440587.5) * 86400.0


def _insert(session: Session) -> Any:
    """The dialect's INSERT (both have ON CONFLICT ... DO UPDATE ... WHERE)."""
    from sqlalchemy.dialects import postgresql, sqlite

    if _postgres(session):
        return postgresql.insert
    return sqlite.insert


def acquire(*, session: Session, name: str, holder: str, ttl_s: float) -> Held | None:
    """Take ``name`` for ``holder`` for ``ttl_s`` seconds if it is free, expired or already
    ``holder``'s (a renewal); None while another holder's lease runs. A change of holder, or a
    holder taking back its own expired lease, raises the token by one. Like every CRUD call it
    leaves the commit to the caller's ``session_scope``: commit at once, so the row lock is not
    held."""
    sent_at = time.monotonic()
    now = db_now(session)
    mine_and_live = (_TABLE.c.holder == holder) & (_TABLE.c.expires_at > now)
    statement = (
        _insert(session)(_TABLE)
        .values(name=name, holder=holder, token=1, since=now, expires_at=now + ttl_s)
        .on_conflict_do_update(
            index_elements=[_TABLE.c.name],
            set_={
                "holder": holder,
                "token": case((mine_and_live, _TABLE.c.token), else_=_TABLE.c.token + 1),
                "since": case((mine_and_live, _TABLE.c.since), else_=now),
                "expires_at": now + ttl_s,
            },
            where=(_TABLE.c.expires_at <= now) | (_TABLE.c.holder == holder),
        )
        .returning(_TABLE.c.token, _TABLE.c.since, _TABLE.c.expires_at)
    )
    row = session.execute(statement).first()
    if row is None:
        return None
    return Held(
        name=name,
        holder=holder,
        token=int(row.token),
        since=float(row.since),
        expires_at=float(row.expires_at),
        ttl_s=ttl_s,
        sent_at=sent_at,
    )


def release(*, session: Session, held: Held) -> None:
    """Give ``held`` up now (a clean shutdown), so a successor need not wait for its expiry."""
    session.execute(
        _TABLE.update()
        .where(
            (_TABLE.c.name == held.name)
            & (_TABLE.c.holder == held.holder)
            & (_TABLE.c.token == held.token)
        )
        .values(expires_at=db_now(session))
    )


def fence(*, session: Session, held: Held) -> None:
    """The first step of every write made under ``held``, in that write's transaction: raise
    :class:`LeaseLost` unless ``held`` is still the current, unexpired lease."""
    query = select(_TABLE.c.holder, _TABLE.c.token, _TABLE.c.expires_at > db_now(session)).where(
        _TABLE.c.name == held.name
    )
    if _postgres(session):
        query = query.with_for_update(read=True)
    row = session.execute(query).first()
    if row is None or row[0] != held.holder or row[1] != held.token or not row[2]:
        raise LeaseLost(
            f"the {held.name} lease (token {held.token}) is no longer held by {held.holder}"
        )


def current(*, session: Session, name: str) -> dict[str, Any] | None:
    """Who holds ``name`` now: ``{"holder", "since", "token", "expires_in_s"}``, or None when
    nobody does (never taken, released or expired)."""
    now = db_now(session)
    row = session.execute(
        select(_TABLE.c.holder, _TABLE.c.token, _TABLE.c.since, _TABLE.c.expires_at - now).where(
            (_TABLE.c.name == name) & (_TABLE.c.expires_at > now)
        )
    ).first()
    if row is None:
        return None
    return {
        "holder": row[0],
        "token": int(row[1]),
        "since": float(row[2]),
        "expires_in_s": round(float(row[3]), 3),
    }
