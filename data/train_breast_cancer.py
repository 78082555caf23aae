"""Train an MLP on the prepared breast-cancer splits and export it with ``torch.export``.

The model standardises its own input with the training split's mean and std, held as registered
buffers, so it takes the raw 30 features. Reads ``{train,val,test}.npz`` from ``--data``, keeps
the epoch with the lowest validation loss (steadier than accuracy on 85 rows), and writes into
``--out``:

- ``model.pt2``: a ``torch.export`` archive taking ``x`` float32 ``[batch, 30]`` (batch dynamic,
  1..1024) and returning 2 logits;
- ``metrics.json``: ``{"test_accuracy", "val_accuracy"}``, both measured with the exported program.

Seeded and deterministic on CPU; run by ``dvc repro`` (stage ``train_breast_cancer``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0
EPOCHS = 100
BATCH_SIZE = 64
MAX_BATCH = 1024


class BreastCancerMLP(nn.Module):
    """Standardise (baked-in train mean/std), then 30 -> 64 -> 32 -> 2 with ReLU."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.net = nn.Sequential(
            nn.Linear(30, 64),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path, allow_pickle=False) as npz:
        return torch.from_numpy(npz["inputs"]), torch.from_numpy(npz["labels"])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy)."""
    logits = model(x)
    return (
        (logits.argmax(dim=1) == y).float().mean().item(),
        nn.functional.cross_entropy(logits, y).item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data", type=Path, default=Path("data/breast_cancer"), help="prepared splits"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/breast_cancer"), help="output folder"
    )
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    x_train, y_train = load(args.data / "train.npz")
    x_val, y_val = load(args.data / "val.npz")
    x_test, y_test = load(args.data / "test.npz")

    # A constant feature would divide by zero; none is constant here, the clamp is a guard.
    model = BreastCancerMLP(x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)

    best_loss = float("inf")
    best_state, best_epoch = copy.deepcopy(model.state_dict()), -1
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x_train), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        model.eval()
        val_loss = evaluate(model, x_val, y_val)[1]
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()

    example = x_train[:8]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, args.out / "model.pt2")

    exported = ep.module()
    metrics = {
        "test_accuracy": round(evaluate(exported, x_test, y_test)[0], 6),
        "val_accuracy": round(evaluate(exported, x_val, y_val)[0], 6),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"best epoch {best_epoch + 1}/{EPOCHS}; {metrics}; {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
