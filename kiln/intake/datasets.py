"""Evaluation datasets: loading them safely, and checking them against a model with GE.

A dataset is an ``.npz`` archive (``inputs``, optional ``labels``; never unpickled) or a
``.parquet`` table (feature columns plus an optional ``label`` column). ``check_dataset`` turns
it into one DataFrame row per sample, with derived columns (the row's shape, dtype, count of
non-finite values, text length, label), and validates that frame with a Great Expectations suite
built from the model's served input spec. The result is a small record that the registry stores
and the CLI prints; each failure names the GE expectation type and the column it ran on.
"""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from kiln.errors import InvalidInput, UnsafeSource
from kiln.spec import ModelSpec, TensorSpec, numpy_of_datatype

if TYPE_CHECKING:
    import pandas as pd

FORMATS = (".npz", ".parquet")
NPZ_KEYS = ("inputs", "labels")
LABEL_COLUMN = "label"
TASKS = ("classification", "regression", "embedding")
FIX_NPZ = "save it with np.savez(path, inputs=X, labels=y) (labels optional)"
FIX_FORMAT = (
    "use .npz (np.savez with 'inputs' and optional 'labels') or .parquet (feature columns "
    "plus an optional 'label' column)"
)

_INT_NAMES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_FLOAT_NAMES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class LoadedDataset:
    """Arrays read from a dataset file: ``inputs`` (one row per sample) and optional ``labels``."""

    inputs: np.ndarray
    labels: np.ndarray | None = None


class ExpectationFailure(BaseModel):
    """One expectation that failed: its GE type name, the column it ran on, and what to fix."""

    expectation: str
    column: str | None = None
    detail: str


class DatasetCheck(BaseModel):
    """The outcome of ``check_dataset``: JSON-ready, stored on the registry's Dataset row."""

    success: bool
    rows: int
    failures: list[ExpectationFailure]
    statistics: dict[str, Any]

    def summary(self) -> str:
        """One headline, then one line per failed expectation."""
        if self.success:
            evaluated = self.statistics.get("evaluated", 0)
            return f"dataset passed {evaluated} expectations ({self.rows} rows)"
        lines = [f"dataset failed {len(self.failures)} expectation(s) ({self.rows} rows):"]
        lines += [
            f"- {f.expectation}" + (f" on {f.column}" if f.column else "") + f": {f.detail}"
            for f in self.failures
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading


def load_dataset(path: Path) -> LoadedDataset:
    """Read an ``.npz`` or ``.parquet`` dataset; refuse anything else with a message that says how.

    Raises:
        InvalidInput: unknown suffix, missing or unexpected keys/columns, unreadable file.
        UnsafeSource: an ``.npz`` member that would need unpickling (an object array).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInput(f"dataset {path.name!r} has an unsupported format: {FIX_FORMAT}")
    if not path.is_file():
        raise InvalidInput(f"dataset {path.name!r} does not exist or is not a file")
    if suffix == ".npz":
        return _load_npz(path)
    return _load_parquet(path)


def _load_npz(path: Path) -> LoadedDataset:
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:
        # numpy falls back to "this must be a pickle" for anything that is neither zip nor .npy.
        raise InvalidInput(
            f"dataset {path.name!r} is not an .npz archive (Kiln never reads pickles): {FIX_NPZ}"
        ) from exc
    except unreadable as exc:
        raise InvalidInput(f"dataset {path.name!r} is corrupt or unreadable: {FIX_NPZ}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidInput(
            f"dataset {path.name!r} is a single .npy array, not an archive: {FIX_NPZ}"
        )
    with archive:
        keys = list(archive.files)
        if "inputs" not in keys:
            found = ", ".join(repr(k) for k in keys) or "none"
            raise InvalidInput(
                f"dataset {path.name!r} has no 'inputs' array (found: {found}); {FIX_NPZ}"
            )
        for key in keys:
            if key not in NPZ_KEYS:
                raise InvalidInput(
                    f"dataset {path.name!r} has an unexpected array {key!r}: an .npz dataset "
                    f"holds only 'inputs' and optionally 'labels'; {FIX_NPZ}"
                )
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise UnsafeSource(
                        f"{key!r} in dataset {path.name!r} is an object array, which would need "
                        "unpickling and is refused: save numbers as a numeric array and text as "
                        "a unicode array, e.g. np.array(texts, dtype=str)"
                    ) from exc
                raise InvalidInput(
                    f"{key!r} in dataset {path.name!r} is corrupt: {FIX_NPZ}"
                ) from exc
            except unreadable as exc:
                raise InvalidInput(
                    f"{key!r} in dataset {path.name!r} is corrupt: {FIX_NPZ}"
                ) from exc
    return LoadedDataset(inputs=arrays["inputs"], labels=arrays.get("labels"))


def _load_parquet(path: Path) -> LoadedDataset:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/ArrowIOError family
        raise InvalidInput(
            f"dataset {path.name!r} is not a readable Parquet file: write it with "
            "pandas.DataFrame.to_parquet(path)"
        ) from exc
    labels = None
    if LABEL_COLUMN in frame.columns:
        labels = _column_array(frame[LABEL_COLUMN], path)
        frame = frame.drop(columns=[LABEL_COLUMN])
    if frame.shape[1] == 0:
        raise InvalidInput(
            f"dataset {path.name!r} has no feature columns: add one numeric column per feature, "
            "or a single string column for text, beside the optional 'label' column"
        )
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    if all(numeric):
        if any(isinstance(frame[c].dtype, pd.api.extensions.ExtensionDtype) for c in frame.columns):
            # nullable columns: nulls become NaN, which the check then reports as non-finite
            inputs = frame.to_numpy(dtype="float64", na_value=np.nan)
        else:
            inputs = frame.to_numpy()
        return LoadedDataset(inputs=inputs, labels=labels)
    if frame.shape[1] == 1:
        return LoadedDataset(inputs=_column_array(frame.iloc[:, 0], path), labels=labels)
    names = ", ".join(repr(str(c)) for c, ok in zip(frame.columns, numeric, strict=True) if not ok)
    raise InvalidInput(
        f"dataset {path.name!r} mixes non-numeric columns ({names}) with others: use numeric "
        "feature columns, or exactly one string column for text"
    )


def _column_array(column: pd.Series[Any], path: Path) -> np.ndarray:
    """One Parquet column as a numpy array: numbers stay numeric (nulls become NaN), strings
    become a unicode array (an object array only when nulls must survive for the check)."""
    import pandas as pd

    nulls = bool(column.isna().any())
    if pd.api.types.is_numeric_dtype(column.dtype):  # bool included
        if nulls:
            return np.asarray(column.to_numpy(dtype="float64", na_value=np.nan))
        dtype = getattr(column.dtype, "numpy_dtype", column.dtype)  # nullable Int64 -> int64
        return np.asarray(column.to_numpy(dtype=dtype))
    values = np.asarray(column.to_numpy(dtype=object, na_value=None))
    if all(isinstance(v, str) or v is None for v in values):
        return values if nulls else np.array(values.tolist(), dtype=str).reshape(len(values))
    kinds = sorted({type(v).__name__ for v in values if not isinstance(v, str) and v is not None})
    raise InvalidInput(
        f"column {str(column.name)!r} of dataset {path.name!r} holds {', '.join(kinds)} values: "
        "store one numeric column per feature, a string column for text, or use .npz for "
        "multi-dimensional inputs"
    )


# --------------------------------------------------------------------------- checking
# Want, run_expectations and the column helpers below are public: kiln.monitor.drift checks logged
# inference rows against the served input with the same expectations.


@dataclass
class Want:
    """An expectation to build once GE is imported: class name, kwargs, and a fix-it hint."""

    kind: str
    kwargs: dict[str, Any]
    hint: str


def check_dataset(
    data: LoadedDataset, *, spec: ModelSpec, task: str, num_classes: int | None = None
) -> DatasetCheck:
    """Validate a dataset against the model's served input with Great Expectations.

    Args:
        data: what ``load_dataset`` returned.
        spec: the model version's spec; the first served input is what the rows must match.
        task: ``classification``, ``regression`` or ``embedding``; decides the label checks.
        num_classes: for classification, labels must lie in ``[0, num_classes - 1]``.

    Returns:
        A ``DatasetCheck``; ``success`` is False when any expectation failed (nothing raises
        for bad data, only for a bad ``task``/``num_classes`` argument).
    """
    if task not in TASKS:
        raise InvalidInput(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")
    if num_classes is not None and num_classes < 1:
        raise InvalidInput(
            f"num_classes is {num_classes}: give the model's number of classes (>= 1)"
        )
    started = time.perf_counter()
    served = spec.served_inputs()[0]
    columns, wants, stats = _frame_and_expectations(data, served, task, num_classes)
    run = run_expectations(columns, wants)
    failures = [failure for failure in run.results if failure is not None]
    rows = len(columns["shape"])
    stats.update(
        evaluated=len(wants),
        successful=len(wants) - len(failures),
        great_expectations=run.gx_version,
        seconds=round(time.perf_counter() - started, 4),
    )
    return DatasetCheck(success=not failures, rows=rows, failures=failures, statistics=stats)


def _frame_and_expectations(
    data: LoadedDataset, served: TensorSpec, task: str, num_classes: int | None
) -> tuple[dict[str, Any], list[Want], dict[str, Any]]:
    inputs = np.asarray(data.inputs)
    if inputs.ndim == 0:
        inputs = inputs.reshape(1)  # a lone scalar: one row, whose shape check then fails
    rows = inputs.shape[0]
    accepted = accepted_dtypes(served.datatype)
    columns: dict[str, Any] = {
        "shape": [shape_text(inputs.shape[1:])] * rows,
        "dtype": _row_dtypes(inputs),
    }
    want_shape = shape_text(tuple(served.shape[1:]))
    wants = [
        Want(
            "ExpectTableRowCountToBeBetween",
            {"min_value": 1},
            "the dataset has no rows: give at least one sample",
        ),
        Want(
            "ExpectColumnValuesToMatchRegex",
            {"column": "shape", "regex": shape_regex(served.shape[1:])},
            f"each row must have shape {want_shape} to fit input {served.name!r} "
            f"(spec {served.shape}, -1 is any size)",
        ),
        Want(
            "ExpectColumnValuesToBeInSet",
            {"column": "dtype", "value_set": accepted},
            f"input {served.name!r} is {served.datatype}: give an array of {_one_of(accepted)}",
        ),
    ]
    stats: dict[str, Any] = {
        "input": served.name,
        "datatype": served.datatype,
        "spec_shape": list(served.shape),
        "accepted_dtypes": accepted,
        "input_shape": list(data.inputs.shape),
        "task": task,
    }
    if served.datatype == "BYTES":
        if inputs.ndim == 1:
            lengths = [len(v.strip()) if isinstance(v, str) else None for v in inputs.tolist()]
            columns["text_length"] = lengths
            wants += [
                Want(
                    "ExpectColumnValuesToNotBeNull",
                    {"column": "text_length"},
                    "every row must be a string (no nulls)",
                ),
                Want(
                    "ExpectColumnValuesToBeBetween",
                    {"column": "text_length", "min_value": 1},
                    "every text must be non-empty (not blank after stripping whitespace)",
                ),
            ]
            known = [n for n in lengths if n is not None]
            if known:
                stats["text_length"] = {"min": min(known), "max": max(known)}
    else:
        columns["nonfinite"] = nonfinite_per_row(inputs, served.datatype)
        wants.append(
            Want(
                "ExpectColumnValuesToBeInSet",
                {"column": "nonfinite", "value_set": [0]},
                f"every value must be finite in {served.datatype} (no NaN, +-Inf, or floats "
                "beyond its range)",
            )
        )
    if data.labels is not None:
        wants += _label_columns(np.asarray(data.labels), rows, task, num_classes, columns, stats)
    return columns, wants, stats


def _label_columns(
    labels: np.ndarray,
    rows: int,
    task: str,
    num_classes: int | None,
    columns: dict[str, Any],
    stats: dict[str, Any],
) -> list[Want]:
    if labels.ndim == 0:
        labels = labels.reshape(1)
    count = labels.shape[0]
    wants = [
        Want(
            "ExpectTableRowCountToEqual",
            {"value": count},
            f"labels has {count} rows but inputs has {rows}: give one label per input row",
        )
    ]
    stats["label_rows"] = count
    if count != rows:
        return wants  # the per-row label checks need aligned rows; the count failure says why
    numeric = labels.dtype.kind in "iuf"
    columns["label_dtype"] = _row_dtypes(labels)
    if labels.ndim == 1 and numeric:
        columns[LABEL_COLUMN] = labels.tolist()
        wants.append(
            Want(
                "ExpectColumnValuesToNotBeNull",
                {"column": LABEL_COLUMN},
                "every row needs a label (no nulls or NaN)",
            )
        )
    if task == "classification":
        wants.append(
            Want(
                "ExpectColumnValuesToBeInSet",
                {"column": "label_dtype", "value_set": list(_INT_NAMES)},
                "classification labels are integer class indices: give an integer "
                "array (e.g. labels.astype('int64') if they are whole numbers)",
            )
        )
        columns["label_shape"] = [shape_text(labels.shape[1:])] * count
        wants.append(
            Want(
                "ExpectColumnValuesToMatchRegex",
                {"column": "label_shape", "regex": r"^scalar$"},
                "classification labels are one class index per row (a 1-D array)",
            )
        )
        if labels.ndim == 1 and numeric:
            top = None if num_classes is None else num_classes - 1
            where = f"[0, {top}]" if top is not None else ">= 0"
            wants.append(
                Want(
                    "ExpectColumnValuesToBeBetween",
                    {"column": LABEL_COLUMN, "min_value": 0, "max_value": top},
                    f"class indices must lie in {where}",
                )
            )
            if labels.dtype.kind in "iu" and count:
                values, counts = np.unique(labels, return_counts=True)
                stats["classes"] = {
                    str(v): int(n) for v, n in zip(values.tolist(), counts.tolist(), strict=True)
                }
    else:
        wants.append(
            Want(
                "ExpectColumnValuesToBeInSet",
                {"column": "label_dtype", "value_set": [*_INT_NAMES, *_FLOAT_NAMES]},
                f"{task} labels are numbers: give a float array",
            )
        )
        if numeric:
            columns["label_nonfinite"] = nonfinite_per_row(labels, "FP64")
            wants.append(
                Want(
                    "ExpectColumnValuesToBeInSet",
                    {"column": "label_nonfinite", "value_set": [0]},
                    f"{task} labels must be finite (no NaN or +-Inf)",
                )
            )
            finite = labels[np.isfinite(labels)] if labels.dtype.kind == "f" else labels
            if finite.size:
                stats["labels"] = {
                    "min": float(finite.min()),
                    "max": float(finite.max()),
                    "mean": float(finite.mean()),
                }
    return wants


def accepted_dtypes(datatype: str) -> list[str]:
    """numpy dtype names a dataset may use for an input of this OIP datatype.

    Floats of any width feed float inputs (values are cast to the served width, and the
    non-finite count is taken after that cast, so overflow is caught); integers feed integer
    inputs only where the cast is safe; an integer array never feeds a float input (it is
    almost always the wrong array, e.g. labels or token ids).
    """
    if datatype == "BYTES":
        return ["str"]
    if datatype in ("FP16", "BF16", "FP32", "FP64"):
        return list(_FLOAT_NAMES)
    if datatype == "BOOL":
        return ["bool"]
    target = numpy_of_datatype(datatype)
    return [name for name in _INT_NAMES if np.can_cast(name, target, casting="safe")]


def _row_dtypes(array: np.ndarray) -> list[str]:
    """Each row's dtype name: the array's, or per element for an object array of scalars."""
    kind = array.dtype.kind
    if kind == "U":
        return ["str"] * array.shape[0]
    if kind == "S":
        return ["bytes"] * array.shape[0]
    if kind == "O" and array.ndim == 1:
        return [type(v).__name__ for v in array.tolist()]
    return [array.dtype.name] * array.shape[0]


def nonfinite_per_row(array: np.ndarray, datatype: str) -> list[int]:
    rows = array.shape[0]
    if array.dtype.kind != "f" or rows == 0:
        return [0] * rows
    width = (
        np.float32
        if datatype == "BF16"
        else (numpy_of_datatype(datatype) if datatype.startswith("FP") else array.dtype)
    )
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(width, copy=False).reshape(rows, -1)
    return [int(n) for n in (~np.isfinite(cast)).sum(axis=1)]


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def shape_text(dims: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(d) for d in dims) if len(dims) else "scalar"


def shape_regex(dims: list[int]) -> str:
    if not dims:
        return r"^scalar$"
    return "^" + "x".join(r"[1-9][0-9]*" if d == -1 else str(d) for d in dims) + "$"


@dataclass(frozen=True)
class ExpectationRun:
    """What ``run_expectations`` found: one entry per want, in order (None where it passed),
    and the Great Expectations version that ran them."""

    results: list[ExpectationFailure | None]
    gx_version: str


def run_expectations(columns: dict[str, Any], wants: list[Want]) -> ExpectationRun:
    """Run ``wants`` on the frame in a fresh, in-memory GE context (nothing written, no network)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = pd.DataFrame(columns)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas(name="kiln")
        .add_dataframe_asset(name="dataset")
        .add_batch_definition_whole_dataframe("all-rows")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name="kiln-dataset")
    for index, want in enumerate(wants):
        suite.add_expectation(getattr(gxe, want.kind)(**want.kwargs, meta={"kiln_index": index}))
    result = batch.validate(suite, result_format="SUMMARY")
    outcome: list[ExpectationFailure | None] = [None] * len(wants)
    for item in result.results:
        config = item.expectation_config
        assert config is not None  # GE sets it on every result of a suite run
        index = int(config.meta["kiln_index"])
        if item.success:
            continue
        outcome[index] = ExpectationFailure(
            expectation=config.type,
            column=config.kwargs.get("column"),
            detail=_detail(wants[index].hint, item.result or {}, item.exception_info or {}),
        )
    return ExpectationRun(results=outcome, gx_version=gx.__version__)


def _detail(hint: str, result: dict[str, Any], exception_info: dict[str, Any]) -> str:
    message = _exception_message(exception_info)
    if message:
        return f"{hint} (Great Expectations could not evaluate it: {message})"
    if "unexpected_count" in result:
        values = [_plain(v) for v in (result.get("partial_unexpected_list") or [])[:3]]
        rows = [_plain(r) for r in (result.get("partial_unexpected_index_list") or [])[:3]]
        if len(rows) == len(values):
            examples = ", ".join(f"row {r}: {v!r}" for r, v in zip(rows, values, strict=True))
        else:
            examples = ", ".join(repr(v) for v in values)
        return (
            f"{hint}; {result['unexpected_count']} of {result.get('element_count')} rows "
            f"fail (e.g. {examples})"
        )
    if "observed_value" in result:
        return f"{hint}; observed {_plain(result['observed_value'])}"
    return hint


def _exception_message(info: dict[str, Any]) -> str | None:
    """GE reports an exception flat, or keyed by metric id when a metric failed to resolve."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
