"""Alerts: a registry row and a Prefect event when one opens, another event when it resolves.

Whoever detects a condition (the gateway's alert monitor for latency, errors, engines and GPU
use; the drift flow for drift) calls :func:`fire` while it holds and :func:`clear` once it is
gone. Each is idempotent: firing an open alert refreshes its figures without a new event, and
clearing a resolved (or never opened) one does nothing, so a checker can call them every tick.

Events are ``kiln.alert.opened`` / ``kiln.alert.resolved`` on the resource
``kiln.model.<name>`` (payload: kind, version, message, value, threshold), which a Prefect
automation can match (README: a drift event that starts a ``reoptimize`` run; see
:func:`drift_automation`). Events go out where there is a Prefect API to take them:
``PREFECT_API_URL`` is set (``make up``, a worker) or the caller runs inside a flow run.
Elsewhere (a bare ``kiln serve``) the alert is only recorded: without an API, Prefect would
start an ephemeral server inside the gateway process. ``emit_event`` only queues the event for
Prefect's events worker (a background thread) and :func:`flush` sends what is still queued
before a process exits; the gateway calls all of this from a worker thread, never from its
event loop. Emitting never raises.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import Alert

log = logging.getLogger(__name__)

KINDS = ("p99", "error_rate", "engine_down", "gpu_util", "rate_limit_local", "drift")


def prefect_reachable() -> bool:
    """A Prefect API is configured, or this runs inside a flow run (which has one).

    ``PREFECT_API_URL`` in the environment is read first; a process that has not imported
    Prefect (the gateway) is neither in a flow run nor configured by a Prefect profile it
    loaded, so it does not pay Prefect's import (seconds of CPU) to learn that."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect.context" not in sys.modules:
        return False
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) or FlowRunContext.get() is not None


def emit(event: str, alert: Alert) -> None:
    """Send ``event`` about ``alert`` to Prefect; log (never raise) if it cannot be sent."""
    if not prefect_reachable():
        log.info(
            "%s for %s/%s recorded only: no Prefect API configured",
            event,
            alert.model_name,
            alert.kind,
        )
        return
    try:
        from prefect.events import emit_event

        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"kiln.model.{alert.model_name}",
                "prefect.resource.name": alert.model_name,
                "kiln.alert.kind": alert.kind,
            },
            payload={
                "alert_id": alert.id,
                "kind": alert.kind,
                "version": alert.version,
                "message": alert.message,
                "value": alert.value,
                "threshold": alert.threshold,
                "state": str(alert.state),
            },
        )
    except Exception as exc:  # an unreachable Prefect must not stop alerting
        log.warning("could not emit %s for %s/%s: %s", event, alert.model_name, alert.kind, exc)


def flush(timeout: float = 5.0) -> None:
    """Send the events still queued by Prefect's events worker (a process shutting down);
    nothing to do when none was emitted. Never raises."""
    if "prefect.events.worker" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
    except Exception as exc:  # shutting down: report, do not fail
        log.warning("could not send the queued alert events: %s", exc)


def fire(
    url: str,
    *,
    model: str,
    kind: str,
    message: str,
    version: str | None = None,
    value: float | None = None,
    threshold: float | None = None,
    detail: dict[str, Any] | None = None,
) -> crud.RaisedAlert:
    """Open (or refresh) the alert (detached from its session). Emits on opening only."""
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}: one of {', '.join(KINDS)}")
    with session_scope(url) as session:
        raised = crud.raise_alert(
            session=session,
            model=model,
            kind=kind,
            version=version,
            message=message,
            value=value,
            threshold=threshold,
            detail=detail,
        )
        session.commit()
        crud.detached(session=session, row=raised.alert)
    if raised.opened:
        emit("kiln.alert.opened", raised.alert)
    return raised


def clear(
    url: str,
    *,
    model: str,
    kind: str,
    version: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Alert | None:
    """Resolve the open alert if there is one; the resolved alert, or None."""
    with session_scope(url) as session:
        alert = crud.find_open_alert(session=session, model=model, kind=kind, version=version)
        if alert is None:
            return None
        crud.resolve_alert(session=session, alert=alert, detail=detail)
        session.commit()
        crud.detached(session=session, row=alert)
    emit("kiln.alert.resolved", alert)
    return alert


def drift_automation(deployment_id: str, *, name: str = "kiln: re-optimize on drift") -> Any:
    """The Prefect automation that runs the ``reoptimize`` deployment ``deployment_id`` for a
    model whenever a drift alert opens on it (README, Monitoring); ``.create()`` registers it
    with the configured Prefect API. The model's name comes from the event's resource."""
    from uuid import UUID

    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=name,
        description="A kiln.alert.opened event of kind drift starts reoptimize for its model",
        trigger=EventTrigger(
            match={"prefect.resource.id": "kiln.model.*", "kiln.alert.kind": "drift"},
            expect={"kiln.alert.opened"},
            posture=Posture.Reactive,
            threshold=1,
            # prefect's field validates seconds (DurationOrSecondsTimeDelta); the stub says timedelta
            within=0,  # type: ignore[arg-type]
        ),
        actions=[
            # job_variables defaults via a positional Field(None, ...), which mypy doesn't see
            RunDeployment(  # type: ignore[call-arg]
                source="selected",
                deployment_id=UUID(str(deployment_id)),
                parameters={"model": "{{ event.resource.name }}"},
            )
        ],
    )
