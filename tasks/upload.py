"""Prefect task: upload a model source (and dataset) into the registry."""

from __future__ import annotations

from typing import Any

from prefect import task

from kiln.intake.upload import upload
from kiln.settings import get_settings


@task(name="upload-model", retries=0)  # not retried: a refused source stays refused
def upload_model(
    name: str,
    source: str,
    version: str | None = None,
    dataset: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Register ``source`` as ``name``; returns ``kiln upload --json``'s document."""
    result = upload(
        settings=get_settings(),
        name=name,
        source=source,
        version=version,
        dataset=dataset,
        task=task_type,
    )
    return result.model_dump(mode="json")
