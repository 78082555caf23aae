"""Read-only views of the registry, shaped as the ``--json`` documents of docs/interfaces.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.settings import Settings


def list_models_view(settings: Settings) -> dict[str, Any]:
    with session_scope(settings.db_url) as session:
        return {
            "models": [
                {
                    "name": m.name,
                    "task": str(m.task),
                    "versions": [
                        {"version": v.version, "status": str(v.status), "sha256": v.source_sha256}
                        for v in crud.list_versions(session=session, model=m)
                    ],
                }
                for m in crud.list_models(session=session)
            ]
        }


def show_version_view(settings: Settings, *, name: str, version: str | None) -> dict[str, Any]:
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        model = crud.require_model(session=session, name=name)
        return {
            "name": name,
            "version": row.version,
            "status": str(row.status),
            "task": str(model.task),
            "source_format": row.source_format,
            "sha256": row.source_sha256,
            "spec": row.spec,
            "created_at": row.created_at.isoformat(),
            "artifacts": [
                {
                    "kind": str(a.kind),
                    "backend": a.backend,
                    "precision": a.precision,
                    "sha256": a.sha256,
                    "size": a.size,
                    "path": str(settings.home / a.path),
                    "selected": a.selected,
                }
                for a in crud.list_artifacts(session=session, version=row)
            ],
            "datasets": [
                {
                    "name": d.name,
                    "sha256": d.sha256,
                    "rows": d.rows,
                    "check_passed": d.check_passed,
                    "path": str(settings.home / d.path),
                }
                for d in crud.list_datasets(session=session, model=model)
                if d.version_id in (None, row.id)
            ],
            "jobs": [
                {"id": j.id, "status": j.status, "progress": j.progress}
                for j in crud.list_jobs(session=session, version=row)
            ],
        }


@dataclass(frozen=True)
class JobProgress:
    """How far a version's optimize run is, for progress bars."""

    percent: int  # 0 before the run's rows exist, 5 while extracting, 100 when every job is done
    variants: int  # variant jobs so far
    running: str  # the running jobs' names ("onnxruntime/int8-static, ..."), or a stage's


def job_progress(settings: Settings, *, name: str, version: str | None) -> JobProgress:
    """The progress of a version's optimize jobs, from their rows."""
    try:
        with session_scope(settings.db_url) as session:
            row = crud.require_version(session=session, name=name, version=version)
            jobs = [
                j
                for j in crud.list_jobs(session=session, version=row)
                if j.optimization_type != "optimize"
            ]
    except Exception:  # the run may not have created its rows yet
        return JobProgress(0, 0, "")
    if not jobs:
        return JobProgress(5, 0, "extracting")
    running = [j.optimization_type for j in jobs if j.status == "running"]
    done = sum(j.progress for j in jobs) / len(jobs)
    return JobProgress(int(5 + 0.95 * done), len(jobs), ", ".join(running))
