"""Drift of what clients send against a model's reference data: features, checks, a verdict.

Pure functions over arrays; the ``monitor-drift`` flow (``flows/monitor.py``) feeds them the
inference log and the model's registered dataset, and records what they return.

1. :func:`check_inputs` validates the logged rows with Great Expectations, as
   ``kiln.intake.datasets`` validates a dataset (shape against the served spec, dtype, NaN/Inf for
   tensors, empty or missing texts for BYTES). Rows that fail are reported and left out of
   the drift test: they say something is wrong with a client, not with the data's
   distribution.
2. :func:`feature_frame` turns tensor rows into the columns Evidently compares:
   - a tabular input (one vector per row) keeps its columns as they are (``x[0]`` ...), and
     ``DataDriftPreset`` tests each one;
   - an image (two or more dimensions per row, e.g. digits' ``1x8x8``) becomes
     :data:`IMAGE_FEATURES`, a few per-image statistics of intensity, contrast and texture.
     Per-pixel columns would test each pixel on its own: 64 tests per run for digits (about
     ten seconds and a 7 MB report here), tens of thousands for a photo, and a pixel column
     carries no meaning a reader can act on. The shifts that matter for a served image model
     are global (exposure, inversion, sensor noise, blur, a new source), and these statistics
     move with them.
3. :func:`detect` runs Evidently: ``DataDriftPreset`` over the feature columns (each column's
   test picked by Evidently: K-S for numerical columns under 1000 rows; the dataset drifts
   when the share of drifted columns reaches ``drift_share``, Evidently's default 0.5), or,
   for a text model, ``EmbeddingsDrift`` over the model's output embeddings (Evidently's
   default method: a domain classifier's ROC AUC, against a bootstrap of random classifiers
   when the reference is under 1000 rows). Fewer rows than ``min_samples``: "not enough
   data", ``drift_detected`` None, nothing run.

Evidently's telemetry is off (``kiln.settings.PRIVACY_ENV``); nothing here downloads anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.settings import DRIFT_MIN_SAMPLES
from kiln.spec import TensorSpec

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MIN_SAMPLES = DRIFT_MIN_SAMPLES
DEFAULT_DRIFT_SHARE = 0.5  # Evidently's DataDriftPreset default
#: per-image statistics for inputs with two or more dimensions per row
IMAGE_FEATURES = ("mean", "std", "p25", "p75", "contrast", "variation", "flat")
EMBEDDING = "embedding"
METHOD_COLUMNS = "evidently-data-drift"
METHOD_IMAGE = "evidently-data-drift-image-features"
METHOD_EMBEDDINGS = "evidently-embeddings-drift"
NOT_ENOUGH = "not enough data"


@dataclass(frozen=True)
class DriftSettings:
    """How a drift run decides; validated when built."""

    min_samples: int = DEFAULT_MIN_SAMPLES
    drift_share: float = DEFAULT_DRIFT_SHARE

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise InvalidInput(
                f"min_samples is {self.min_samples}: give at least 1 (rows "
                f"needed before a verdict; default {DEFAULT_MIN_SAMPLES})"
            )
        if not 0 < self.drift_share <= 1:
            raise InvalidInput(
                f"drift_share is {self.drift_share}: give a share of columns in (0, 1], e.g. 0.5"
            )


@dataclass
class InputCheck:
    """Great Expectations on the logged rows: which passed, and what failed."""

    rows: int
    valid: np.ndarray  # bool per row: passed every per-row expectation
    failures: list[str] = field(default_factory=list)
    evaluated: int = 0

    @property
    def success(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "rows": self.rows,
            "valid_rows": int(self.valid.sum()),
            "evaluated": self.evaluated,
            "failures": self.failures,
        }


@dataclass
class DriftResult:
    """One drift verdict. ``drift_detected`` None: fewer valid rows than the minimum.

    ``drift_share`` is the share of drifted feature columns (DataDriftPreset), or, for
    embeddings, the drift score of Evidently's method (a domain classifier's ROC AUC).
    """

    drift_detected: bool | None
    drift_share: float | None
    samples: int
    reference_rows: int
    method: str
    threshold: float | None
    reason: str
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_detected": self.drift_detected,
            "drift_share": self.drift_share,
            "samples": self.samples,
            "reference_rows": self.reference_rows,
            "method": self.method,
            "threshold": self.threshold,
            "reason": self.reason,
            "columns": self.columns,
        }


# --------------------------------------------------------------------------- rows


def stack_rows(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every row of every logged batch, one array each (shapes may differ between clients)."""
    out: list[np.ndarray] = []
    for array in arrays:
        array = np.asarray(array)
        if array.ndim == 0:
            out.append(array.reshape(1))
            continue
        out.extend(array[i] for i in range(array.shape[0]))
    return out


# --------------------------------------------------------------------------- checks


def check_inputs(rows: Sequence[np.ndarray], served: TensorSpec) -> InputCheck:
    """Validate logged rows against the served input with Great Expectations.

    The frame has one row per logged row: its shape, dtype, count of non-finite values
    (tensors) or stripped text length (BYTES). Each failed expectation becomes one line naming
    its GE type, its column and how many rows fail; ``valid`` marks the rows that pass all of
    them.
    """
    from kiln.intake.datasets import (
        Want,
        accepted_dtypes,
        nonfinite_per_row,
        run_expectations,
        shape_regex,
        shape_text,
    )

    n = len(rows)
    if n == 0:
        return InputCheck(rows=0, valid=np.zeros(0, dtype=bool))
    shapes = [shape_text(np.shape(r)) for r in rows]
    dtypes = [_dtype_name(np.asarray(r)) for r in rows]
    accepted = accepted_dtypes(served.datatype)
    columns: dict[str, Any] = {"shape": shapes, "dtype": dtypes}
    want_shape = shape_text(tuple(served.shape[1:]))
    wants = [
        Want(
            "ExpectColumnValuesToMatchRegex",
            {"column": "shape", "regex": shape_regex(served.shape[1:])},
            f"rows of {served.name!r} must have shape {want_shape}",
        ),
        Want(
            "ExpectColumnValuesToBeInSet",
            {"column": "dtype", "value_set": accepted},
            f"{served.name!r} is {served.datatype}",
        ),
    ]
    # the per-row mask reads the same columns the expectations run on
    shape_re = re.compile(shape_regex(served.shape[1:]))
    valid = np.array(
        [bool(shape_re.match(s)) and d in accepted for s, d in zip(shapes, dtypes, strict=True)],
        dtype=bool,
    )
    if served.datatype == "BYTES":
        lengths = [
            len(str(np.asarray(r, dtype=object).reshape(-1)[0]).strip())
            if np.asarray(r, dtype=object).size == 1
            else 0
            for r in rows
        ]
        columns["text_length"] = lengths
        wants.append(
            Want(
                "ExpectColumnValuesToBeBetween",
                {"column": "text_length", "min_value": 1},
                "every text must be non-empty",
            )
        )
        valid &= np.asarray(lengths) >= 1
    else:
        nonfinite = [
            nonfinite_per_row(np.asarray(r).reshape(1, -1), served.datatype)[0] for r in rows
        ]
        columns["nonfinite"] = nonfinite
        wants.append(
            Want(
                "ExpectColumnValuesToBeInSet",
                {"column": "nonfinite", "value_set": [0]},
                "values must be finite (no NaN or +-Inf)",
            )
        )
        valid &= np.asarray(nonfinite) == 0
    failures = [
        f"{f.expectation}" + (f" on {f.column}" if f.column else "") + f": {f.detail}"
        for f in run_expectations(columns, wants).results
        if f is not None
    ]
    return InputCheck(rows=n, valid=valid, failures=failures, evaluated=len(wants))


def _dtype_name(row: np.ndarray) -> str:
    if row.dtype.kind == "U" or (
        row.dtype.kind == "O" and row.size == 1 and isinstance(row.reshape(-1)[0], str)
    ):
        return "str"
    return row.dtype.name


# --------------------------------------------------------------------------- features


def is_image(served: TensorSpec) -> bool:
    """Two or more dimensions per row (an image or a feature map): summarised, not per cell."""
    return served.datatype != "BYTES" and len(served.shape) >= 3


def feature_frame(x: np.ndarray, served: TensorSpec) -> pd.DataFrame:
    """The columns Evidently compares for rows ``x`` of input ``served`` (see the module doc)."""
    import pandas as pd

    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        x = x.reshape(-1, 1)
    if is_image(served):
        return image_features(x)
    flat = x.reshape(x.shape[0], -1)
    return pd.DataFrame(flat, columns=[f"{served.name}[{i}]" for i in range(flat.shape[1])])


def image_features(x: np.ndarray) -> pd.DataFrame:
    """:data:`IMAGE_FEATURES` of each image in ``x`` (``[N, ..., H, W]``; channels averaged
    for the spatial ones).

    - ``mean``, ``std``, ``p25``, ``p75``: the intensity distribution of the image;
    - ``contrast``: the mean of the central half minus the mean of the border around it;
    - ``variation``: the mean absolute difference between neighbouring pixels (texture);
    - ``flat``: the share of neighbouring pixels that differ by under 1% of the image's
      range (smooth areas: background, strokes); 1.0 for a constant image.
    """
    import pandas as pd

    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 3:
        raise InvalidInput(
            f"image features need rows of two or more dimensions, got rows of "
            f"shape {list(x.shape[1:])}"
        )
    n = x.shape[0]
    flat = x.reshape(n, -1)
    plane = x.reshape(n, -1, x.shape[-2], x.shape[-1]).mean(axis=1)  # channels averaged
    h, w = plane.shape[1:]
    dh, dw = max(h // 4, 0), max(w // 4, 0)
    if dh and dw and h - 2 * dh > 0 and w - 2 * dw > 0:
        centre = plane[:, dh : h - dh, dw : w - dw]
        ring = (plane.sum(axis=(1, 2)) - centre.sum(axis=(1, 2))) / (h * w - centre[0].size)
        contrast = centre.mean(axis=(1, 2)) - ring
    else:
        contrast = np.zeros(n)
    diffs = np.concatenate(
        [
            np.abs(np.diff(plane, axis=1)).reshape(n, -1),
            np.abs(np.diff(plane, axis=2)).reshape(n, -1),
        ],
        axis=1,
    )
    span = (flat.max(axis=1) - flat.min(axis=1))[:, None]
    variation = diffs.mean(axis=1) if diffs.shape[1] else np.zeros(n)
    flat_share = (diffs <= 0.01 * span).mean(axis=1) if diffs.shape[1] else np.ones(n)
    p25, p75 = np.percentile(flat, [25, 75], axis=1)
    return pd.DataFrame(
        {
            "mean": flat.mean(axis=1),
            "std": flat.std(axis=1),
            "p25": p25,
            "p75": p75,
            "contrast": contrast,
            "variation": variation,
            "flat": flat_share,
        },
        columns=list(IMAGE_FEATURES),
    )


def embedding_frame(x: np.ndarray) -> pd.DataFrame:
    """Embedding rows as columns ``e0 ... e{d-1}`` (one Evidently embedding named
    :data:`EMBEDDING`)."""
    import pandas as pd

    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    return pd.DataFrame(x, columns=[f"e{i}" for i in range(x.shape[1])])


# --------------------------------------------------------------------------- Evidently


def not_enough(
    samples: int, reference_rows: int, method: str, settings: DriftSettings
) -> DriftResult:
    return DriftResult(
        drift_detected=None,
        drift_share=None,
        samples=samples,
        reference_rows=reference_rows,
        method=method,
        threshold=None,
        reason=f"{NOT_ENOUGH}: {samples} valid rows, the minimum is {settings.min_samples}",
    )


def detect(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    *,
    method: str,
    settings: DriftSettings,
    html: Path | None = None,
) -> DriftResult:
    """Run Evidently on ``current`` against ``reference`` (columns from :func:`feature_frame`
    or :func:`embedding_frame`); write its HTML report to ``html`` when given.

    Below ``settings.min_samples`` current rows nothing runs: "not enough data".
    """
    samples, ref_rows = len(current), len(reference)
    if samples < settings.min_samples:
        return not_enough(samples, ref_rows, method, settings)
    if ref_rows == 0:
        raise InvalidInput(
            "the reference dataset has no rows: register a dataset with the "
            "model (kiln upload NAME SOURCE --dataset PATH)"
        )
    if list(current.columns) != list(reference.columns):
        raise InvalidInput(
            f"current rows have {current.shape[1]} feature columns, the "
            f"reference {reference.shape[1]}: they must come from the same input"
        )
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if method == METHOD_EMBEDDINGS:
        result, snapshot = _embeddings(current, reference, settings)
    else:
        result, snapshot = _columns(current, reference, method, settings)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
    return result


def _columns(
    current: pd.DataFrame, reference: pd.DataFrame, method: str, settings: DriftSettings
) -> tuple[DriftResult, Any]:
    import warnings

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    names = [str(c) for c in current.columns]
    definition = DataDefinition(numerical_columns=names)
    report = Report([DataDriftPreset(drift_share=settings.drift_share)])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy on constant columns: no drift, not a problem
        snapshot = report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    metrics = snapshot.dict()["metrics"]
    count = next(m for m in metrics if m["metric_name"].startswith("DriftedColumnsCount"))
    share = float(count["value"]["share"])
    columns: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        config = metric.get("config", {})
        if metric["metric_name"].startswith("ValueDrift") and config.get("column") in names:
            score = float(metric["value"])
            threshold = float(config.get("threshold") or 0.05)
            stattest = str(config.get("method") or "")
            # a p-value drifts below its threshold, a distance at or above it (Evidently's rule;
            # Evidently names every p-value test "<test> p_value")
            drifted = score < threshold if "p_value" in stattest else score >= threshold
            columns[config["column"]] = {
                "score": score,
                "threshold": threshold,
                "stattest": stattest,
                "drifted": drifted,
            }
    drifted = share >= settings.drift_share  # Evidently's dataset-drift rule
    reason = (
        f"{int(count['value']['count'])} of {len(names)} columns drifted "
        f"(share {share:.2f}; dataset drift at >= {settings.drift_share:g})"
    )
    return DriftResult(
        drift_detected=drifted,
        drift_share=share,
        samples=len(current),
        reference_rows=len(reference),
        method=method,
        threshold=settings.drift_share,
        reason=reason,
        columns=columns,
    ), snapshot


def _embeddings(
    current: pd.DataFrame, reference: pd.DataFrame, settings: DriftSettings
) -> tuple[DriftResult, Any]:
    import warnings

    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model
    from evidently.metrics import EmbeddingsDrift

    cols = [str(c) for c in current.columns]
    definition = DataDefinition(numerical_columns=[], embeddings={EMBEDDING: cols})
    # Evidently's default for EmbeddingsDrift, made explicit so the report can say what ran
    bootstrap = len(reference) < 1000
    method = model(bootstrap=bootstrap)
    report = Report([EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=method)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    # the verdict is the method's; run it on the same frames (it is seeded: same answer)
    score, drifted, _ = method(current.copy(), reference.copy())
    reported = float(snapshot.dict()["metrics"][0]["value"])
    threshold = None if bootstrap else method.threshold
    rule = (
        "above the 95th percentile of random classifiers' ROC AUC"
        if bootstrap
        else f"ROC AUC above {method.threshold}"
    )
    reason = (
        f"domain classifier ROC AUC {reported:.3f} over {len(cols)}-d embeddings; drift "
        f"when {rule}: {'drift' if drifted else 'no drift'}"
    )
    return DriftResult(
        drift_detected=bool(drifted),
        drift_share=reported,
        samples=len(current),
        reference_rows=len(reference),
        method=METHOD_EMBEDDINGS,
        threshold=threshold,
        reason=reason,
        columns={
            EMBEDDING: {
                "score": float(score),
                "drifted": bool(drifted),
                "stattest": "model (domain classifier)",
                "threshold": threshold,
            }
        },
    ), snapshot


@dataclass(frozen=True)
class SummaryRow:
    """One column of a drift result as the markdown report shows it (every cell text)."""

    column: str
    stattest: str
    score: str  # four significant digits
    drifted: str  # "yes" or "no"


def summary_rows(result: DriftResult) -> list[SummaryRow]:
    """One row per column, for the markdown report."""
    return [
        SummaryRow(
            column=name,
            stattest=str(c.get("stattest", "")),
            score=f"{c['score']:.4g}",
            drifted="yes" if c.get("drifted") else "no",
        )
        for name, c in result.columns.items()
    ]


def records_tensor(docs: Sequence[Mapping[str, Any]], name: str) -> list[np.ndarray]:
    """Each logged batch of tensor ``name`` (``kiln.registry.records`` form), decoded; records without
    it are skipped."""
    from kiln.registry.records import decode

    return [decode({name: doc[name]})[name] for doc in docs if name in doc]
