"""Train a small CNN on the prepared digits splits and export it with ``torch.export``.

Reads ``{train,val}.npz`` and ``test.npz`` from ``--data``, trains on train, keeps the epoch with
the best validation accuracy, and writes into ``--out``:

- ``model.pt2``: a ``torch.export`` archive taking ``x`` float32 ``[batch, 1, 8, 8]`` (batch
  dynamic, 1..1024) and returning 10 logits;
- ``metrics.json``: ``{"test_accuracy", "val_accuracy"}``, both measured with the exported program.

Seeded and deterministic on CPU; run by ``dvc repro`` (stage ``train_digits``).
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
EPOCHS = 30
BATCH_SIZE = 64
MAX_BATCH = 1024


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers (1 -> 16 -> 32 channels), a 2x2 max-pool, and a linear head to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path, allow_pickle=False) as npz:
        return torch.from_numpy(npz["inputs"]), torch.from_numpy(npz["labels"])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/digits"), help="prepared splits")
    parser.add_argument("--out", type=Path, default=Path("data/digits"), help="output folder")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    x_train, y_train = load(args.data / "train.npz")
    x_val, y_val = load(args.data / "val.npz")
    x_test, y_test = load(args.data / "test.npz")

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)

    best_val, best_state, best_epoch = -1.0, copy.deepcopy(model.state_dict()), -1
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x_train), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        val = accuracy(model, x_val, y_val)
        if val > best_val:  # strict: the earliest epoch wins a tie
            best_val, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()

    example = x_train[:8]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, args.out / "model.pt2")

    exported = ep.module()
    metrics = {
        "test_accuracy": round(accuracy(exported, x_test, y_test), 6),
        "val_accuracy": round(accuracy(exported, x_val, y_val), 6),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"best epoch {best_epoch + 1}/{EPOCHS}; {metrics}; {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
