"""Build the two deliberately flawed digits versions that ``kiln demo`` deploys after 0.1.0.

Reads ``model.pt2`` (the trained CNN, stage ``train_digits``) and ``test.npz`` from ``--data``
and writes into ``--out``:

- ``permuted.pt2`` (the demo's 0.2.0): the linear head's output rows (weights and bias) rotated
  by one class, so every logit belongs to the wrong digit. A valid model with normal-looking
  logits whose accuracy collapses: the champion/challenger gate must reject it before any
  traffic reaches it.
- ``slow.pt2`` (the demo's 0.3.0): the same CNN, the same answers, plus a fixed chain of
  ``SLOW_SIZE`` x ``SLOW_SIZE`` matmuls on a matrix scaled by a scalar derived from the input
  (so no optimizer can fold it away), bounded with tanh and added to the logits through
  ``relu(mean - 2)``, which is exactly 0 because a tanh mean never exceeds 1 (a plain ``* 0.0``
  could be folded by a compiler). Every backend Kiln may select (ONNX Runtime fp32/int8,
  AOTInductor, torch eager) must run the chain, at a fixed cost per call whatever the batch
  size: the canary must roll it back on p99.

Both are re-exported with the same dynamic batch dimension as ``model.pt2``; the script prints
their accuracies and the slow model's agreement with the original on the test split. Seeded and
deterministic on CPU; run by ``dvc repro`` (stage ``build_digits_variants``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0
MAX_BATCH = 1024  # as data/train_digits.py exports model.pt2
SLOW_SIZE = 768  # side of the square matrices in the slow chain
SLOW_STEPS = 3  # float64 matmuls per call: ~0.9 GFLOP each, ~40 ms in all on a 2-core CPU
# the linear head of train_digits.DigitsCNN (Flatten, Dropout, Linear)
HEAD_WEIGHT = "head.2.weight"
HEAD_BIAS = "head.2.bias"


class SlowDigits(nn.Module):
    """The original program plus a per-call chain of matmuls that leaves the logits unchanged."""

    def __init__(self, inner: nn.Module, size: int = SLOW_SIZE, steps: int = SLOW_STEPS) -> None:
        super().__init__()
        self.inner = inner
        generator = torch.Generator().manual_seed(SEED)
        # scaled so tanh stays out of saturation: each row of h @ w has variance ~1. Stored in
        # float32 (half the bytes), computed in float64: quantizers leave float64 alone, so
        # int8 variants pay the same cost as fp32 ones.
        self.register_buffer("w", torch.randn(size, size, generator=generator) / size**0.5)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        w = self.w.double()
        h = w * torch.tanh(x.mean()).double()  # input-dependent: no constant folding removes it
        for _ in range(self.steps):
            h = torch.tanh(h @ w)
        # tanh is within [-1, 1], so the mean is at most 1 and relu(mean - 2) is exactly 0
        return logits + torch.relu(h.mean() - 2.0).float()


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path, allow_pickle=False) as npz:
        return torch.from_numpy(npz["inputs"]), torch.from_numpy(npz["labels"])


def export(module: nn.Module, example: torch.Tensor, path: Path) -> nn.Module:
    """Export with a dynamic batch dimension (as train_digits.py does); return its module."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ep = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    save(ep, path)
    return torch.export.load(path).module()


def save(ep: torch.export.ExportedProgram, path: Path) -> None:
    """``torch.export.save`` without the nodes' provenance, which records Python object ids:
    the same inputs then give the same bytes (DVC's hash, and the registry's "same content,
    same version" check on a re-run of the demo)."""
    for node in ep.graph.nodes:
        node.meta.pop("from_node", None)
    torch.export.save(ep, path)


def permuted(source: Path, path: Path) -> nn.Module:
    """The original program with its head's output rows rotated by one class (a derangement),
    saved as it is: same graph, same dynamic batch dimension, other weights."""
    ep = torch.export.load(source)
    order = torch.roll(torch.arange(ep.state_dict[HEAD_BIAS].numel()), 1)
    with torch.no_grad():
        for name in (HEAD_WEIGHT, HEAD_BIAS):
            ep.state_dict[name].copy_(ep.state_dict[name][order].clone())
    save(ep, path)
    return torch.export.load(path).module()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data", type=Path, default=Path("data/digits"), help="folder with model.pt2 and test.npz"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/digits/variants"), help="output folder"
    )
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    started = time.perf_counter()
    source = args.data / "model.pt2"
    x_test, y_test = load(args.data / "test.npz")
    example = x_test[:8]
    args.out.mkdir(parents=True, exist_ok=True)

    original = torch.export.load(source).module()
    base = logits(original, x_test)
    bad = permuted(source, args.out / "permuted.pt2")
    slow = export(SlowDigits(torch.export.load(source).module()), example, args.out / "slow.pt2")
    bad_logits, slow_logits = logits(bad, x_test), logits(slow, x_test)

    def accuracy(out: torch.Tensor) -> float:
        return round((out.argmax(dim=1) == y_test).float().mean().item(), 6)

    report = {
        "original_accuracy": accuracy(base),
        "permuted_accuracy": accuracy(bad_logits),
        "slow_accuracy": accuracy(slow_logits),
        "slow_agreement": round((slow_logits.argmax(1) == base.argmax(1)).float().mean().item(), 6),
        "slow_max_abs_diff": float((slow_logits - base).abs().max()),
    }
    print(f"{json.dumps(report)}; {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
