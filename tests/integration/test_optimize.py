"""The optimize-model flow end to end on real models: select, reject, skip with reasons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.settings import get_settings
from tests.conftest import run_kiln, upload_digits

VARIANT_KEYS = {
    "backend",
    "precision",
    "metric",
    "metric_min",
    "metric_drop",
    "passed",
    "latency_ms",
    "throughput",
    "size_bytes",
}


def _set_optimize(name: str, **optimize: object) -> None:
    with session_scope(get_settings().db_url) as session:
        model = crud.require_model(session=session, name=name)
        crud.update_model_settings(session=session, model=model, settings={"optimize": optimize})


def _status(name: str) -> str:
    with session_scope(get_settings().db_url) as session:
        return str(crud.require_version(session=session, name=name).status)


def test_optimize_digits_selects_a_faster_passing_variant(kiln_home: Path, examples: Path) -> None:
    upload_digits(examples / "digits")
    proc = run_kiln("optimize", "digits", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert {"job_id", "status", "baseline", "variants", "selected"} <= set(doc)
    assert doc["status"] == "validated" and _status("digits") == "validated"
    for variant in [doc["baseline"], *doc["variants"]]:
        assert VARIANT_KEYS <= set(variant)
        assert set(variant["latency_ms"]) == {"1", "8", "32"}
        assert variant["latency_ms"]["1"]["p50"] <= variant["latency_ms"]["1"]["p99"]
    built = {(v["backend"], v["precision"]) for v in doc["variants"]}
    assert {
        ("onnxruntime", "fp32"),
        ("onnxruntime", "int8-dynamic"),
        ("onnxruntime", "int8-static"),
        ("inductor", "fp32"),
    } <= built
    selected = doc["selected"]
    assert selected["passed"] and selected["backend"] != "torch-eager"
    assert selected["metric_drop"] <= 0.005
    base_p50 = doc["baseline"]["latency_ms"]["8"]["p50"]
    assert selected["latency_ms"]["8"]["p50"] * 1.1 <= base_p50
    # the registry agrees: one selected artifact, stored with the sha256 of its bytes
    shown = json.loads(run_kiln("show", "digits", "--json").stdout)
    chosen = [a for a in shown["artifacts"] if a["selected"]]
    assert len(chosen) == 1 and chosen[0]["backend"] == selected["backend"]
    kinds = {a["kind"] for a in shown["artifacts"]}
    # (a .pt2 source with a dynamic batch is its own exported program: stored once)
    assert {"source", "onnx", "quantized", "compiled", "report"} <= kinds
    assert all(j["status"] in {"done", "passed", "failed-gate"} for j in shown["jobs"])
    assert Path(doc["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_kiln("optimize", "digits")
    assert again.returncode == 4 and "re-optimization" in again.stderr


def _branchy_folder(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "branchy"
    folder.mkdir()
    (folder / "branchy_model.py").write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return self.fc(x)\n"
        "        return -self.fc(x)\n\n"
        "def build():\n"
        "    return Branchy()\n"
    )
    save_file(
        {"fc.weight": torch.ones(2, 4), "fc.bias": torch.zeros(2)}, str(folder / "w.safetensors")
    )
    (folder / "kiln.yaml").write_text(
        "task: classification\nfactory: branchy_model:build\nweights: w.safetensors\n"
        "inputs:\n  - {name: x, datatype: FP32, shape: [-1, 4]}\n"
    )
    return folder


def test_non_exportable_model_is_rejected_cleanly(kiln_home: Path, tmp_path: Path) -> None:
    up = run_kiln("upload", "branchy", str(_branchy_folder(tmp_path)), "--json")
    assert up.returncode == 0, up.stderr
    before = json.loads(run_kiln("show", "branchy", "--json").stdout)["artifacts"]
    proc = run_kiln("optimize", "branchy", "--json")
    assert proc.returncode == 7
    doc = json.loads(proc.stdout)
    assert doc["status"] == "rejected"
    assert "torch.export" in doc["reason"] and "Traceback" not in doc["reason"]
    assert "x.sum() > 0" in doc["reason"] or "data-dependent" in doc["reason"]
    assert _status("branchy") == "rejected"
    shown = json.loads(run_kiln("show", "branchy", "--json").stdout)
    assert shown["artifacts"] == before  # nothing else changed
    human = run_kiln("optimize", "branchy")
    assert human.returncode != 0


def test_corrupt_calibration_data_skips_static_quantization(
    kiln_home: Path, examples: Path, tmp_path: Path
) -> None:
    digits = examples / "digits"
    with np.load(digits / "val.npz") as data:
        inputs, labels = data["inputs"].copy(), data["labels"]
    inputs[5, 0, 3, 3] = np.inf
    bad = tmp_path / "corrupt.npz"
    np.savez(bad, inputs=inputs, labels=labels)
    up = run_kiln("upload", "digits", str(digits / "model.pt2"), "--dataset", str(bad), "--json")
    assert json.loads(up.stdout)["dataset"]["check_passed"] is False
    _set_optimize("digits", backends=["onnxruntime"])
    doc = json.loads(run_kiln("optimize", "digits", "--json").stdout)
    built = {(v["backend"], v["precision"]) for v in doc["variants"]}
    assert built == {("onnxruntime", "fp32"), ("onnxruntime", "int8-dynamic")}
    assert any("int8-static skipped" in s and "Great Expectations" in s for s in doc["skipped"])
    assert doc["selected"]["passed"] or doc["selected"]["backend"] == "torch-eager"
    assert not math.isnan(doc["baseline"]["metric"])


def _blobs_with_dead_units(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """A .pt2 classifier of 10 Gaussian blobs (32 -> 200 -> 10) whose hidden layer has 60 dead
    units (30%, near-zero weights), a 300-row dataset it solves, and the dead units."""
    import torch

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32)) * 3.0
    labels = rng.integers(0, 10, size=300)
    inputs = (centers[labels] + rng.normal(size=(300, 32))).astype(np.float32)
    # units 0-19 compute the nearest-centre scores c.x - |c|^2/2 (as relu(s) - relu(-s)),
    # 120 more are live but matter little, 60 are dead; rows shuffled so the dead interleave
    bias = -0.5 * (centers**2).sum(axis=1)
    w1 = np.concatenate(
        [centers, -centers, rng.normal(size=(120, 32)) * 0.3, rng.normal(size=(60, 32)) * 1e-4]
    )
    b1 = np.concatenate([bias, -bias, np.zeros(180)])
    w2 = np.concatenate(
        [np.eye(10), -np.eye(10), rng.normal(size=(120, 10)) * 0.01, rng.normal(size=(60, 10))]
    ).T
    order = rng.permutation(200)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10)
    ).eval()
    with torch.no_grad():
        for tensor, value in (
            (model[0].weight, w1[order]),
            (model[0].bias, b1[order]),
            (model[2].weight, w2[:, order]),
        ):
            tensor.copy_(torch.from_numpy(value))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model, (torch.from_numpy(inputs[:2]),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "blobs.pt2"))
    np.savez(tmp_path / "blobs.npz", inputs=inputs, labels=labels)
    dead = np.flatnonzero(order >= 140).tolist()
    return tmp_path / "blobs.pt2", tmp_path / "blobs.npz", dead


def test_pruning_pass_builds_a_smaller_variant_through_the_same_gates(
    kiln_home: Path, tmp_path: Path
) -> None:
    model, dataset, dead = _blobs_with_dead_units(tmp_path)
    up = run_kiln("upload", "blobs", str(model), "--dataset", str(dataset), "--json")
    assert up.returncode == 0, up.stderr
    _set_optimize(
        "blobs", prune=True, backends=["onnxruntime"], precisions={"onnxruntime": ["fp32"]}
    )
    proc = run_kiln("optimize", "blobs", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["baseline"]["metric"] >= 0.99  # the model solves its dataset
    variants = {(v["backend"], v["precision"]): v for v in doc["variants"]}
    assert set(variants) == {("onnxruntime", "fp32"), ("onnxruntime", "fp32-pruned")}
    pruned, dense = variants["onnxruntime", "fp32-pruned"], variants["onnxruntime", "fp32"]
    assert VARIANT_KEYS <= set(pruned)
    assert pruned["metric_drop"] <= 0.005  # the accuracy gate, judged like every variant
    assert not any("accuracy" in r for r in pruned["reasons"])
    assert pruned["size_bytes"] < 0.8 * dense["size_bytes"]
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name="blobs")
        job = next(
            j
            for j in crud.list_jobs(session=session, version=row)
            if j.optimization_type == "onnxruntime/fp32-pruned"
        )
        record = job.metrics["meta"]["pruning"]
        stored = [
            a
            for a in crud.list_artifacts(session=session, version=row)
            if a.precision == "fp32-pruned"
        ]
    assert job.status in {"passed", "failed-gate"}
    assert [
        (layer["channels_before"], layer["channels_after"], layer["removed"])
        for layer in record["layers"]
    ] == [(200, 140, dead)]
    assert record["params_before"] == 8610 and record["params_after"] == 6030
    assert [s["name"] for s in record["skipped"]] == ["2"]  # the output layer
    assert len(stored) == 1 and stored[0].backend == "onnxruntime"
