"""Prefect tasks of the optimize pipeline: thin wrappers over ``kiln.optimize.pipeline``'s stages.

Inputs are in-process objects (arrays, paths), so caching by input hash is off (NO_CACHE); the
registry, not Prefect's result store, is the record of a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.backends import get_backend
from kiln.backends.base import ExtractedModel
from kiln.optimize import pipeline as stages
from kiln.optimize.extract import Extraction
from kiln.optimize.validate import VariantReport, judge
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import ArtifactKind, ModelVersion, OptimizationJob
from kiln.settings import get_settings
from kiln.store.artifacts import ArtifactStore

KIND_OF = {
    "onnxruntime": ArtifactKind.onnx,
    "inductor": ArtifactKind.compiled,
    "tensorrt": ArtifactKind.compiled,
    "torch-eager": ArtifactKind.exported,
}


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(
    name: str, version: str | None, work_dir: Path, flow_run_id: str | None
) -> stages.Prepared:
    return stages.start(
        get_settings(), name=name, version=version, work_dir=work_dir, flow_run_id=flow_run_id
    )


@task(name="extract", cache_policy=NO_CACHE)
def extract(prepared: stages.Prepared, work_dir: Path) -> Extraction:
    return stages.extract_stage(get_settings(), prepared, work_dir)


@task(name="prune", cache_policy=NO_CACHE)
def prune(
    prepared: stages.Prepared, extracted: ExtractedModel, work_dir: Path
) -> stages.Pruned | None:
    return stages.prune_stage(prepared, extracted, work_dir)


@task(name="baseline", cache_policy=NO_CACHE)
def baseline(prepared: stages.Prepared, extracted: ExtractedModel) -> stages.Measured:
    """The fp32 eager baseline, measured: what every variant is judged against."""
    backend = get_backend("torch-eager")
    built = backend.build(extracted, "fp32", extracted.onnx.parent)
    runner = backend.load(built.path, spec=prepared.spec)
    measured = stages.measure(prepared, runner, None)
    report = measured.report
    report.backend, report.precision = "torch-eager", "fp32"
    report.size_bytes = built.path.stat().st_size
    report.passed = True
    report.meta = {"path": str(built.path), **built.meta}
    return measured


def _job(prepared: stages.Prepared, kind: str) -> int:
    with session_scope(get_settings().db_url) as session:
        row = cast(
            ModelVersion,
            crud.get_version_by_id(session=session, version_id=prepared.version_id),
        )
        job = crud.create_job(session=session, version=row, optimization_type=kind)
        crud.update_job(session=session, job=job, status="running", progress=5)
        return job.id  # type: ignore[return-value]


def _update_job(job_id: int, **changes: Any) -> None:
    with session_scope(get_settings().db_url) as session:
        job = cast(OptimizationJob, crud.get_job(session=session, job_id=job_id))
        crud.update_job(session=session, job=job, **changes)


def builder() -> str:
    """The machine this process runs on: ``ray:<node id> <node ip>`` inside a Ray task (a
    variant built on a Ray cluster), else the host name."""
    import socket
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            node = ray.get_runtime_context().get_node_id()
            return f"ray:{node[:16]} {ray.util.get_node_ip_address()}"  # type: ignore[no-untyped-call]
    return socket.gethostname()


@task(name="build-and-validate-variant", cache_policy=NO_CACHE)
def variant(
    prepared: stages.Prepared,
    extracted: ExtractedModel,
    base: VariantReport,
    base_outputs: np.ndarray,
    backend_name: str,
    precision: str,
    work_dir: Path,
    label: str | None = None,
    notes: dict[str, Any] | None = None,
) -> VariantReport:
    """Build one variant, judge it against the baseline; failures are recorded, not raised.

    ``label`` reports the variant under another precision name (``fp32-pruned``: a pruned model
    built as fp32); ``notes`` go into its meta (the pruning record).
    """
    shown = label or precision
    job_id = _job(prepared, f"{backend_name}/{shown}")
    started = time.perf_counter()
    out_dir = work_dir / f"{backend_name}-{shown}"
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = get_backend(backend_name)
    try:
        built = backend.build(extracted, precision, out_dir, calibration=prepared.calibration)
        _update_job(job_id, progress=40)
        report = _measure(prepared, backend, shown, built.path, base_outputs, base)
        report.meta.update({**built.meta, **(notes or {})})
        if stages.wants_accuracy_aware(precision, report):
            report = _accuracy_aware(
                prepared, extracted, backend, base, base_outputs, out_dir, report
            )
        report.meta["build_and_validate_s"] = stages.seconds_since(started)
        _update_job(job_id, progress=90)
        artifact_id = _store(prepared, report, Path(report.meta["path"]))
        _update_job(
            job_id,
            status="passed" if report.passed else "failed-gate",
            progress=100,
            metrics=report.model_dump(mode="json"),
            result_artifact_id=artifact_id,
        )
    except Exception as exc:  # a variant that cannot be built is a row, not a failed run
        reason = stages.error_summary(exc)
        report = VariantReport(
            backend=backend_name,
            precision=shown,
            metric=float("nan"),
            passed=False,
            reasons=[f"build failed: {reason}"],
        )
        _update_job(job_id, status="failed", progress=100, error=reason)
    return report


def _measure(
    prepared: stages.Prepared,
    backend: Any,
    precision: str,
    path: Path,
    base_outputs: np.ndarray,
    base: VariantReport,
) -> VariantReport:
    runner = backend.load(path, spec=prepared.spec)
    report = stages.measure(prepared, runner, base_outputs).report
    report.backend, report.precision = backend.name, precision
    report.size_bytes = path.stat().st_size
    report.meta = {"path": str(path)}
    return judge(prepared.task, report, base, prepared.settings.gates)


def _accuracy_aware(
    prepared: stages.Prepared,
    extracted: ExtractedModel,
    backend: Any,
    base: VariantReport,
    base_outputs: np.ndarray,
    out_dir: Path,
    first: VariantReport,
) -> VariantReport:
    """Retry static int8 with the most sensitive nodes kept in float (kiln.backends.ort_quantize)."""
    from kiln.backends.ort_quantize import accuracy_aware_quantize
    from kiln.optimize.validate import quality, run_all

    gates = prepared.settings.gates

    def metric_of(path: Path) -> float:
        outputs = run_all(
            backend.load(path, spec=prepared.spec), prepared.inputs, mask_index=prepared.mask_index
        )[0]
        q = quality(prepared.task, outputs, base_outputs, prepared.labels)
        return gates.gated_metric(prepared.task, q)

    target = out_dir / "model.accuracy-aware.onnx"
    # start from the graph the variant was built on (fused where fusion applied)
    graph = backend.float_graph(extracted, check_inputs=prepared.calibration).path
    result = accuracy_aware_quantize(
        graph,
        target,
        calibration=prepared.calibration or [],
        evaluate=metric_of,
        baseline_metric=base.metric,
        max_drop=gates.allowed_drop(prepared.task, base.metric),
        budget=prepared.settings.accuracy_aware_budget,
    )
    report = _measure(prepared, backend, "int8-static", target, base_outputs, base)
    report.meta.update(
        {
            "accuracy_aware": result.model_dump(mode="json"),
            "nodes_in_float": result.nodes_excluded,
            "first_attempt": {"metric": first.metric, "reasons": first.reasons},
        }
    )
    return report


def _store(prepared: stages.Prepared, report: VariantReport, path: Path) -> int:
    settings = get_settings()
    store = ArtifactStore.of(settings).ensure()  # a Ray node's home may be new
    with store.locked(), session_scope(settings.db_url) as session:
        stored = store.put(path, suffix=path.suffix or ".bin")
        kind = (
            ArtifactKind.quantized
            if report.precision.startswith("int8")
            else KIND_OF[report.backend]
        )
        row = crud.add_artifact(
            session=session,
            version=cast(
                ModelVersion,
                crud.get_version_by_id(session=session, version_id=prepared.version_id),
            ),
            kind=kind,
            backend=report.backend,
            precision=report.precision,
            path=stored.path,
            sha256=stored.sha256,
            size=stored.size,
            dvc_hash=stored.dvc_hash,
            built_on=builder(),
        )
        report.meta["built_on"] = row.built_on
        report.meta["path"] = stored.path
        report.meta["sha256"] = stored.sha256
        return row.id  # type: ignore[return-value]


@task(name="record", cache_policy=NO_CACHE)
def record(
    prepared: stages.Prepared,
    extracted: ExtractedModel,
    parity: dict[str, Any],
    base: VariantReport,
    reports: list[VariantReport],
) -> dict[str, Any]:
    return stages.finish(get_settings(), prepared, extracted, parity, base, reports)
