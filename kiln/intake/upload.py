"""Upload: a model source (and optionally a dataset) into the registry and the artifact store.

One upload is one registry transaction: the model (if new), the version, its source artifact and
its dataset land together or not at all. Stored files are swept if the transaction never
commits (a killed upload leaves nothing behind after the next start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlmodel import Session

from kiln.errors import Conflict, InvalidInput, TooLarge, UnsafeSource
from kiln.faults import failpoint
from kiln.intake.formats import (
    URL_RE,
    Source,
    SourceFormat,
    classify_source,
    onnx_external_files,
    pack_folder,
    read_kiln_yaml,
    unpack_folder,
    validate_name,
)
from kiln.intake.probe import probe_source
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import ArtifactKind, Model, ModelVersion, Task
from kiln.settings import Settings
from kiln.spec import ModelSpec
from kiln.store.artifacts import ArtifactStore, StoredFile, sha256_file

DATASET_SUFFIXES = (".npz", ".parquet")


class DatasetSummary(BaseModel):
    name: str
    sha256: str
    rows: int
    check_passed: bool
    failures: list[str]


class UploadResult(BaseModel):
    """What ``kiln upload --json`` prints (name, version, sha256, status are the stable keys)."""

    name: str
    version: str
    sha256: str
    status: str
    created: bool
    dataset: DatasetSummary | None = None


def open_store(settings: Settings) -> ArtifactStore:
    """The artifact store, created if needed, with a killed operation's leftovers swept."""
    store = ArtifactStore.of(settings).ensure()
    with session_scope(settings.db_url) as session:
        referenced = crud.stored_paths(session=session)
    store.sweep(referenced)
    return store


def _check_dataset_path(dataset: str, *, max_bytes: int) -> Path:
    if URL_RE.match(dataset):
        raise UnsafeSource(f"--dataset {dataset!r} is a URL; pass a local .npz or .parquet file")
    path = Path(dataset)
    if path.is_symlink() or not path.is_file():
        raise InvalidInput(f"--dataset {dataset!r} is not a regular file")
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise InvalidInput(f"--dataset {path.name}: use a .npz (inputs, labels) or a .parquet")
    if path.stat().st_size > max_bytes:
        raise TooLarge(f"--dataset {path.name} is over the limit of {max_bytes} bytes")
    return path


def _stage(source: Source, stage: Path) -> tuple[Path, Path, str]:
    """(file to store, path to probe, stored suffix) for ``source``, built inside ``stage``."""
    if source.format is SourceFormat.kiln:
        packed = pack_folder(source.path, stage / "source.tar")
        # Probe exactly what is stored: the packed folder, unpacked again.
        return packed, unpack_folder(packed, stage / "unpacked"), ".tar"
    if source.format is SourceFormat.onnx and onnx_external_files(source.path):
        import onnx

        # External data (already checked to stay in its folder) is folded into one file.
        merged = stage / "model.onnx"
        onnx.save(onnx.load(str(source.path)), str(merged))
        return merged, merged, ".onnx"
    return source.path, source.path, f".{source.format}"


def _task_from_outputs(spec: ModelSpec) -> Task | None:
    """The task a lone float output implies, when nothing else tells: ``[batch, C]`` with C >= 2
    is class scores (judged by top-1 agreement with the baseline), ``[batch]`` or ``[batch, 1]``
    a regression; anything else stays ambiguous (an embedding needs ``--task embedding``)."""
    if len(spec.outputs) != 1 or spec.outputs[0].datatype not in ("FP16", "BF16", "FP32", "FP64"):
        return None
    shape = spec.outputs[0].shape
    if len(shape) == 2 and shape[1] >= 2:
        return Task.classification
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return Task.regression
    return None


def _resolve_task(
    *,
    task: str | None,
    source: Source,
    probe_dir: Path,
    model: Model | None,
    labels: Any,
    spec: ModelSpec,
) -> Task:
    if task is not None:
        try:
            return Task(task)
        except ValueError:
            raise InvalidInput(
                f"--task {task!r}: use classification, regression or embedding"
            ) from None
    if model is not None:
        return Task(model.task)
    if source.format is SourceFormat.kiln and (declared := read_kiln_yaml(probe_dir).task):
        return Task(declared)
    if labels is not None:
        return Task.classification if labels.dtype.kind in "iu" else Task.regression
    if (inferred := _task_from_outputs(spec)) is not None:
        return inferred
    raise InvalidInput(
        "cannot tell the model's task: pass --task classification|regression|embedding, "
        "or a --dataset with labels"
    )


def _num_classes(spec: ModelSpec, task: Task) -> int | None:
    if task is not Task.classification:
        return None
    shape = spec.outputs[0].shape
    return shape[-1] if len(shape) == 2 and shape[-1] > 0 else None


def _existing(session: Session, *, name: str, version: str | None, sha: str) -> ModelVersion | None:
    """An identical earlier upload (a no-op), or Conflict if ``version`` holds other content."""
    model = crud.get_model(session=session, name=name)
    if model is None:
        return None
    if version is not None:
        found = crud.get_version(session=session, model=model, version=version)
        if found is not None and found.source_sha256 != sha:
            raise Conflict(
                f"{name}@{version} already exists with other content; versions are immutable: "
                "upload it as a new version (omit --version to bump the patch)"
            )
        return found
    same = [v for v in crud.list_versions(session=session, model=model) if v.source_sha256 == sha]
    return same[-1] if same else None


def upload(
    *,
    settings: Settings,
    name: str,
    source: str,
    version: str | None = None,
    dataset: str | None = None,
    task: str | None = None,
) -> UploadResult:
    """Register ``source`` as ``name``'s next (or given) version."""
    store = open_store(settings)  # first: sweeps what a killed upload left, even if this fails
    validate_name(name)
    if version is not None:
        crud.parse_version(version)
    src = classify_source(source, max_bytes=settings.max_upload_bytes)
    dataset_path = (
        _check_dataset_path(dataset, max_bytes=settings.max_upload_bytes) if dataset else None
    )
    with store.staging() as stage:
        to_store, to_probe, suffix = _stage(src, stage)
        sha = sha256_file(to_store)
        with session_scope(settings.db_url) as session:
            if (same := _existing(session, name=name, version=version, sha=sha)) is not None:
                return UploadResult(
                    name=name, version=same.version, sha256=sha, status=same.status, created=False
                )
            model = crud.get_model(session=session, name=name)
        spec = probe_source(src.format, to_probe, timeout_s=settings.load_timeout_s)
        data = check = None
        if dataset_path is not None:
            from kiln.intake.datasets import check_dataset, load_dataset

            data = load_dataset(dataset_path)
        resolved = _resolve_task(
            task=task,
            source=src,
            probe_dir=to_probe,
            model=model,
            labels=data.labels if data is not None else None,
            spec=spec,
        )
        if data is not None:
            check = check_dataset(
                data, spec=spec, task=str(resolved), num_classes=_num_classes(spec, resolved)
            )
        failpoint("upload.before_store")
        with store.locked():
            return _commit(
                settings,
                store,
                name=name,
                version=version,
                task=resolved,
                sha=sha,
                src=src,
                to_store=to_store,
                suffix=suffix,
                spec=spec,
                dataset_path=dataset_path,
                check=check,
            )


def _commit(
    settings: Settings,
    store: ArtifactStore,
    *,
    name: str,
    version: str | None,
    task: Task,
    sha: str,
    src: Source,
    to_store: Path,
    suffix: str,
    spec: ModelSpec,
    dataset_path: Path | None,
    check: Any,
) -> UploadResult:
    """Store the files and write the rows, under the store lock; undo the files on failure."""
    written: list[StoredFile] = []
    try:
        with session_scope(settings.db_url) as session:
            if (same := _existing(session, name=name, version=version, sha=sha)) is not None:
                return UploadResult(
                    name=name, version=same.version, sha256=sha, status=same.status, created=False
                )
            model = crud.get_model(session=session, name=name) or crud.create_model(
                session=session, name=name, task=task
            )
            number = version or crud.next_version(session=session, model=model)
            stored = store.put(to_store, suffix=suffix)
            written.append(stored)
            row = crud.create_version(
                session=session,
                model=model,
                version=number,
                source_format=str(src.format),
                source_sha256=sha,
                spec=spec.model_dump(mode="json"),
                meta={"source_name": src.path.name},
            )
            crud.add_artifact(
                session=session,
                version=row,
                kind=ArtifactKind.source,
                backend="onnxruntime" if src.format is SourceFormat.onnx else "torch-eager",
                path=stored.path,
                sha256=stored.sha256,
                size=stored.size,
                dvc_hash=stored.dvc_hash,
                selected=True,
            )
            summary = None
            if dataset_path is not None and check is not None:
                data_file = store.put(dataset_path, suffix=dataset_path.suffix.lower())
                written.append(data_file)
                crud.add_dataset(
                    session=session,
                    model=model,
                    version=row,
                    name=dataset_path.stem,
                    path=data_file.path,
                    sha256=data_file.sha256,
                    size=data_file.size,
                    dvc_hash=data_file.dvc_hash,
                    rows=check.rows,
                    check_passed=check.success,
                    check=check.model_dump(mode="json"),
                )
                summary = DatasetSummary(
                    name=dataset_path.stem,
                    sha256=data_file.sha256,
                    rows=check.rows,
                    check_passed=check.success,
                    failures=[
                        f"{f.expectation}({f.column or 'table'}): {f.detail}"
                        for f in check.failures
                    ],
                )
            failpoint("upload.before_commit")
            result = UploadResult(
                name=name,
                version=number,
                sha256=sha,
                status=row.status,
                created=True,
                dataset=summary,
            )
        return result
    except DBIntegrityError:
        _undo(store, written)
        raise Conflict(
            f"{name}: another upload wrote the same version at the same time; run the upload again"
        ) from None
    except BaseException:
        _undo(store, written)
        raise


def _undo(store: ArtifactStore, written: list[StoredFile]) -> None:
    for stored in written:
        if stored.created:
            store.discard(stored.path)
