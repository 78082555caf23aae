"""Dataset loading (npz/parquet, never unpickled) and the Great Expectations checks."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kiln.errors import InvalidInput
from kiln.intake.datasets import DatasetCheck, LoadedDataset, check_dataset, load_dataset
from kiln.spec import ModelSpec, Preprocess, TensorSpec

IMAGE = ModelSpec(
    inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])],
    outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
)
TABULAR = ModelSpec(
    inputs=[TensorSpec(name="features", datatype="FP32", shape=[-1, 4])],
    outputs=[TensorSpec(name="score", datatype="FP32", shape=[-1, 1])],
)
TEXT = ModelSpec(
    inputs=[TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1])],
    outputs=[TensorSpec(name="embedding", datatype="FP32", shape=[-1, 384])],
    preprocess=Preprocess(text_input="text"),
)


def _images(rows: int = 6) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 1, 8, 8), dtype=np.float32)


def _labels(rows: int = 6) -> np.ndarray:
    return np.arange(rows, dtype=np.int64) % 10


def _failed(check: DatasetCheck) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in check.failures}


def _classify(inputs: np.ndarray, labels: np.ndarray | None) -> DatasetCheck:
    return check_dataset(
        LoadedDataset(inputs, labels), spec=IMAGE, task="classification", num_classes=10
    )


# --------------------------------------------------------------------------- checks


def test_good_classification_dataset_passes() -> None:
    check = _classify(_images(), _labels())
    assert check.success, check.summary()
    assert check.rows == 6 and check.failures == []
    assert check.statistics["evaluated"] == check.statistics["successful"] >= 8
    assert check.statistics["classes"] == {str(i): 1 for i in range(6)}
    assert "passed" in check.summary()
    DatasetCheck.model_validate_json(check.model_dump_json())  # storable as JSON


def test_dynamic_dims_match_any_size() -> None:
    spec = ModelSpec(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3, -1])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
    )
    ok = check_dataset(
        LoadedDataset(np.zeros((2, 3, 17), np.float32)), spec=spec, task="regression"
    )
    assert ok.success, ok.summary()
    bad = check_dataset(
        LoadedDataset(np.zeros((2, 4, 17), np.float32)), spec=spec, task="regression"
    )
    assert _failed(bad) == {("expect_column_values_to_match_regex", "shape")}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_fail(bad: float) -> None:
    inputs = _images()
    inputs[2, 0, 3, 3] = bad
    check = _classify(inputs, _labels())
    assert _failed(check) == {("expect_column_values_to_be_in_set", "nonfinite")}
    assert "row 2" in check.failures[0].detail


def test_float64_beyond_fp32_range_counts_as_nonfinite() -> None:
    inputs = _images().astype(np.float64)
    inputs[0, 0, 0, 0] = 1e300  # finite in float64, +Inf once cast to the served FP32
    assert _failed(_classify(inputs, _labels())) == {
        ("expect_column_values_to_be_in_set", "nonfinite")
    }


def test_wrong_shape_fails() -> None:
    check = _classify(_images().reshape(6, 64), _labels())
    assert _failed(check) == {("expect_column_values_to_match_regex", "shape")}
    assert "1x8x8" in check.failures[0].detail


def test_integer_inputs_for_fp32_fail() -> None:
    check = _classify(np.ones((6, 1, 8, 8), dtype=np.int64), _labels())
    assert _failed(check) == {("expect_column_values_to_be_in_set", "dtype")}
    assert "int64" in check.failures[0].detail


def test_label_out_of_range_fails() -> None:
    labels = _labels()
    labels[4] = 10
    check = _classify(_images(), labels)
    assert _failed(check) == {("expect_column_values_to_be_between", "label")}
    assert "[0, 9]" in check.failures[0].detail and "row 4" in check.failures[0].detail
    negative = _classify(_images(), -_labels())
    assert ("expect_column_values_to_be_between", "label") in _failed(negative)


def test_float_labels_for_classification_fail() -> None:
    check = _classify(_images(), _labels().astype(np.float32))
    assert _failed(check) == {("expect_column_values_to_be_in_set", "label_dtype")}


def test_nan_label_fails_not_null() -> None:
    labels = _labels().astype(np.float64)
    labels[1] = np.nan
    failed = _failed(_classify(_images(), labels))
    assert ("expect_column_values_to_not_be_null", "label") in failed


def test_label_length_mismatch_is_a_failure_not_a_crash() -> None:
    check = _classify(_images(6), _labels(5))
    assert _failed(check) == {("expect_table_row_count_to_equal", None)}
    assert "labels has 5 rows but inputs has 6" in check.summary()


def test_empty_dataset_fails_row_count() -> None:
    check = _classify(np.zeros((0, 1, 8, 8), np.float32), None)
    assert _failed(check) == {("expect_table_row_count_to_be_between", None)}


def test_regression_labels_must_be_finite() -> None:
    inputs = np.ones((4, 4), np.float32)
    ok = check_dataset(
        LoadedDataset(inputs, np.array([0.5, 1.0, 2.0, 3.5])), spec=TABULAR, task="regression"
    )
    assert ok.success, ok.summary()
    assert ok.statistics["labels"]["max"] == 3.5
    bad = check_dataset(
        LoadedDataset(inputs, np.array([0.5, np.inf, 2.0, 3.5])), spec=TABULAR, task="regression"
    )
    assert _failed(bad) == {("expect_column_values_to_be_in_set", "label_nonfinite")}


def test_text_dataset_passes_and_refuses_empty_strings() -> None:
    good = check_dataset(LoadedDataset(np.array(["a cat", "a dog"])), spec=TEXT, task="embedding")
    assert good.success, good.summary()
    bad = check_dataset(LoadedDataset(np.array(["a cat", "", "  "])), spec=TEXT, task="embedding")
    assert _failed(bad) == {("expect_column_values_to_be_between", "text_length")}
    assert "row 1" in bad.failures[0].detail and "row 2" in bad.failures[0].detail
    numbers = check_dataset(LoadedDataset(np.ones(2, np.float32)), spec=TEXT, task="embedding")
    assert ("expect_column_values_to_be_in_set", "dtype") in _failed(numbers)


def test_summary_names_each_failed_expectation() -> None:
    inputs = _images().astype(np.int32)
    labels = _labels()
    labels[0] = 99
    check = _classify(inputs, labels)
    lines = check.summary().splitlines()
    assert len(lines) == 1 + len(check.failures) == 3
    assert lines[1].startswith("- expect_column_values_to_be_in_set on dtype:")
    assert lines[2].startswith("- expect_column_values_to_be_between on label:")


def test_bad_task_refused() -> None:
    with pytest.raises(InvalidInput, match="task 'detection'"):
        check_dataset(LoadedDataset(_images()), spec=IMAGE, task="detection")


def test_check_writes_nothing_and_stays_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network call during check_dataset: {args!r}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert _classify(_images(), _labels()).success
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- loading


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "digits.npz"
    np.savez(path, inputs=_images(), labels=_labels())
    data = load_dataset(path)
    np.testing.assert_array_equal(data.inputs, _images())
    assert data.labels is not None and data.labels.dtype == np.int64
    assert load_dataset(_save(tmp_path / "x.npz", inputs=_images())).labels is None


def _save(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_missing_inputs_or_extra_key_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no 'inputs' array .*'x'.*np\.savez"):
        load_dataset(_save(tmp_path / "a.npz", x=_images()))
    with pytest.raises(InvalidInput, match=r"unexpected array 'weights'.*np\.savez"):
        load_dataset(_save(tmp_path / "b.npz", inputs=_images(), weights=_labels()))


def test_npz_object_array_refused_without_unpickling(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (_explode, ("unpickled!",))

    path = tmp_path / "evil.npz"
    np.savez(path, inputs=np.array([Boom(), "x"], dtype=object))  # savez pickles object arrays
    with pytest.raises(InvalidInput, match="object array"):
        load_dataset(path)


def _explode(message: str) -> None:
    raise AssertionError(message)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage" * 10])
def test_corrupt_files_refused(tmp_path: Path, content: bytes) -> None:
    for name in ("bad.npz", "bad.parquet"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidInput, match="bad"):
            load_dataset(tmp_path / name)


def test_single_npy_under_npz_suffix_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    with path.open("wb") as handle:
        np.save(handle, _images())
    with pytest.raises(InvalidInput, match=r"single \.npy array"):
        load_dataset(path)


@pytest.mark.parametrize("name", ["data.csv", "data.pkl", "data.npy", "data"])
def test_unknown_suffix_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"1,2,3\n")
    with pytest.raises(InvalidInput, match=r"\.npz.*\.parquet"):
        load_dataset(tmp_path / name)


def test_parquet_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "b": np.array([1.0, 2.0, 3.0], np.float32),
            "a": np.array([4.0, 5.0, 6.0], np.float32),
            "c": np.zeros(3, np.float32),
            "d": np.ones(3, np.float32),
            "label": [0, 1, 1],
        }
    )
    frame.to_parquet(tmp_path / "t.parquet")
    data = load_dataset(tmp_path / "t.parquet")
    assert data.inputs.shape == (3, 4) and data.inputs.dtype == np.float32
    np.testing.assert_array_equal(data.inputs[:, 0], [1.0, 2.0, 3.0])  # column order kept
    assert data.labels is not None and data.labels.tolist() == [0, 1, 1]
    check = check_dataset(data, spec=TABULAR, task="classification", num_classes=2)
    assert check.success, check.summary()


def test_parquet_text_column(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["hello", "world"]}).to_parquet(tmp_path / "t.parquet")
    data = load_dataset(tmp_path / "t.parquet")
    assert data.inputs.dtype.kind == "U" and data.inputs.shape == (2,) and data.labels is None
    assert check_dataset(data, spec=TEXT, task="embedding").success


def test_parquet_null_text_fails_check(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["hello", None]}).to_parquet(tmp_path / "t.parquet")
    check = check_dataset(load_dataset(tmp_path / "t.parquet"), spec=TEXT, task="embedding")
    assert ("expect_column_values_to_not_be_null", "text_length") in _failed(check)


def test_parquet_mixed_columns_refused(tmp_path: Path) -> None:
    pd.DataFrame({"x": [1.0], "name": ["a"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(InvalidInput, match="'name'"):
        load_dataset(tmp_path / "m.parquet")
    pd.DataFrame({"label": [1]}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(InvalidInput, match="no feature columns"):
        load_dataset(tmp_path / "l.parquet")


def test_parquet_nulls_surface_as_check_failures(tmp_path: Path) -> None:
    frame = pd.DataFrame({f"f{i}": [0.5, 1.5] for i in range(4)})
    frame.loc[1, "f2"] = None
    frame["label"] = pd.array([1, None], dtype="Int64")
    frame.to_parquet(tmp_path / "n.parquet")
    check = check_dataset(
        load_dataset(tmp_path / "n.parquet"), spec=TABULAR, task="classification", num_classes=2
    )
    assert _failed(check) == {
        ("expect_column_values_to_be_in_set", "nonfinite"),
        ("expect_column_values_to_not_be_null", "label"),
        ("expect_column_values_to_be_in_set", "label_dtype"),
    }
