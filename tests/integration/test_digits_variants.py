"""data/build_digits_variants.py: the demo's flawed digits versions, built into a temp folder.

The permuted one (0.2.0) must be a valid model whose accuracy collapses; the slow one (0.3.0)
must give the original's answers while carrying its float64 matmul chain (the part no
optimizer may remove). Both are exported with the original's dynamic batch dimension, and the
same inputs give the same bytes (the demo re-uploads them on a re-run).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import repo_digits, run_data_script


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt2 and test.npz: the repo's `dvc repro` outputs when present, else built here."""
    return repo_digits(tmp_path_factory.mktemp("digits"), "model.pt2", "test.npz")


@pytest.fixture(scope="module")
def variants(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("variants")
    run_data_script("build_digits_variants.py", "--data", digits, "--out", out)
    return out


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def _test_split(digits: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits / "test.npz", allow_pickle=False) as npz:
        return npz["inputs"].astype(np.float32), npz["labels"]


def test_permuted_accuracy_collapses(digits: Path, variants: Path) -> None:
    x, y = _test_split(digits)
    original = float(np.mean(_logits(digits / "model.pt2", x).argmax(1) == y))
    logits = _logits(variants / "permuted.pt2", x)
    permuted = float(np.mean(logits.argmax(1) == y))
    assert original >= 0.9
    assert permuted <= 0.1, f"permuted accuracy {permuted:.3f}"
    assert np.isfinite(logits).all() and logits.shape == (len(x), 10)


def test_slow_agrees_and_keeps_its_float64_chain(digits: Path, variants: Path) -> None:
    x, _ = _test_split(digits)
    base = _logits(digits / "model.pt2", x)
    slow = _logits(variants / "slow.pt2", x)
    assert np.mean(slow.argmax(1) == base.argmax(1)) == 1.0
    np.testing.assert_allclose(slow, base, rtol=0, atol=1e-5)
    ep = torch.export.load(str(variants / "slow.pt2"))
    chain = [
        n
        for n in ep.graph.nodes
        if n.op == "call_function" and str(n.target).split(".")[1] in ("mm", "matmul")
    ]
    doubles = [n for n in chain if n.meta["val"].dtype == torch.float64]
    assert len(doubles) >= 2, [str(n.target) for n in chain]


@pytest.mark.parametrize("name", ["permuted.pt2", "slow.pt2"])
def test_dynamic_batch_and_same_bytes(
    digits: Path, variants: Path, name: str, tmp_path: Path
) -> None:
    module = torch.export.load(str(variants / name)).module()
    for batch in (1, 5):
        assert tuple(module(torch.zeros(batch, 1, 8, 8)).shape) == (batch, 10)
    if name == "slow.pt2":  # one rebuild covers both files
        run_data_script("build_digits_variants.py", "--data", digits, "--out", tmp_path)
        for other in ("permuted.pt2", "slow.pt2"):
            assert (
                hashlib.sha256((tmp_path / other).read_bytes()).hexdigest()
                == hashlib.sha256((variants / other).read_bytes()).hexdigest()
            ), other
