"""Re-optimization: a served version's source, optimized again with today's settings and
toolchain, as a new patch version; kept only when it is faster at equal quality.

Re-optimization never mutates a version. It registers a new patch version with the
same source (the stored source artifact, reused: same path, same sha256) and new artifacts
(metadata ``reoptimized_from``), which then takes the normal deploy path. A candidate that
brings no improvement is removed again completely (rows and stored objects), so the registry
is exactly as it was. ``flows/reoptimize.py`` chains these as Prefect tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kiln.errors import Conflict, NotFound
from kiln.gate import DROP_DECIMALS, within
from kiln.optimize.pipeline import OptimizeSettings
from kiln.optimize.validate import GateSettings
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import ArtifactKind, Task, VersionStatus
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore

META_KEY = "reoptimized_from"


@dataclass(frozen=True)
class Production:
    """A model's production (stable) version, as re-optimization starts from it."""

    model: str
    version: str
    task: str
    canary: str | None  # a canary in flight: the model is left alone this time


def productions(settings: Settings, model: str | None = None) -> list[Production]:
    """Every model with a stable version (or just ``model``, which must exist)."""
    with session_scope(settings.db_url) as session:
        models = (
            [crud.require_model(session=session, name=model)]
            if model is not None
            else list(crud.list_models(session=session))
        )
        found = []
        for row in models:
            dep = crud.get_deployment(session=session, model=row)
            if dep is None or dep.stable_version_id is None:
                continue
            stable = crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
            canary = (
                crud.get_version_by_id(session=session, version_id=dep.canary_version_id)
                if dep.canary_version_id
                else None
            )
            assert stable is not None
            found.append(
                Production(
                    model=row.name,
                    version=stable.version,
                    task=str(row.task),
                    canary=canary.version if canary else None,
                )
            )
        return found


def register_candidate(settings: Settings, production: Production) -> str:
    """A new patch version (after the model's highest) with the production version's source,
    spec and metadata plus ``reoptimized_from``; returns its version number. Nothing is copied:
    the source artifact row points at the stored object the production version uses."""
    store = ArtifactStore.of(settings).ensure()
    with store.locked(), session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=production.model)
        prod = crud.require_version(
            session=session, name=production.model, version=production.version
        )
        source = next(
            (
                a
                for a in crud.list_artifacts(session=session, version=prod)
                if a.kind == ArtifactKind.source
            ),
            None,
        )
        if source is None:
            raise NotFound(
                f"{production.model}@{production.version} has no source artifact to re-optimize"
            )
        store.fetch(source)  # present and intact (pulled if this host lacks it), or refused
        number = crud.next_version(session=session, model=model)
        row = crud.create_version(
            session=session,
            model=model,
            version=number,
            source_format=prod.source_format,
            source_sha256=prod.source_sha256,
            spec=dict(prod.spec),
            meta={**(prod.meta or {}), META_KEY: prod.version},
            optimization_config=dict((model.settings or {}).get("optimize", {})),
        )
        crud.add_artifact(
            session=session,
            version=row,
            kind=ArtifactKind.source,
            backend=source.backend,
            precision=source.precision,
            path=source.path,
            sha256=source.sha256,
            size=source.size,
            dvc_hash=source.dvc_hash,
            selected=True,
        )
        return number


def optimize_report(settings: Settings, model: str, version: str) -> dict[str, Any] | None:
    """The document of ``model@version``'s last finished optimize run (``kiln optimize
    --json``'s), with the sha256 of the artifact its engine serves; None if it has none."""
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=model, version=version)
        job = crud.last_optimize_run(session=session, version=row)
        if job is None or not (job.metrics or {}).get("selected"):
            return None
        selected = next(
            (a for a in crud.list_artifacts(session=session, version=row) if a.selected), None
        )
        return {**job.metrics, "selected_sha256": selected.sha256 if selected else None}


def _batch(gates: GateSettings, a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The serving batch (the one ``select`` optimizes for), else 32, else the largest both
    reports timed."""
    common = set(a.get("latency_ms", {})) & set(b.get("latency_ms", {}))
    for key in (str(gates.serving_batch), "32"):
        if key in common:
            return key
    return max(common, key=int) if common else None


def compare(
    *,
    task: str,
    model_settings: dict[str, Any],
    production: dict[str, Any] | None,
    candidate: dict[str, Any],
    min_speedup: float,
) -> dict[str, Any]:
    """Is the candidate's selected variant at least ``min_speedup`` times faster than the
    production version's at the serving batch, at equal quality (its metric no lower than
    production's by more than the model's gate)?

    ``speedup`` is production's p50 latency over the candidate's (``judge``'s definition:
    medians, so one slow outlier does not decide); the throughput ratio is reported beside it.
    The same served artifact (same sha256) is no improvement whatever the timings say.
    """
    gates = OptimizeSettings.for_model(model_settings).gates
    result: dict[str, Any] = {
        "better": False,
        "speedup": None,
        "throughput_ratio": None,
        "metric_drop": None,
        "batch": None,
    }
    if production is None:
        return {**result, "reason": "the production version has no optimize report to compare with"}
    prod, cand = production["selected"], candidate["selected"]
    result["production_variant"] = f"{prod['backend']}/{prod['precision']}"
    result["candidate_variant"] = f"{cand['backend']}/{cand['precision']}"
    batch = _batch(gates, prod, cand)
    if batch is None:
        return {**result, "reason": "the reports share no timed batch size"}
    result["batch"] = batch
    p50_prod = prod["latency_ms"][batch]["p50"]
    p50_cand = cand["latency_ms"][batch]["p50"]
    speedup = round(p50_prod / max(p50_cand, 1e-9), 3)
    tp_prod, tp_cand = prod.get("throughput", {}).get(batch), cand.get("throughput", {}).get(batch)
    result["speedup"] = speedup
    result["throughput_ratio"] = round(tp_cand / tp_prod, 3) if tp_prod and tp_cand else None
    drop = float(prod["metric"]) - float(cand["metric"])
    result["metric_drop"] = round(drop, DROP_DECIMALS) if math.isfinite(drop) else None
    allowed = gates.allowed_drop(Task(task), float(prod["metric"]))
    timing = (
        f"{result['candidate_variant']} p50 {p50_cand:.4g} ms against "
        f"{result['production_variant']} {p50_prod:.4g} ms at batch {batch}: "
        f"{speedup:.2f}x"
    )
    if (same := production.get("selected_sha256")) and same == candidate.get("selected_sha256"):
        return {
            **result,
            "speedup": 1.0,
            "reason": f"the candidate serves the same artifact as production "
            f"(sha256 {same[:12]}...): nothing to gain",
        }
    if not within(drop, allowed):
        return {
            **result,
            "reason": f"{timing}, but its metric {cand['metric']:.4f} is below "
            f"production's {prod['metric']:.4f} by more than the gate "
            f"({allowed:g})",
        }
    if speedup < min_speedup:
        return {**result, "reason": f"{timing}, under the {min_speedup:g}x needed"}
    return {
        **result,
        "better": True,
        "reason": f"{timing} (>= {min_speedup:g}x), metric {cand['metric']:.4f} against "
        f"{prod['metric']:.4f}",
    }


def discard_candidate(settings: Settings, model: str, version: str) -> list[str]:
    """Remove a re-optimization candidate completely: its rows (``crud.delete_version``
    refuses anything that is or was deployed) and then the stored objects no remaining row
    references (file, DVC pointer, DVC cache entry). Returns the store paths removed."""
    store = ArtifactStore.of(settings).ensure()
    with store.locked():
        with session_scope(settings.db_url) as session:
            row = crud.require_version(session=session, name=model, version=version)
            if META_KEY not in (row.meta or {}):
                raise Conflict(
                    f"{model}@{version} is not a re-optimization candidate "
                    f"(no {META_KEY} in its metadata): it stays"
                )
            paths = crud.delete_version(session=session, version=row)
            referenced = crud.stored_paths(session=session)
        # committed: the rows are gone; now the files only they named
        return store.purge(sorted(set(paths) - referenced))


def still_candidate(settings: Settings, model: str, version: str) -> bool:
    """Whether ``model@version`` exists and was never offered to traffic (safe to discard)."""
    with session_scope(settings.db_url) as session:
        m = crud.get_model(session=session, name=model)
        row = crud.get_version(session=session, model=m, version=version) if m else None
        return row is not None and VersionStatus(row.status) in crud.NEVER_DEPLOYED
