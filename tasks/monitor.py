"""Prefect tasks of the drift monitor: plain functions over the registry and ``kiln.monitor.drift``.

Each stage is a plain function (tests call them) wrapped as a task at the bottom. Inputs are
in-process objects (arrays), so caching by input hash is off (NO_CACHE); the registry's
DriftReport rows, not Prefect's result store, are the record of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.errors import InvalidInput
from kiln.intake.datasets import load_dataset
from kiln.monitor import alerts
from kiln.monitor import drift as core
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import DriftReport, utcnow
from kiln.settings import get_settings
from kiln.spec import ModelSpec, TensorSpec
from kiln.store.artifacts import ArtifactStore, ObjectRef

#: the newest logged requests a run reads at most (each may carry a batch of rows)
MAX_RECORDS = 20_000


@dataclass
class Gathered:
    """What one drift run compares: logged rows of a model against its reference data."""

    model: str
    version: str  # the version whose dataset (and, for text, whose engine) is the reference
    traffic_version: str | None  # None: every version's traffic
    served: TensorSpec
    output: str  # the output tensor a text model's embeddings come out of
    records: int
    rows: list[np.ndarray]  # served input rows as logged
    embeddings: list[np.ndarray | None]  # text models: each row's logged output
    reference: np.ndarray  # reference inputs (the registered dataset)
    dataset: str
    window_hours: float
    versions_seen: list[str] = field(default_factory=list)

    @property
    def text(self) -> bool:
        return self.served.datatype == "BYTES"


def deployed_models() -> list[str]:
    """Models with a served (stable or canary) version: what the hourly run covers."""
    with session_scope(get_settings().db_url) as session:
        return sorted(
            {
                deployed.model.name
                for deployed in crud.served_versions(session=session)
                if deployed.stable or deployed.canary
            }
        )


def resolve(model: str, version: str | None) -> tuple[str, str]:
    """``(model, version)`` whose dataset is the reference: ``version``, else the stable
    version, else the newest. NotFound names what is unknown."""
    with session_scope(get_settings().db_url) as session:
        row = crud.require_model(session=session, name=model)
        if version is None:
            dep = crud.get_deployment(session=session, model=row)
            if dep is not None and dep.stable_version_id is not None:
                stable = crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
                version = stable.version if stable is not None else None
        found = crud.require_version(session=session, name=model, version=version)
        return row.name, found.version


def gather_inputs(model: str, hours: float, version: str | None) -> Gathered:
    """Read the model's logged 200-status requests of the last ``hours`` and its reference
    dataset (the one ``crud.dataset_for`` says serves the version)."""
    if not hours > 0:
        raise InvalidInput(f"hours is {hours}: give a positive window, e.g. 24")
    settings = get_settings()
    name, ref_version = resolve(model, version)
    since = utcnow() - timedelta(hours=hours)
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=ref_version)
        spec = ModelSpec.model_validate(row.spec)
        dataset = crud.dataset_for(session=session, version=row)
        if dataset is None:
            raise InvalidInput(
                f"{name}@{ref_version} has no dataset that passed its checks, so "
                "there is nothing to compare traffic with: register one with "
                f"`kiln upload {name} SOURCE --dataset PATH`"
            )
        ds_ref, ds_name = ObjectRef.of(dataset), dataset.name
        records = crud.recent_inferences(
            session=session, model=name, since=since, version=version, status=200, limit=MAX_RECORDS
        )
        docs = [(r.version, r.input, r.output) for r in records]
    served = spec.served_inputs()[0]
    output = spec.outputs[0].name if spec.outputs else ""
    rows: list[np.ndarray] = []
    embeddings: list[np.ndarray | None] = []
    for _, inputs, outputs in reversed(docs):  # oldest first
        batch = core.stack_rows(core.records_tensor([inputs], served.name))
        rows.extend(batch)
        if served.datatype == "BYTES":
            outs = core.stack_rows(core.records_tensor([outputs], output))
            embeddings.extend(outs if len(outs) == len(batch) else [None] * len(batch))
    store = ArtifactStore.of(settings)
    reference = load_dataset(store.fetch(ds_ref)).inputs
    return Gathered(
        model=name,
        version=ref_version,
        traffic_version=version,
        served=served,
        output=output,
        records=len(docs),
        rows=rows,
        embeddings=embeddings,
        reference=reference,
        dataset=ds_name,
        window_hours=hours,
        versions_seen=sorted({v for v, _, _ in docs}),
    )


def check_rows(gathered: Gathered) -> core.InputCheck:
    """Great Expectations on what clients sent (shape, dtype, NaN/Inf, empty texts)."""
    return core.check_inputs(gathered.rows, gathered.served)


def frames(gathered: Gathered, check: core.InputCheck) -> tuple[Any, Any | None, str]:
    """``(current, reference, method)`` feature frames for Evidently, from the valid rows.

    Text models compare embeddings: the logged outputs against the reference version's
    embeddings of the reference texts, which cost a model run, so ``reference`` is None here
    and :func:`detect_drift` computes it only when there are enough rows to judge.
    """
    valid = np.flatnonzero(check.valid)
    if gathered.text:
        current = [e for e in (gathered.embeddings[i] for i in valid) if e is not None]
        cur = (
            np.stack([np.asarray(e, dtype=np.float64).reshape(-1) for e in current])
            if current
            else np.zeros((0, 1))
        )
        return core.embedding_frame(cur), None, core.METHOD_EMBEDDINGS
    method = core.METHOD_IMAGE if core.is_image(gathered.served) else core.METHOD_COLUMNS
    ref = core.feature_frame(gathered.reference, gathered.served)
    if not len(valid):
        return ref.iloc[0:0], ref, method
    cur = np.stack([np.asarray(gathered.rows[i], dtype=np.float64) for i in valid])
    return core.feature_frame(cur, gathered.served), ref, method


def reference_embeddings(gathered: Gathered) -> np.ndarray:
    """The reference version's embeddings of the reference texts, run as the engine runs them."""
    from serving.loader import load_version

    loaded = load_version(get_settings(), gathered.model, gathered.version)
    texts = np.asarray([str(t) for t in np.asarray(gathered.reference).reshape(-1)], dtype=object)
    outputs: list[np.ndarray] = []
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        outputs.append(np.asarray(loaded({gathered.served.name: batch})[gathered.output]))
    return np.concatenate(outputs, axis=0).reshape(len(texts), -1)


@dataclass(frozen=True)
class Detection:
    """A drift run's verdict, and the HTML report Evidently wrote (None when nothing ran)."""

    result: core.DriftResult
    html: Path | None


def detect_drift(
    gathered: Gathered, check: core.InputCheck, settings: core.DriftSettings, work_dir: Path
) -> Detection:
    """Judge the gathered rows against the reference (Evidently), when there are enough."""
    current, reference, method = frames(gathered, check)
    if len(current) < settings.min_samples:
        ref_rows = len(gathered.reference)
        return Detection(core.not_enough(len(current), ref_rows, method, settings), None)
    if reference is None:  # text: embeddings of the reference texts, only now that they count
        reference = core.embedding_frame(reference_embeddings(gathered))
    html = work_dir / f"drift-{gathered.model}.html"
    result = core.detect(current, reference, method=method, settings=settings, html=html)
    return Detection(result, html)


def record_report(
    gathered: Gathered,
    check: core.InputCheck,
    result: core.DriftResult,
    html: Path | None,
    flow_run_id: str | None,
) -> dict[str, Any]:
    """Store the HTML report (content-addressed, DVC-tracked), add the DriftReport row, and
    open (drift) or resolve (no drift) the model's drift alert; "not enough data" leaves the
    alert as it is. Returns the run's document (``kiln drift --json``)."""
    settings = get_settings()
    stored_path: str | None = None
    if html is not None:
        store = ArtifactStore.of(settings).ensure()
        with store.locked():
            stored_path = store.put(html, suffix=".html").path
    detail = {
        "reason": result.reason,
        "threshold": result.threshold,
        "reference_rows": result.reference_rows,
        "reference_version": gathered.version,
        "dataset": gathered.dataset,
        "records": gathered.records,
        "logged_rows": check.rows,
        "window_hours": gathered.window_hours,
        "versions_seen": gathered.versions_seen,
        "checks": check.to_dict(),
        "columns": result.columns,
    }
    with session_scope(settings.db_url) as session:
        row = crud.add_drift_report(
            session=session,
            report=DriftReport(
                model_name=gathered.model,
                version=gathered.traffic_version,
                drift_detected=result.drift_detected,
                drift_share=result.drift_share,
                samples=result.samples,
                method=result.method,
                report_path=stored_path,
                detail=detail,
                flow_run_id=flow_run_id,
            ),
        )
        report_id = row.id
    alert = _alert(gathered, result, stored_path)
    alerts.flush()  # the event goes out while this run's Prefect API is still up
    return {
        "model": gathered.model,
        "drift_detected": result.drift_detected,
        "drift_share": result.drift_share,
        "samples": result.samples,
        "report": str(settings.home / stored_path) if stored_path else None,
        "report_path": stored_path,
        "version": gathered.traffic_version,
        "reference_version": gathered.version,
        "method": result.method,
        "threshold": result.threshold,
        "reason": result.reason,
        "reference_rows": result.reference_rows,
        "checks": check.to_dict(),
        "alert": alert,
        "drift_report_id": report_id,
    }


def _alert(gathered: Gathered, result: core.DriftResult, report: str | None) -> str:
    """``opened`` / ``refreshed`` / ``resolved`` / ``unchanged``: what the verdict did."""
    url = get_settings().db_url
    if result.drift_detected is None:
        return "unchanged"
    if result.drift_detected:
        opened = alerts.fire(
            url,
            model=gathered.model,
            kind="drift",
            version=gathered.traffic_version,
            message=f"{gathered.model}: input drift ({result.reason})",
            value=result.drift_share,
            threshold=result.threshold,
            detail={"report": report, "method": result.method, "samples": result.samples},
        ).opened
        return "opened" if opened else "refreshed"
    resolved = alerts.clear(
        url,
        model=gathered.model,
        kind="drift",
        version=gathered.traffic_version,
        detail={"resolved_by": "no drift", "report": report},
    )
    return "resolved" if resolved is not None else "unchanged"


def markdown(doc: dict[str, Any], result: core.DriftResult) -> str:
    """The Prefect markdown artifact: verdict table, per-column tests, checks, the report."""
    verdict = {True: "**drift**", False: "no drift", None: core.NOT_ENOUGH}[doc["drift_detected"]]
    share = "-" if doc["drift_share"] is None else f"{doc['drift_share']:.3f}"
    lines = [
        f"# drift: {doc['model']}",
        "",
        "| model | traffic | reference | verdict | drift share | threshold | samples | "
        "reference rows | method | alert |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {doc['model']} | {doc['version'] or 'all versions'} | "
        f"{doc['reference_version']} | {verdict} | {share} | "
        f"{'-' if doc['threshold'] is None else doc['threshold']} | {doc['samples']} | "
        f"{doc['reference_rows']} | {doc['method']} | {doc['alert']} |",
        "",
        f"{doc['reason']}",
    ]
    rows = core.summary_rows(result)
    if rows:
        lines += ["", "| column | test | score | drifted |", "|---|---|---|---|"]
        lines += [f"| {r.column} | {r.stattest} | {r.score} | {r.drifted} |" for r in rows]
    checks = doc["checks"]
    lines += [
        "",
        f"Great Expectations: {checks['valid_rows']} of {checks['rows']} logged rows "
        f"valid ({checks['evaluated']} expectations)",
    ]
    lines += [f"- {failure}" for failure in checks["failures"]]
    lines += [
        "",
        f"HTML report (DVC-tracked): `{doc['report']}`"
        if doc["report"]
        else "No HTML report: too few rows to run Evidently.",
    ]
    return "\n".join(lines)


# Prefect tasks over the plain functions above
gather = task(name="gather-drift-inputs", cache_policy=NO_CACHE)(gather_inputs)
check = task(name="check-inputs-gx", cache_policy=NO_CACHE)(check_rows)
detect = task(name="detect-drift-evidently", cache_policy=NO_CACHE)(detect_drift)
record = task(name="record-drift-report", cache_policy=NO_CACHE)(record_report)
