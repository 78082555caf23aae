"""The routing table: which engine replicas serve which model versions, for every gateway.

The acting reconciler (the holder of :data:`kiln.registry.lease.RECONCILER`) publishes the whole
set of replicas it runs, as one fenced transaction, whenever it changes (:func:`publish`). Every
gateway, on any host, polls :func:`routable` and routes by it. Rows count only while the lease
they were published under is the current, unexpired one: the replicas of a reconciler that died
or lost its lease leave every gateway's table when its lease ends, without anyone deleting them,
and its successor's first publish replaces them. A follower tells that apart from an empty table
(:func:`followed`): a lease that ran out with nobody holding it since may be its holder's, which
the database could not renew (a restart): the follower keeps what it routes by for a while, and
the holder taking it back carries its table over to its next token (:func:`carry_over`), in the
same transaction, so no follower reads the lease back without its table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlmodel import Session

from kiln.registry import lease
from kiln.registry.tables import EngineEndpoint, Lease

_ENDPOINTS: Any = EngineEndpoint.__table__  # type: ignore[attr-defined]
_LEASES: Any = Lease.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Endpoint:
    """One published replica."""

    model: str
    version: str
    url: str
    channels: tuple[str, ...]
    ready: bool
    draining: bool
    pid: int = 0


def publish(*, session: Session, held: lease.Held, endpoints: list[Endpoint]) -> None:
    """Replace the routing table with ``endpoints``, fenced by ``held`` (raises
    :class:`~kiln.registry.lease.LeaseLost` and writes nothing once it is not current)."""
    lease.fence(session=session, held=held)
    session.execute(delete(_ENDPOINTS))
    if endpoints:
        session.execute(
            insert(_ENDPOINTS),
            [
                {
                    "model": e.model,
                    "version": e.version,
                    "url": e.url,
                    "channels": list(e.channels),
                    "ready": e.ready,
                    "draining": e.draining,
                    "pid": e.pid,
                    "token": held.token,
                }
                for e in endpoints
            ],
        )


def routable(*, session: Session, name: str = lease.RECONCILER) -> list[Endpoint]:
    """The replicas published under the current, unexpired ``name`` lease (none while nobody
    holds it), in publishing order."""
    query = (
        select(_ENDPOINTS)
        .join(_LEASES, _LEASES.c.token == _ENDPOINTS.c.token)
        .where((_LEASES.c.name == name) & (_LEASES.c.expires_at > lease.db_now(session)))
        .order_by(_ENDPOINTS.c.id)
    )
    return [
        Endpoint(
            model=row.model,
            version=row.version,
            url=row.url,
            channels=tuple(row.channels or ()),
            ready=bool(row.ready),
            draining=bool(row.draining),
            pid=int(row.pid),
        )
        for row in session.execute(query)
    ]


def carry_over(*, session: Session, token: int, held: lease.Held) -> None:
    """Keep the table published under ``token`` routable under ``held``: its holder took its own
    lapsed lease back with the next token (nobody held it between), with the same engines. Run
    in the transaction that took the lease; fenced by ``held``."""
    lease.fence(session=session, held=held)
    session.execute(update(_ENDPOINTS).where(_ENDPOINTS.c.token == token).values(token=held.token))


def followed(*, session: Session, name: str = lease.RECONCILER) -> list[Endpoint] | None:
    """What a follower routes by: :func:`routable`, or None when rows remain but nobody holds
    ``name`` now (the lease they were published under ran out: its holder died, or could not
    renew it and may take it back). A holder that stops cleanly withdraws its rows first, so
    an empty table then is []. One statement: one snapshot of both tables."""
    now = lease.db_now(session)
    query = (
        select(
            _ENDPOINTS,
            _LEASES.c.token.label("lease_token"),
            (_LEASES.c.expires_at > now).label("live"),
        )
        .select_from(_ENDPOINTS.outerjoin(_LEASES, _LEASES.c.name == name))
        .order_by(_ENDPOINTS.c.id)
    )
    rows = list(session.execute(query))
    if rows and not any(row.live for row in rows):
        return None
    return [
        Endpoint(
            model=row.model,
            version=row.version,
            url=row.url,
            channels=tuple(row.channels or ()),
            ready=bool(row.ready),
            draining=bool(row.draining),
            pid=int(row.pid),
        )
        for row in rows
        if row.live and row.token == row.lease_token
    ]
