"""Drift features, input checks and verdicts on scikit-learn's real digits, through the real
Great Expectations and Evidently.

The splits are data/prepare_digits.py's (pixels / 16, stratified 70/15/15, seed 0): the
reference is the validation split (the dataset digits is registered with), traffic is drawn
from the test split, so reference and "unshifted" traffic never share rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.errors import InvalidInput
from kiln.monitor import drift
from kiln.spec import TensorSpec

DIGITS = TensorSpec(name="x", datatype="FP32", shape=[-1, 1, 8, 8])
DRAWS = 20
DRAW_ROWS = 150


@pytest.fixture(scope="module")
def splits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target
    _, x_rest, _, y_rest = train_test_split(x, y, test_size=0.30, stratify=y, random_state=0)
    x_val, x_test, _, _ = train_test_split(
        x_rest, y_rest, test_size=0.50, stratify=y_rest, random_state=0
    )
    return {"val": x_val, "test": x_test}


@pytest.fixture(scope="module")
def reference(splits: dict[str, np.ndarray]) -> Any:
    return drift.feature_frame(splits["val"], DIGITS)


def _verdict(x: np.ndarray, reference: Any, html: Path | None = None) -> drift.DriftResult:
    return drift.detect(
        drift.feature_frame(x, DIGITS),
        reference,
        method=drift.METHOD_IMAGE,
        settings=drift.DriftSettings(),
        html=html,
    )


def test_image_features_on_tiny_images() -> None:
    blank = np.zeros((1, 1, 8, 8), dtype=np.float32)
    centre = blank.copy()
    centre[0, 0, 2:6, 2:6] = 1.0  # a bright square in the central half, dark border
    frame = drift.feature_frame(np.concatenate([blank, centre, 1 - centre]), DIGITS)
    assert list(frame.columns) == list(drift.IMAGE_FEATURES)
    flat_blank, square, inverted = frame.to_dict("records")
    assert flat_blank == {
        "mean": 0.0,
        "std": 0.0,
        "p25": 0.0,
        "p75": 0.0,
        "contrast": 0.0,
        "variation": 0.0,
        "flat": 1.0,
    }
    assert square["mean"] == pytest.approx(16 / 64)
    assert square["contrast"] == pytest.approx(1.0)  # centre all 1, border all 0
    # 8 rows x 7 horizontal + 8 columns x 7 vertical neighbour pairs; the square's edge
    # crosses 4 of them per side
    assert square["variation"] == pytest.approx(16 / 112)
    assert square["flat"] == pytest.approx(1 - 16 / 112)
    # inversion flips intensity and contrast, keeps texture
    assert inverted["mean"] == pytest.approx(1 - square["mean"])
    assert inverted["contrast"] == pytest.approx(-1.0)
    assert inverted["variation"] == pytest.approx(square["variation"])


def test_tabular_rows_keep_their_columns() -> None:
    spec = TensorSpec(name="features", datatype="FP32", shape=[-1, 3])
    frame = drift.feature_frame(np.arange(6, dtype=np.float32).reshape(2, 3), spec)
    assert list(frame.columns) == ["features[0]", "features[1]", "features[2]"]
    assert frame.to_numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not drift.is_image(spec) and drift.is_image(DIGITS)


def test_great_expectations_flags_what_clients_sent(splits: dict[str, np.ndarray]) -> None:
    good = splits["test"][:5]
    nan = good[:1].copy()
    nan[0, 0, 3, 3] = np.nan
    wrong = np.zeros((1, 1, 4, 4), dtype=np.float32)
    rows = drift.stack_rows([good, nan, wrong])
    check = drift.check_inputs(rows, DIGITS)
    assert check.rows == 7 and not check.success
    assert check.valid.tolist() == [True] * 5 + [False, False]
    text = "\n".join(check.failures)
    assert "nonfinite" in text and "shape" in text
    assert drift.check_inputs(drift.stack_rows([good]), DIGITS).success


def test_below_the_minimum_is_not_enough_data(
    splits: dict[str, np.ndarray], reference: Any, tmp_path: Path
) -> None:
    html = tmp_path / "report.html"
    result = _verdict(splits["test"][:99], reference, html)
    assert result.drift_detected is None and result.drift_share is None
    assert result.samples == 99 and drift.NOT_ENOUGH in result.reason
    assert not html.exists()  # nothing ran
    with pytest.raises(InvalidInput, match="min_samples"):
        drift.DriftSettings(min_samples=0)


def test_shifted_digits_are_flagged(
    splits: dict[str, np.ndarray], reference: Any, tmp_path: Path, record_property: Any
) -> None:
    rng = np.random.default_rng(7)
    base = splits["test"][rng.choice(len(splits["test"]), DRAW_ROWS, replace=False)]
    noised = np.clip(base + rng.normal(0.0, 0.1, base.shape), 0.0, 1.0).astype(np.float32)
    html = tmp_path / "inverted.html"
    shares = {}
    for name, x, out in (("inverted", 1.0 - base, html), ("noised", noised, None)):
        result = _verdict(x, reference, out)
        shares[name] = result.drift_share
        assert result.drift_detected is True, (name, result.reason)
        assert result.samples == DRAW_ROWS and result.reference_rows == len(splits["val"])
    record_property("drift_share", json.dumps(shares))
    print("shifted drift shares:", shares)
    assert html.stat().st_size > 0 and "<html" in html.read_text()[:2000].lower()


def test_unshifted_draws_are_flagged_at_most_once(
    splits: dict[str, np.ndarray], reference: Any, record_property: Any
) -> None:
    rng = np.random.default_rng(2026)
    test = splits["test"]
    verdicts = [
        _verdict(test[rng.choice(len(test), DRAW_ROWS, replace=False)], reference)
        for _ in range(DRAWS)
    ]
    flagged = sum(bool(v.drift_detected) for v in verdicts)
    shares = [round(float(v.drift_share or 0.0), 3) for v in verdicts]
    record_property("false_positives", flagged)
    record_property("drift_shares", json.dumps(shares))
    print(f"unshifted: {flagged} of {DRAWS} flagged; shares {shares}")
    assert all(v.drift_detected is not None for v in verdicts)
    assert flagged <= 1


def test_embeddings_drift_uses_evidently_domain_classifier(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    reference = drift.embedding_frame(rng.normal(size=(300, 16)))
    same = drift.embedding_frame(rng.normal(size=(120, 16)))
    moved = drift.embedding_frame(rng.normal(loc=0.5, size=(120, 16)))
    settings = drift.DriftSettings()
    html = tmp_path / "embeddings.html"
    shifted = drift.detect(
        moved, reference, method=drift.METHOD_EMBEDDINGS, settings=settings, html=html
    )
    assert shifted.drift_detected is True and shifted.method == drift.METHOD_EMBEDDINGS
    assert shifted.drift_share is not None and shifted.drift_share > 0.5  # ROC AUC over chance
    assert html.stat().st_size > 0
    calm = drift.detect(same, reference, method=drift.METHOD_EMBEDDINGS, settings=settings)
    assert calm.drift_detected is False and calm.drift_share is not None
    assert calm.drift_share < shifted.drift_share
