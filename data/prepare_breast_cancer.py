"""Prepare scikit-learn's breast-cancer data as seeded, stratified 70/15/15 splits.

Writes ``{train,val,test}.npz`` into ``--out`` with ``inputs`` float32 ``[N, 30]`` (raw, not
standardised: the model does that itself) and ``labels`` int64 (0 malignant, 1 benign). Run by
``dvc repro`` (stage ``prepare_breast_cancer``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

SEED = 0


def split(inputs: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified 70/15/15 split into train, val and test."""
    x_train, x_rest, y_train, y_rest = train_test_split(
        inputs, labels, test_size=0.30, stratify=labels, random_state=SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.50, stratify=y_rest, random_state=SEED
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("data/breast_cancer"), help="output folder"
    )
    args = parser.parse_args()

    data = load_breast_cancer()
    inputs = data.data.astype(np.float32)
    labels = data.target.astype(np.int64)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in split(inputs, labels).items():
        np.savez(args.out / f"{name}.npz", inputs=np.ascontiguousarray(x), labels=y)
        print(f"{name}: inputs {x.shape} {x.dtype}, labels {y.shape} {y.dtype}")


if __name__ == "__main__":
    main()
