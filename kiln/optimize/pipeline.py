"""The optimize stages as plain functions: prepare, extract, build variants, judge, record.

``flows/optimize.py`` chains them as Prefect tasks; tests call them directly. Each stage reads
the registry through ``kiln.registry.crud`` and writes artifacts through the store, so a run leaves an
``OptimizationJob`` row per variant, every artifact hashed and DVC-tracked, and the version
``validated`` (a variant or the baseline selected) or ``rejected`` (extraction failed).
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, Field

from kiln.backends.base import ExtractedModel
from kiln.backends.ort_quantize import ACCURACY_AWARE_BUDGET
from kiln.errors import Conflict, KilnError
from kiln.intake.formats import unpack_folder
from kiln.optimize.extract import Extraction
from kiln.optimize.prune import PRUNE_RATIO
from kiln.optimize.validate import GateSettings, TimingSettings, VariantReport
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import ArtifactKind, OptimizationJob, Task, VersionStatus
from kiln.settings import Settings
from kiln.spec import ModelSpec
from kiln.store.artifacts import ArtifactStore, Recorded

CALIBRATION_ROWS = 128


@dataclass(frozen=True)
class PlannedVariant:
    """One variant a run builds: a backend at a precision, reported under ``label`` when it
    is not the precision's own name (``fp32-pruned``: the pruned model built as fp32)."""

    backend: str
    precision: str
    label: str | None = None
    gpu: bool = False  # to run where a GPU is (a Ray task asking for one)

    @property
    def shown(self) -> str:
        """The precision the report shows."""
        return self.label or self.precision


PRUNED = PlannedVariant("onnxruntime", "fp32", label="fp32-pruned")


class OptimizeSettings(BaseModel):
    """What one optimize run builds and how it judges; per model in ``settings["optimize"]``."""

    gates: GateSettings = GateSettings()
    timing: TimingSettings = TimingSettings()
    backends: list[str] | None = None  # None: every backend available on this host
    precisions: dict[str, list[str]] = {
        "onnxruntime": ["fp32", "int8-dynamic", "int8-static"],
        "inductor": ["fp32", "fp16", "bf16"],
        "tensorrt": ["fp32", "fp16"],
    }
    accuracy_aware_budget: int = ACCURACY_AWARE_BUDGET
    prune: bool = False  # structured pruning pass (off by default): one more variant, PRUNED
    # share of each layer's channels
    prune_ratio: float = Field(default=PRUNE_RATIO, gt=0.0, lt=1.0)

    @classmethod
    def for_model(cls, model_settings: dict[str, Any]) -> OptimizeSettings:
        return cls.model_validate(model_settings.get("optimize", {}))


@dataclass
class Prepared:
    """What every later stage of one run needs, resolved once."""

    version_id: int
    name: str
    version: str
    task: Task
    spec: ModelSpec
    source_format: str
    source_path: Path  # a verified copy (or unpacked folder) inside the run's work dir
    inputs: list[np.ndarray]  # evaluation inputs, in the model's input order
    labels: np.ndarray | None
    calibration: list[np.ndarray] | None
    data_note: str
    settings: OptimizeSettings
    parent_job_id: int
    skipped: list[str] = field(default_factory=list)

    @property
    def mask_index(self) -> int | None:
        """Which input is the attention mask (its padding is trimmed per batch), if any."""
        names = [t.name for t in self.spec.inputs]
        return names.index("attention_mask") if "attention_mask" in names else None


def start(
    settings: Settings,
    *,
    name: str,
    version: str | None,
    work_dir: Path,
    flow_run_id: str | None = None,
) -> Prepared:
    """Mark the version ``optimizing``, open the run's job, and resolve its data."""
    store = ArtifactStore.of(settings).ensure()
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        model = crud.require_model(session=session, name=name)
        if row.status == VersionStatus.uploaded:
            crud.set_version_status(session=session, version=row, status=VersionStatus.optimizing)
        elif row.status != VersionStatus.optimizing:  # optimizing: a crashed run, re-run it
            raise Conflict(
                f"{name}@{row.version} is {row.status}; versions are optimized once "
                "(re-optimization registers a new patch version)"
            )
        source = next(
            a
            for a in crud.list_artifacts(session=session, version=row)
            if a.kind == ArtifactKind.source
        )
        dataset = crud.dataset_for(session=session, version=row)
        failed = [d for d in crud.list_datasets(session=session, model=model) if not d.check_passed]
        job = crud.create_job(session=session, version=row, optimization_type="optimize")
        crud.update_job(session=session, job=job, status="running", flow_run_id=flow_run_id)
        spec = ModelSpec.model_validate(row.spec)
        opt = OptimizeSettings.for_model(model.settings)
        prepared_source = _copy_source(store, source, row.source_format, work_dir)
        data_path = store.fetch(dataset) if dataset else None
        # a stored version, and a job the flush above just inserted: both have their ids
        assert row.id is not None and job.id is not None
        ids = (row.id, job.id, str(model.task), row.version, row.source_format)
    inputs, labels, note = _evaluation_data(spec, prepared_source, data_path)
    skipped = []
    calibration = None
    if data_path is not None:
        calibration = [x[:CALIBRATION_ROWS] for x in inputs]
    else:
        reason = (
            "its dataset failed its Great Expectations check"
            if failed
            else "it has no registered dataset"
        )
        skipped.append(
            f"onnxruntime/int8-static skipped: {reason} (static quantization needs "
            "calibration data: kiln upload --dataset)"
        )
    return Prepared(
        version_id=ids[0],
        name=name,
        version=ids[3],
        task=Task(ids[2]),
        spec=spec,
        source_format=ids[4],
        source_path=prepared_source,
        inputs=inputs,
        labels=labels,
        calibration=calibration,
        data_note=note,
        settings=opt,
        parent_job_id=ids[1],
        skipped=skipped,
    )


def _copy_source(store: ArtifactStore, source: Recorded, fmt: str, work_dir: Path) -> Path:
    path = store.fetch(source)
    if fmt == "kiln":
        return unpack_folder(path, work_dir / "source")
    dest = work_dir / f"source.{fmt}"
    shutil.copyfile(path, dest)
    return dest


def _evaluation_data(
    spec: ModelSpec, source: Path, data_path: Path | None
) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """Model-ready evaluation inputs (tokenized for text models), labels, and a note."""
    from kiln.intake.probe import SAMPLE_DYNAMIC, SAMPLE_ROWS, sample_inputs

    if data_path is None:
        tensors = sample_inputs(spec.inputs, batch=SAMPLE_ROWS, dynamic=SAMPLE_DYNAMIC)
        return [t.numpy() for t in tensors], None, f"{SAMPLE_ROWS} random sample inputs"
    from kiln.intake.datasets import load_dataset

    data = load_dataset(data_path)
    if spec.preprocess is not None:
        # Sorted by length, batches hold sentences of similar length: little padding to trim.
        order = np.argsort([len(str(s)) for s in data.inputs], kind="stable")
        inputs = tokenize(
            source / spec.preprocess.file,
            [str(data.inputs[i]) for i in order],
            max_length=spec.preprocess.max_length,
            names=spec.inputs,
        )
        labels = data.labels[order] if data.labels is not None else None
    else:
        inputs = [data.inputs.astype(_np_dtype(spec.inputs[0].datatype))]
        labels = data.labels
    return inputs, labels, f"dataset {data_path.stem} ({len(inputs[0])} rows)"


def _np_dtype(datatype: str) -> np.dtype:
    from kiln.spec import numpy_of_datatype

    return numpy_of_datatype(datatype)


def tokenize(
    tokenizer_file: Path, texts: list[str], *, max_length: int, names: list[Any]
) -> list[np.ndarray]:
    """Token ids and attention mask for ``texts``, padded to the longest row."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    arrays = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }
    return [arrays[n.name] for n in names]


def extract_stage(settings: Settings, prepared: Prepared, work_dir: Path) -> Extraction:
    """Graph extraction; on failure the version becomes ``rejected`` and the error is raised."""
    from kiln.optimize.isolated import extract_isolated

    check = [x[:8] for x in prepared.inputs]
    try:
        return extract_isolated(
            source_format=prepared.source_format,
            source_path=prepared.source_path,
            spec=prepared.spec,
            out_dir=work_dir / "extract",
            check_inputs=check,
            timeout_s=settings.load_timeout_s,
        )
    except KilnError as exc:
        finish_rejected(settings, prepared, str(exc))
        raise


def finish_rejected(settings: Settings, prepared: Prepared, reason: str) -> None:
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=prepared.name, version=prepared.version)
        crud.set_version_status(session=session, version=row, status=VersionStatus.rejected)
        job = cast(OptimizationJob, crud.get_job(session=session, job_id=prepared.parent_job_id))
        crud.update_job(session=session, job=job, status="failed", error=reason, progress=100)


@dataclass(frozen=True)
class Pruned:
    """The pruned model, extracted again, and its pruning record (``prune_structured``'s,
    with the re-extraction's ``parity``): the ``PRUNED`` variant's input and notes."""

    model: ExtractedModel
    pruning: dict[str, Any]


def prune_stage(prepared: Prepared, extracted: ExtractedModel, work_dir: Path) -> Pruned | None:
    """The structured-pruning pass: the program pruned (``kiln.optimize.prune``), then extracted again
    (ONNX, parity), for the ``PRUNED`` variant. None, with the reason in ``prepared.skipped``,
    when it cannot be built: the other variants proceed."""
    from kiln.backends import get_backend
    from kiln.optimize.extract import extract
    from kiln.optimize.prune import prune_structured

    label = f"{PRUNED.backend}/{PRUNED.shown} skipped"
    if extracted.program is None:
        prepared.skipped.append(
            f"{label}: pruning edits a torch program, and this model was "
            "uploaded as ONNX (upload a .pt2 or kiln.yaml folder)"
        )
        return None
    if not (availability := get_backend(PRUNED.backend).available()).ok:
        prepared.skipped.append(f"{label}: {availability.reason}")
        return None
    out = work_dir / "pruned"
    try:
        record = prune_structured(
            extracted.program,
            out / "pruned.pt2",
            ratio=prepared.settings.prune_ratio,
            spec=prepared.spec,
        )
        pruned = extract(
            source_format="pt2",
            source_path=out / "pruned.pt2",
            spec=prepared.spec,
            out_dir=out,
            check_inputs=[x[:8] for x in prepared.inputs],
        )
    except Exception as exc:  # a variant that cannot be built is a note, not a failed run
        prepared.skipped.append(f"{label}: {error_summary(exc)}")
        return None
    return Pruned(pruned.model, {**record, "parity": pruned.report["parity"]})


def plan(prepared: Prepared, *, cluster_gpus: float = 0.0) -> list[PlannedVariant]:
    """The variants this host can build for this model (``PRUNED`` aside). ``cluster_gpus``:
    the GPUs a Ray cluster reports; a GPU backend this host cannot run is then planned for a
    node that has one (``gpu``), at every precision the settings ask of it."""
    from kiln.backends import REGISTRY

    wanted = prepared.settings.backends
    variants = []
    for name, backend in REGISTRY.items():
        if name == "torch-eager" or (wanted is not None and name not in wanted):
            continue
        if backend.needs_gpu and cluster_gpus >= 1 and not backend.available().ok:
            variants += [
                PlannedVariant(name, precision, gpu=True)
                for precision in prepared.settings.precisions.get(name, [])
                if precision in backend.precisions
                and (precision != "int8-static" or prepared.calibration is not None)
            ]
            continue
        if not (availability := backend.available()).ok:
            prepared.skipped.append(f"{name} skipped: {availability.reason}")
            continue
        for precision in prepared.settings.precisions.get(name, []):
            if precision == "int8-static" and prepared.calibration is None:
                continue
            if not (supported := backend.supports(precision)).ok:
                prepared.skipped.append(f"{name}/{precision} skipped: {supported.reason}")
                continue
            variants.append(PlannedVariant(name, precision))
    return variants


@dataclass(frozen=True)
class Measured:
    """A variant measured (its report, backend and precision still to be filled in) and its
    first output over every evaluation row (the baseline's is what variants are compared to)."""

    report: VariantReport
    outputs: np.ndarray


def measure(
    prepared: Prepared,
    runner: Any,
    baseline_outputs: np.ndarray | None,
) -> Measured:
    """Quality and speed of a loaded variant (the baseline when ``baseline_outputs`` is None)."""
    from kiln.optimize.validate import evaluate

    evaluation = evaluate(
        prepared.task,
        runner,
        prepared.inputs,
        baseline_outputs=baseline_outputs,
        labels=prepared.labels,
        timing_settings=prepared.settings.timing,
        mask_index=prepared.mask_index,
    )
    quality, speed = evaluation.quality, evaluation.speed
    report = VariantReport(
        backend="",
        precision="",
        metric=quality.metric,
        metric_min=quality.metric_min,
        agreement=quality.agreement,
        latency_ms=speed.latency_ms if speed else {},
        throughput=speed.throughput if speed else {},
    )
    return Measured(report, evaluation.outputs)


def wants_accuracy_aware(precision: str, report: VariantReport) -> bool:
    """Whether a judged variant gets the accuracy-aware retry (``accuracy_aware_quantize``):
    static int8 that failed the quality gate, as ``judge`` recorded in ``failed_gates``. One
    that is only too slow is not retried: nodes kept in float would make it slower still."""
    return precision == "int8-static" and "quality" in report.failed_gates


def error_summary(exc: BaseException) -> str:
    """One readable line for a failed variant (the registry keeps it; no traceback)."""
    if isinstance(exc, KilnError):
        return str(exc)
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return " ".join(last.split())[:500]


def seconds_since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


VARIANT_KEYS = (
    "backend",
    "precision",
    "metric",
    "metric_min",
    "metric_drop",
    "passed",
    "latency_ms",
    "throughput",
    "size_bytes",
)


def public(report: VariantReport) -> dict[str, Any]:
    """A VARIANT as docs/interfaces.md lists it (stable keys first; extras after)."""
    doc = report.model_dump(mode="json")
    return {
        **{k: doc[k] for k in VARIANT_KEYS},
        **{k: doc[k] for k in ("speedup", "agreement", "reasons")},
    }


def markdown_table(
    name: str,
    version: str,
    base: VariantReport,
    reports: list[VariantReport],
    selected: VariantReport,
    reason: str,
    skipped: list[str],
) -> str:
    """The run's variant table, for Prefect's UI and the CLI."""
    lines = [
        f"# {name}@{version}: optimize report",
        "",
        f"**Selected:** {selected.backend}/{selected.precision}. {reason}",
        "",
        "| backend | precision | metric | drop | p50 b1 ms | p50 b32 ms | speedup | size |"
        " passed | why not |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [base, *reports]:
        b1 = r.latency_ms.get("1", {}).get("p50", float("nan"))
        b32 = r.latency_ms.get("32", {}).get("p50", float("nan"))
        lines.append(
            f"| {r.backend} | {r.precision} | {r.metric:.4f} | {r.metric_drop:+.4f} | "
            f"{b1:.3f} | {b32:.3f} | {r.speedup or 1.0:.2f}x | {r.size_bytes} | "
            f"{'yes' if r.passed else 'no'} | {'; '.join(r.reasons)} |"
        )
    lines += ["", *[f"- {s}" for s in skipped]]
    return "\n".join(lines)


def chart(path: Path, base: VariantReport, reports: list[VariantReport], batch: str) -> Path:
    """A PNG of latency against quality, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in [base, *reports]:
        if batch not in r.latency_ms or np.isnan(r.metric):
            continue
        x = r.latency_ms[batch]["p50"]
        ax.scatter(x, r.metric, color="tab:green" if r.passed else "tab:red", s=40)
        ax.annotate(
            f"{r.backend}/{r.precision}",
            (x, r.metric),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel("metric (higher is better)")
    ax.set_title("variants: latency against quality (green passed the gates)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def finish(
    settings: Settings,
    prepared: Prepared,
    extracted: ExtractedModel,
    parity: dict[str, Any],
    base: VariantReport,
    reports: list[VariantReport],
) -> dict[str, Any]:
    """Select, store the exported program and the chart, mark the version ``validated``."""
    from kiln.optimize.validate import select

    selection = select(base, reports, prepared.settings.gates)
    selected, reason = selection.variant, selection.reason
    work = extracted.onnx.parent
    figure = chart(work / "variants.png", base, reports, str(prepared.settings.gates.serving_batch))
    table = markdown_table(
        prepared.name, prepared.version, base, reports, selected, reason, prepared.skipped
    )
    store = ArtifactStore.of(settings)
    with store.locked(), session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=prepared.name, version=prepared.version)
        stored_chart = store.put(figure, suffix=".png")
        crud.add_artifact(
            session=session,
            version=row,
            kind=ArtifactKind.report,
            backend="-",
            precision="-",
            path=stored_chart.path,
            sha256=stored_chart.sha256,
            size=stored_chart.size,
            dvc_hash=stored_chart.dvc_hash,
        )
        exported_path = None
        if extracted.program is not None:
            exported = store.put(extracted.program, suffix=".pt2")
            exported_path = exported.path
            if exported.path not in {
                a.path for a in crud.list_artifacts(session=session, version=row)
            }:
                crud.add_artifact(
                    session=session,
                    version=row,
                    kind=ArtifactKind.exported,
                    backend="torch-eager",
                    precision="fp32",
                    path=exported.path,
                    sha256=exported.sha256,
                    size=exported.size,
                    dvc_hash=exported.dvc_hash,
                )
        chosen_path = selected.meta.get("path") if selected is not base else exported_path
        crud.mark_selected_artifact(session=session, version=row, path=chosen_path)
        crud.set_version_status(session=session, version=row, status=VersionStatus.validated)
        doc = {
            "job_id": prepared.parent_job_id,
            "status": "validated",
            "baseline": public(base),
            "variants": [public(r) for r in reports],
            "selected": public(selected),
            "reason": reason,
            "skipped": prepared.skipped,
            "parity": parity,
            "data": prepared.data_note,
            "chart": str(settings.home / stored_chart.path),
        }
        job = cast(OptimizationJob, crud.get_job(session=session, job_id=prepared.parent_job_id))
        crud.update_job(session=session, job=job, status="done", progress=100, metrics=doc)
    doc["markdown"] = table
    return doc
