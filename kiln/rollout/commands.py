"""Deploy decisions written as desired state: which version is stable, which is the canary.

Flows and the CLI change Deployment rows here; ``kiln serve``'s supervisor reconciles engines to
them and the gateway routes by them (docs/architecture.md, control plane). Nothing here starts a
process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from kiln.errors import ExternalToolError, NotFound
from kiln.registry import crud, lease
from kiln.registry.db import session_scope
from kiln.rollout.client import GatewayClient, gateway_url
from kiln.settings import Settings

log = logging.getLogger(__name__)


def require_pullable(settings: Settings, *, name: str, version: str | None) -> None:
    """Refuse to deploy ``name@version`` unless the DVC remote holds what it serves: every
    host that will run it pulls it from there (``ArtifactStore.fetch``). Raises NotFound (a
    missing object) or ExternalToolError (the remote does not answer) before anything changes."""
    from kiln.store.artifacts import ArtifactStore, ObjectRef

    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        served = [
            ObjectRef.of(a) for a in crud.list_artifacts(session=session, version=row) if a.selected
        ]
    missing = ArtifactStore.of(settings).missing_remotely(served)
    if missing:
        raise NotFound(
            f"{name}@{row.version} cannot be deployed: the DVC remote {settings.remote_url} "
            f"holds no copy of {missing[0].path} (sha256 {missing[0].sha256}); push it from "
            "the host that recorded it (`dvc push` in its KILN_HOME) and deploy again"
        )


def deploy_direct(settings: Settings, *, name: str, version: str | None) -> dict[str, Any]:
    """Make ``name@version`` (default: newest) the stable version now, without a canary, once
    the DVC remote is known to hold what it serves."""
    require_pullable(settings, name=name, version=version)
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        dep = crud.make_stable(session=session, version=row)
        return {
            "model": name,
            "version": row.version,
            "outcome": "promoted",
            "strategy": "direct",
            "reason": "direct deploy: stable at once",
            "deployment_state": dep.state,
        }


# --- operator commands: `kiln promote`, `kiln rollback`, `kiln status`
def promote_now(settings: Settings, *, name: str) -> dict[str, Any]:
    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        dep = crud.get_deployment(session=session, model=model)
        previous = (
            crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
            if dep is not None and dep.stable_version_id
            else None
        )
        dep = crud.promote(session=session, model=model, reason="promoted by `kiln promote`")
        stable = crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
        assert stable is not None
        return {
            "model": name,
            "version": stable.version,
            "outcome": "promoted",
            "previous": previous.version if previous else None,
            "reason": "promoted by hand",
        }


def rollback_now(settings: Settings, *, name: str, to_version: str | None) -> dict[str, Any]:
    """Drop the canary, or make an earlier production version stable again. Its selected
    artifact is checked first, and pulled from the DVC remote when missing or corrupt here,
    so the engine never gets a rollback it cannot load."""
    from kiln.errors import IntegrityError
    from kiln.store.artifacts import ArtifactStore, ObjectRef

    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        target = (
            crud.require_version(session=session, name=name, version=to_version)
            if to_version
            else None
        )
        dep = crud.get_deployment(session=session, model=model)
        if target is None and dep is not None and dep.canary_version_id is None:
            retired = [
                v for v in crud.list_versions(session=session, model=model) if v.status == "retired"
            ]
            target = retired[-1] if retired else None
        selected = (
            [
                ObjectRef.of(a)
                for a in crud.list_artifacts(session=session, version=target)
                if a.selected
            ]
            if target is not None
            else []
        )
    restored = False
    if selected:
        store = ArtifactStore.of(settings)
        restored = not store.resolve(selected[0].path).is_file()
        try:
            store.fetch(selected[0])  # pulled from the remote if this host lacks it
        except IntegrityError:  # a corrupt copy here, or one without a recorded md5
            store.restore([(a.path, a.sha256) for a in selected])
            restored = True
    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        row = (
            crud.require_version(session=session, name=name, version=target.version)
            if target is not None
            else None
        )
        had_canary = (
            (dep := crud.get_deployment(session=session, model=model)) is not None
            and dep.canary_version_id is not None
            and to_version is None
        )
        canary = (
            crud.get_version_by_id(session=session, version_id=dep.canary_version_id)
            if had_canary and dep
            else None
        )
        crud.rollback(
            session=session,
            model=model,
            to_version=None if had_canary else row,
            reason="rolled back by `kiln rollback`",
            detail={"restored_from_remote": restored},
        )
    if had_canary and canary is not None:
        reason = f"canary {canary.version} dropped (weight 0, rolled_back)"
        version = canary.version
    else:
        assert target is not None
        version = target.version
        reason = f"{target.version} is the stable version again" + (
            " (its artifact restored from the DVC remote)" if restored else ""
        )
    return {
        "model": name,
        "version": version,
        "outcome": "rolled_back",
        "reason": reason,
        "restored": restored,
    }


def status_view(settings: Settings) -> dict[str, Any]:
    """``kiln status --json``: deployments from the registry, live figures from the gateway
    (the last minute), or nulls when no gateway answers; the last drift report and the open
    alerts from the registry; who holds the reconciler lease (``reconciler``: holder and since,
    epoch seconds; null when no ``kiln serve`` reconciles)."""
    with session_scope(settings.db_url) as session:
        rows = [
            (
                d.model.name,
                d.deployment,
                d.stable.version if d.stable else None,
                d.canary.version if d.canary else None,
            )
            for d in crud.served_versions(session=session)
        ]
        watch = {name: _watch(session, name) for name, *_ in rows}
        held = lease.current(session=session, name=lease.RECONCILER)
        reconciler = None if held is None else {"holder": held["holder"], "since": held["since"]}
        key = None
        if rows:
            from kiln.rollout.service import service_key

            key = service_key(settings)
    url = gateway_url(settings)
    gateway = GatewayClient(url, key) if key else None
    reachable = False
    models = []
    try:
        for name, dep, stable, canary in rows:
            figures: dict[str, Any] = {}
            if gateway is not None:
                try:
                    doc = gateway.stats(name, time.time() - 60, attempts=1)
                    reachable = True
                    figures = _merge(doc.get("versions", {}))
                except (httpx.HTTPError, ExternalToolError):
                    figures = {}
            models.append(
                {
                    "name": name,
                    "stable": stable,
                    "canary": canary,
                    "canary_weight": dep.canary_weight if canary else 0.0,
                    "shadow_share": dep.shadow_share,
                    "state": dep.state,
                    "p50_ms": figures.get("p50_ms"),
                    "p99_ms": figures.get("p99_ms"),
                    "error_rate": figures.get("error_rate"),
                    "rps": figures.get("rps"),
                    **watch[name],
                }
            )
    finally:
        if gateway is not None:
            gateway.close()
    return {"models": models, "gateway": reachable, "gateway_url": url, "reconciler": reconciler}


def _watch(session: Any, name: str) -> dict[str, Any]:
    """A model's monitoring state in the registry: its last drift report, its open alerts."""
    report = crud.latest_drift_report(session=session, model=name)
    alerts = [
        {
            "kind": a.kind,
            "version": a.version,
            "message": a.message,
            "value": a.value,
            "threshold": a.threshold,
            "opened_at": a.opened_at.isoformat(),
        }
        for a in crud.open_alerts(session=session, model=name)
    ]
    return {
        "drift_share": report.drift_share if report else None,
        "drift_detected": report.drift_detected if report else None,
        "drift_at": report.created_at.isoformat() if report else None,
        "alerts": alerts,
    }


def _merge(versions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's figures over its versions: requests-weighted (p99: the worst version's)."""
    live = [v for v in versions.values() if v.get("requests")]
    if not live:
        return {}
    total = sum(v["requests"] for v in live)
    errors = sum(v["errors"] for v in live)
    p50s = [(v["p50_ms"], v["requests"]) for v in live if v.get("p50_ms") is not None]
    return {
        "error_rate": errors / total,
        "rps": sum(v.get("rps") or 0 for v in live),
        "p50_ms": sum(p * n for p, n in p50s) / sum(n for _, n in p50s) if p50s else None,
        "p99_ms": max((v["p99_ms"] for v in live if v.get("p99_ms") is not None), default=None),
    }
