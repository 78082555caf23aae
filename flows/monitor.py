"""Prefect flow ``monitor-drift`` (hourly, ``prefect.yaml``; ``kiln drift NAME`` runs it now).

For one model, or every deployed model when ``model`` is omitted:

1. gather the model's logged requests (status 200) of the last ``hours`` and its reference
   dataset (the registered dataset that serves ``version``, else the stable version);
2. Great Expectations on what clients sent: shape, dtype, NaN/Inf (tensors), empty texts;
   failing rows are reported and left out;
3. Evidently (``kiln.monitor.drift``): ``DataDriftPreset`` over the input's columns (tabular) or
   per-image statistics (images), ``EmbeddingsDrift`` over the logged embeddings against the
   reference version's embeddings of the reference texts (text models). Under
   ``min_samples`` valid rows: "not enough data", ``drift_detected`` None, nothing run;
4. record: the HTML report stored as a DVC-tracked artifact, a DriftReport row, the drift
   alert opened (drift) or resolved (no drift), and a markdown artifact with the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from kiln.errors import KilnError
from kiln.monitor.drift import DriftSettings
from kiln.settings import DRIFT_MIN_SAMPLES, DRIFT_WINDOW_HOURS, get_settings
from kiln.store.artifacts import ArtifactStore
from tasks import monitor as t


@flow(name="monitor-drift", log_prints=True)
def monitor_drift(
    model: str | None = None,
    hours: float = DRIFT_WINDOW_HOURS,
    min_samples: int = DRIFT_MIN_SAMPLES,
    version: str | None = None,
) -> dict[str, Any]:
    """Judge drift of ``model``'s recent traffic (every deployed model when None).

    One model: ``{"model", "drift_detected", "drift_share", "samples", "report", ...}``
    (``kiln drift --json``). Every model: ``{"models": [that, ...]}``; a model that cannot be
    judged (no dataset, say) is a row with ``error`` and the others carry on.
    """
    settings = DriftSettings(min_samples=min_samples)
    if model is not None:
        return _one(model, hours, settings, version)
    rows: list[dict[str, Any]] = []
    for name in t.deployed_models():
        try:
            rows.append(_one(name, hours, settings, None))
        except KilnError as exc:
            print(f"{name}: not judged ({exc})")
            rows.append(
                {
                    "model": name,
                    "drift_detected": None,
                    "drift_share": None,
                    "samples": 0,
                    "report": None,
                    "error": str(exc),
                }
            )
    _summary(rows)
    return {"models": rows}


def _one(model: str, hours: float, settings: DriftSettings, version: str | None) -> dict[str, Any]:
    gathered = t.gather(model, hours, version)
    checked = t.check(gathered)
    kiln_settings = get_settings()
    store = ArtifactStore.of(kiln_settings).ensure()
    with store.staging() as work:
        detection = t.detect(gathered, checked, settings, work)
        result = detection.result
        doc = t.record(
            gathered, checked, result, detection.html, str(runtime.flow_run.id or "") or None
        )
    text = t.markdown(doc, result)
    key = f"drift-{doc['model']}".lower()
    create_markdown_artifact(
        markdown=text, key=key, description=f"drift of {doc['model']} over {hours:g} h"
    )
    if doc["report"]:
        create_link_artifact(
            link=Path(doc["report"]).as_uri(),
            link_text="Evidently report (HTML)",
            key=f"{key}-report",
        )
    print(text)
    return doc


def _summary(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# monitor-drift",
        "",
        "| model | verdict | drift share | samples | report |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        verdict = (
            row.get("error")
            or {True: "drift", False: "no drift", None: "not enough data"}[row["drift_detected"]]
        )
        share = "-" if row["drift_share"] is None else f"{row['drift_share']:.3f}"
        lines.append(
            f"| {row['model']} | {verdict} | {share} | {row['samples']} | {row['report'] or '-'} |"
        )
    if not rows:
        lines.append("| - | no model is deployed | - | - | - |")
    create_markdown_artifact(
        markdown="\n".join(lines), key="monitor-drift", description=f"{len(rows)} model(s)"
    )
