"""The routing table: which engine replicas serve which model versions, for every gateway.

The acting reconciler (the holder of :data:`kiln.registry.lease.RECONCILER`) publishes the whole
set of replicas it runs, as one fenced transaction, whenever it changes (:func:`publish`). Every
gateway, on any host, polls :func:`routable` and routes by it. Rows count only while the lease
they were published under is the current, unexpired one: the replicas of a reconciler that died
or lost its lease leave every gateway's table when its lease ends, without anyone deleting them,
and its successor's first publish replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select
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
