"""The optimize-model flow end to end on real models: select, reject, skip with reasons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kiln import crud
from kiln.db import session_scope
from kiln.settings import get_settings
from tests.conftest import run_kiln

VARIANT_KEYS = {"backend", "precision", "metric", "metric_min", "metric_drop", "passed",
                "latency_ms", "throughput", "size_bytes"}


def _set_optimize(name: str, **optimize: object) -> None:
    with session_scope(get_settings().db_url) as session:
        model = crud.require_model(session=session, name=name)
        crud.update_model_settings(session=session, model=model, settings={"optimize": optimize})


def _status(name: str) -> str:
    with session_scope(get_settings().db_url) as session:
        return str(crud.require_version(session=session, name=name).status)


def test_optimize_digits_selects_a_faster_passing_variant(kiln_home: Path, examples: Path
                                                          ) -> None:
    digits = examples / "digits"
    up = run_kiln("upload", "digits", str(digits / "model.pt2"), "--dataset",
                  str(digits / "val.npz"), "--json")
    assert up.returncode == 0, up.stderr
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
    assert {("onnxruntime", "fp32"), ("onnxruntime", "int8-dynamic"),
            ("onnxruntime", "int8-static"), ("inductor", "fp32")} <= built
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
    from safetensors.torch import save_file
    import torch

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
        "    return Branchy()\n")
    save_file({"fc.weight": torch.ones(2, 4), "fc.bias": torch.zeros(2)},
              str(folder / "w.safetensors"))
    (folder / "kiln.yaml").write_text(
        "task: classification\nfactory: branchy_model:build\nweights: w.safetensors\n"
        "inputs:\n  - {name: x, datatype: FP32, shape: [-1, 4]}\n")
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


def test_corrupt_calibration_data_skips_static_quantization(kiln_home: Path, examples: Path,
                                                           tmp_path: Path) -> None:
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
    assert any("int8-static skipped" in s and "Great Expectations" in s
               for s in doc["skipped"])
    assert doc["selected"]["passed"] or doc["selected"]["backend"] == "torch-eager"
    assert not math.isnan(doc["baseline"]["metric"])
