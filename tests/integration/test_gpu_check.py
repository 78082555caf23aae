"""`make gpu-check` without a GPU: the carry folder is built and fits, and the check script runs
with pydantic, prefect, dvc, litserve and fastapi unimportable, as on the GPU machine.

``bench/gpu_check.py`` runs in a child process through a small launcher that blocks those
packages (a meta-path finder raising ModuleNotFoundError) and records, at exit, every module
loaded and every attempt to import a blocked one with the file that asked. Without CUDA the
script must say so and exit 0; with ``--cpu-smoke`` it runs the whole pipeline (extract, AOTInductor
fp32, timing, quality) on CPU and writes the markdown table and JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("pydantic", "pydantic_core", "prefect", "dvc", "litserve", "fastapi")
NO_CUDA = "no CUDA device: nothing to check"

LAUNCHER = textwrap.dedent("""
    import importlib.abc, json, runpy, sys, traceback

    BLOCKED = set(sys.argv[1].split(","))
    report, script = sys.argv[2], sys.argv[3]
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                frames = [f.filename for f in traceback.extract_stack()
                          if "importlib" not in f.filename and f.filename != __file__]
                attempts.append({"module": name, "from": frames[-1] if frames else ""})
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = [script, *sys.argv[4:]]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        with open(report, "w") as fh:
            json.dump({"modules": sorted(sys.modules), "attempts": attempts}, fh)
    sys.exit(code)
""")


def run_blocked(tmp_path: Path, *args: str | Path, timeout: float = 600
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    launcher = tmp_path / "launch_without_pydantic.py"
    launcher.write_text(LAUNCHER)
    report = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(launcher), ",".join(BLOCKED), str(report),
         str(REPO / "bench" / "gpu_check.py"), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert report.exists(), f"the launcher wrote no report:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(report.read_text())


def assert_gpu_machine_imports(report: dict[str, Any]) -> None:
    """Nothing the GPU machine lacks was loaded, and no Kiln file or bench script asked."""
    modules = set(report["modules"])
    loaded = sorted(m for m in modules if m.split(".")[0] in BLOCKED)
    assert not loaded, f"modules the GPU machine does not have were imported: {loaded}"
    ours = [a for a in report["attempts"]
            if a["from"].startswith((str(REPO / "kiln"), str(REPO / "bench")))]
    assert not ours, f"Kiln code tried to import a package the GPU machine lacks: {ours}"
    # kiln.spec (pydantic) and the kiln.backends package (which imports it) stay out.
    assert "kiln.spec" not in modules and "kiln.backends" not in modules


@pytest.fixture(scope="module")
def carry(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "gpu-carry"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "prepare_gpu_check.py"),
         "--data-root", str(examples), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"prepare failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_carry_folder_fits_and_is_complete(carry: Path) -> None:
    manifest = json.loads((carry / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "digits/model.pt2", "digits/test.npz", "minilm/config.json",
        "minilm/model.fp16.safetensors", "minilm/tokenizer.json", "minilm/sentences.json",
        "minilm/reference.npy"}
    on_disk = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert on_disk < 60 * 2**20, f"carry folder is {on_disk / 2**20:.1f} MiB"
    assert len(json.loads((carry / "minilm" / "sentences.json").read_text())) == 256

    from safetensors import safe_open

    with safe_open(str(carry / "minilm" / "model.fp16.safetensors"), "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
    assert "F32" not in dtypes and "F16" in dtypes


def test_without_cuda_it_says_so_and_exits_zero(carry: Path, tmp_path: Path) -> None:
    proc, report = run_blocked(tmp_path, "--carry", carry, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_CUDA
    assert not (tmp_path / "out").exists()
    assert_gpu_machine_imports(report)


def test_cpu_smoke_runs_the_pipeline_without_pydantic(carry: Path, tmp_path: Path) -> None:
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("AOTInductor needs a C++ compiler")
    out = tmp_path / "out"
    proc, report = run_blocked(tmp_path, "--carry", carry, "--out", out, "--cpu-smoke",
                               "--iters", "2", "--warmup", "1")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    assert_gpu_machine_imports(report)

    md = (out / "gpu_check.md").read_text()
    assert "| model | variant | batch | p50 ms | p99 ms | samples/s | speedup |" in md
    assert md in proc.stdout  # the same table is printed
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["machine"]["device"] == "cpu"
    cells = {(r["model"], r["variant"], r["batch"]) for r in doc["rows"]}
    assert cells == {(m, v, b) for m in ("digits", "minilm")
                     for v in ("torch-eager fp32", "inductor fp32") for b in (1, 32)}
    for row in doc["rows"]:
        assert f"| {row['model']} | {row['variant']} | {row['batch']} |" in md
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert row["samples_per_s"] > 0

    digits = {v["backend"]: v for v in doc["models"]["digits"]["variants"]}
    assert digits["inductor"]["status"] == "ok"
    assert digits["inductor"]["quality"]["drop_points"] <= 0.5
    assert digits["torch-eager"]["quality"]["accuracy"] > 0.9
    minilm = {v["backend"]: v for v in doc["models"]["minilm"]["variants"]}
    assert minilm["inductor"]["status"] == "ok"
    assert minilm["inductor"]["quality"]["cos_min"] > 0.999
    # fp16 weights cost almost nothing against embeddings of the original fp32 weights
    assert minilm["torch-eager"]["quality"]["cos_vs_fp32_weights_min"] > 0.999
    assert doc["models"]["minilm"]["extract"]["parity_max_abs_diff"] <= 1e-4
