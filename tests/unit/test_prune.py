"""Structured pruning of torch.export programs (kiln.optimize.prune) on tiny real models: which channels
go, what the pruned program computes, and which layers are left whole and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.backends._torch import has_dynamic_batch
from kiln.errors import VariantUnavailable
from kiln.optimize.pipeline import OptimizeSettings
from kiln.optimize.prune import prune_structured
from kiln.spec import ModelSpec

DEAD = [1, 4, 6, 9, 13, 17]  # 6 of the MLP's 20 hidden units: 30%


class RedundantMLP(torch.nn.Module):
    """8 -> 20 -> 20 -> 3, the first hidden layer's DEAD units with near-zero weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 20)
        self.fc2 = torch.nn.Linear(20, 20)
        self.out = torch.nn.Linear(20, 3)
        with torch.no_grad():
            self.fc1.weight[DEAD] *= 1e-4
            self.fc1.bias[DEAD] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


class SmallCNN(torch.nn.Module):
    """conv -> relu -> conv -> relu -> max_pool -> flatten -> linear -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 10, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(10, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.head(torch.relu(self.fc(torch.flatten(x, 1))))


class Residual(torch.nn.Module):
    """fc1's output is added back after fc2: a residual pruning must not follow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 10)
        self.fc2 = torch.nn.Linear(10, 10)
        self.out = torch.nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(h)) + h)


def _save(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _spec(shape: list[int], outputs: int) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "task": "classification",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": shape}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, outputs]}],
        }
    )


def _params(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.export.load(str(path)).module().named_parameters())


def test_every_hidden_layer_is_pruned_the_dead_units_first(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RedundantMLP().eval()
    source = _save(model, torch.randn(2, 8), tmp_path / "mlp.pt2")
    record = prune_structured(source, tmp_path / "pruned.pt2", ratio=0.3, spec=_spec([-1, 8], 3))

    first, second = record["layers"]
    assert first == {
        "name": "fc1",
        "op": "linear",
        "channels_before": 20,
        "channels_after": 14,
        "removed": DEAD,
        "consumers": ["fc2"],
    }
    assert second["name"] == "fc2" and second["channels_after"] == 14
    assert record["skipped"] == [
        {"name": "out", "op": "linear", "reason": "its output is the model's output"}
    ]
    # fc1 8x20+20, fc2 20x20+20, out 20x3+3 -> fc1 8x14+14, fc2 14x14+14, out 14x3+3
    assert record["params_before"] == 663 and record["params_after"] == 381
    params = _params(tmp_path / "pruned.pt2")
    assert params["fc1.weight"].shape == (14, 8) and params["fc2.weight"].shape == (14, 14)
    assert params["out.weight"].shape == (3, 14)

    assert has_dynamic_batch(torch.export.load(str(tmp_path / "pruned.pt2")))


def test_pruning_only_dead_units_keeps_the_outputs(tmp_path: Path) -> None:
    """A two-layer MLP: the hidden layer is the only prunable one, its dead units go."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    with torch.no_grad():
        model[0].weight[DEAD] *= 1e-4
        model[0].bias[DEAD] = 0.0
    source = _save(model, torch.randn(2, 8), tmp_path / "mlp.pt2")
    record = prune_structured(source, tmp_path / "pruned.pt2", ratio=0.3, spec=_spec([-1, 8], 3))
    assert [layer["removed"] for layer in record["layers"]] == [DEAD]
    assert record["params_before"] == 8 * 20 + 20 + 20 * 3 + 3
    assert record["params_after"] == 8 * 14 + 14 + 14 * 3 + 3
    assert record["max_abs_diff"] < 1e-3
    pruned = torch.export.load(str(tmp_path / "pruned.pt2")).module()
    for rows in (1, 7, 100):
        x = torch.randn(rows, 8)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), model(x), rtol=1e-3, atol=1e-3)


def test_pruning_a_cnn_keeps_shapes_consistent_through_flatten(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    source = _save(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.pt2")
    record = prune_structured(
        source, tmp_path / "pruned.pt2", ratio=0.3, spec=_spec([-1, 1, 8, 8], 5)
    )
    summary = {
        layer["name"]: (layer["channels_before"], layer["channels_after"], layer["consumers"])
        for layer in record["layers"]
    }
    assert summary == {
        "conv1": (10, 7, ["conv2"]),
        "conv2": (16, 12, ["fc"]),
        "fc": (12, 9, ["head"]),
    }
    assert [s["name"] for s in record["skipped"]] == ["head"]
    params = _params(tmp_path / "pruned.pt2")
    assert params["conv1.weight"].shape == (7, 1, 3, 3)
    assert params["conv2.weight"].shape == (12, 7, 3, 3)
    assert params["fc.weight"].shape == (9, 12 * 4 * 4)  # each channel: its 4x4 block
    assert params["head.weight"].shape == (5, 9)
    assert record["params_after"] < record["params_before"]

    # the removed conv2 channels' 16-feature blocks are the ones gone from fc's inputs
    removed = record["layers"][1]["removed"]
    kept = [c for c in range(16) if c not in removed]
    expected = model.fc.weight.detach().reshape(12, 16, 16)[:, kept].reshape(12, -1)
    fc_rows = [r for r in range(12) if r not in record["layers"][2]["removed"]]
    torch.testing.assert_close(params["fc.weight"], expected[fc_rows])

    pruned = torch.export.load(str(tmp_path / "pruned.pt2"))
    assert has_dynamic_batch(pruned)
    for rows in (1, 7):
        out = pruned.module()(torch.randn(rows, 1, 8, 8))
        assert out.shape == (rows, 5) and torch.isfinite(out).all()


def test_a_residual_is_skipped_with_the_reason(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _save(Residual(), torch.randn(2, 6), tmp_path / "res.pt2")
    with pytest.raises(
        VariantUnavailable,
        match=r"nothing to prune.*fc1: its output reaches "
        r"aten\.add.*residual",
    ):
        prune_structured(source, tmp_path / "pruned.pt2", ratio=0.3, spec=_spec([-1, 6], 2))
    assert not (tmp_path / "pruned.pt2").exists()


def test_ratio_and_settings_are_validated(tmp_path: Path) -> None:
    source = _save(RedundantMLP(), torch.randn(2, 8), tmp_path / "mlp.pt2")
    with pytest.raises(ValueError, match="between 0 and 1"):
        prune_structured(source, tmp_path / "p.pt2", ratio=1.0, spec=_spec([-1, 8], 3))
    with pytest.raises(VariantUnavailable, match="removes none"):
        prune_structured(source, tmp_path / "p.pt2", ratio=0.01, spec=_spec([-1, 8], 3))
    settings = OptimizeSettings.for_model({"optimize": {"prune": True}})
    assert settings.prune and settings.prune_ratio == 0.3
    assert not OptimizeSettings().prune
    with pytest.raises(ValueError, match="prune_ratio"):
        OptimizeSettings.for_model({"optimize": {"prune": True, "prune_ratio": 1.5}})
