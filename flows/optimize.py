"""Prefect flow ``optimize-model``: extract -> build variants -> validate -> select.

Each stage is a task in ``tasks/optimize.py``; the registry holds the state (an
``OptimizationJob`` per variant), and the run publishes a markdown table of the variants and a
PNG chart of latency against quality as Prefect artifacts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from kiln.errors import ExtractionError
from kiln.optimize import pipeline as stages
from kiln.settings import get_settings
from tasks import optimize as t


@flow(name="optimize-model", log_prints=True)
def optimize_model(name: str, version: str | None = None) -> dict[str, Any]:
    """Optimize ``name@version`` (default: newest) and select what its engine will serve."""
    settings = get_settings()
    staging = settings.home / "tmp"
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="op-optimize-", dir=staging) as tmp:
        work = Path(tmp)
        prepared = t.prepare(name, version, work, str(runtime.flow_run.id or "") or None)
        try:
            extraction = t.extract(prepared, work)
        except ExtractionError as exc:
            print(f"{name}@{prepared.version} rejected: {exc}")
            return {
                "job_id": prepared.parent_job_id,
                "status": "rejected",
                "reason": str(exc),
                "baseline": None,
                "variants": [],
                "selected": None,
            }
        extracted = extraction.model
        baseline = t.baseline(prepared, extracted)
        base, base_outputs = baseline.report, baseline.outputs
        reports = [
            t.variant(prepared, extracted, base, base_outputs, v.backend, v.precision, work)
            for v in stages.plan(prepared)
        ]
        if prepared.settings.prune and (pruned := t.prune(prepared, extracted, work)):
            planned = stages.PRUNED
            reports.append(
                t.variant(
                    prepared,
                    pruned.model,
                    base,
                    base_outputs,
                    planned.backend,
                    planned.precision,
                    work,
                    label=planned.label,
                    notes={"pruning": pruned.pruning},
                )
            )
        doc = t.record(prepared, extracted, extraction.report, base, reports)
    key = f"optimize-{name}".lower()
    create_markdown_artifact(
        markdown=doc["markdown"] + f"\n\nChart: `{doc['chart']}`",
        key=key,
        description=f"variants of {name}@{prepared.version}",
    )
    create_link_artifact(
        link=Path(doc["chart"]).as_uri(), link_text="latency vs quality (PNG)", key=f"{key}-chart"
    )
    print(doc["markdown"])
    return doc
