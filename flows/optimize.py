"""Prefect flow ``optimize-model``: extract -> build variants -> validate -> select.

Each stage is a task in ``tasks/optimize.py``; the registry holds the state (an
``OptimizationJob`` per variant), and the run publishes a markdown table of the variants and a
PNG chart of latency against quality as Prefect artifacts.

With ``KILN_RAY_ADDRESS`` set, the variants are built on that Ray cluster, one Ray task each
through prefect-ray's ``RayTaskRunner``, in parallel; a GPU backend (TensorRT) is planned only
when Ray reports a GPU, and its tasks ask Ray for one. Each variant's artifact row records the
node that built it (``built_on``). Without it they are built one after the other in the flow's
own process.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from kiln.backends.base import ExtractedModel
from kiln.errors import ExternalToolError, ExtractionError
from kiln.optimize import pipeline as stages
from kiln.optimize.validate import VariantReport
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
        reports = _build(prepared, extracted, base, base_outputs, work, settings.ray_address)
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


def _build(
    prepared: stages.Prepared,
    extracted: ExtractedModel,
    base: VariantReport,
    base_outputs: np.ndarray,
    work: Path,
    ray_address: str | None,
) -> list[VariantReport]:
    """Every planned variant, built and judged: here one after the other, or on Ray."""
    if ray_address is None:
        return [
            t.variant(prepared, extracted, base, base_outputs, v.backend, v.precision, work)
            for v in stages.plan(prepared)
        ]
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # each node's tasks report to it
        raise ExternalToolError(
            "KILN_RAY_ADDRESS needs a Prefect server every Ray node reaches: set "
            "PREFECT_API_URL (the cluster form of `make up` runs one, docs/cluster.md)"
        )
    import ray
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    with RayTaskRunner(address=ray_address, init_kwargs={"log_to_driver": False}) as runner:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call]
        futures = []
        for v in stages.plan(prepared, cluster_gpus=gpus):
            parameters = {
                "prepared": prepared,
                "extracted": extracted,
                "base": base,
                "base_outputs": base_outputs,
                "backend_name": v.backend,
                "precision": v.precision,
                "work_dir": work,
            }
            with remote_options(num_gpus=1) if v.gpu else contextlib.nullcontext():
                futures.append(runner.submit(t.variant, parameters))
        return [future.result() for future in futures]
