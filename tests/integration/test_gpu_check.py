"""`make gpu-check` without a GPU: the carry folder is built and fits, and the check script runs
with the packages the GPU machine lacks (pydantic, prefect, dvc, litserve, fastapi, starlette,
uvicorn, orjson, pyzmq, sqlmodel, pydantic-settings...) importable only from the wheels it
carries, as on the GPU machine.

Every Python process of a run (``bench/gpu_check.py``, the engines it starts and their LitServe
workers) gets a ``sitecustomize`` that installs a meta-path finder: a blocked package imports
only from a folder outside the venv (the carried wheels, installed by the check into a
temporary folder), else it raises ModuleNotFoundError and the attempt is logged with the file
that asked. A launcher records, at exit, every module ``gpu_check.py`` loaded. Without CUDA the
script must say so and exit 0; with ``--cpu-smoke`` it runs the whole pipeline (extract,
AOTInductor fp32, timing, quality, then Kiln's engine serving each variant and a burst of
requests) on CPU and writes the markdown tables and JSON.
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
# Top-level modules of this venv that the GPU machine's python3 does not have (those Kiln's
# code, LitServe and FastAPI may reach; bench/README-gpu.md lists what it has).
BLOCKED = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "pydantic_extra_types",
    "prefect",
    "dvc",
    "litserve",
    "fastapi",
    "starlette",
    "uvicorn",
    "orjson",
    "zmq",
    "sqlmodel",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "redis",
    "annotated_types",
    "typing_inspection",
    "opentelemetry",
    "sniffio",
    "multipart",
    "python_multipart",
    "httptools",
    "websockets",
    "watchfiles",
    "ujson",
)
NO_CUDA = "no CUDA device: nothing to check"

# Loaded by every Python process of a run (PYTHONPATH): the GPU machine's missing packages.
SITECUSTOMIZE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, os, site, sys, traceback

    _BLOCKED = set(os.environ["KILN_TEST_BLOCKED"].split(","))
    _VENV = {os.path.realpath(p) for p in site.getsitepackages()}
    _LOG = os.environ["KILN_TEST_ATTEMPTS"]

    class _GpuMachine(importlib.abc.MetaPathFinder):
        # a blocked package imports only from a folder outside the venv: the carried wheels
        def find_spec(self, name, path=None, target=None):
            if "." in name or name not in _BLOCKED:
                return None
            outside = [p for p in sys.path if os.path.realpath(p or ".") not in _VENV]
            spec = importlib.machinery.PathFinder.find_spec(name, outside)
            if spec is not None:
                return spec
            frames = [f.filename for f in traceback.extract_stack()
                      if "importlib" not in f.filename and f.filename != __file__]
            with open(_LOG, "a") as fh:
                fh.write(json.dumps({"module": name, "from": frames[-1] if frames else "",
                                     "pid": os.getpid()}) + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, _GpuMachine())
""")

LAUNCHER = textwrap.dedent("""
    import json, runpy, sys

    report, script = sys.argv[1], sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        with open(report, "w") as fh:
            json.dump({"modules": sorted(sys.modules)}, fh)
    sys.exit(code)
""")


def run_blocked(
    tmp_path: Path, *args: str | Path, timeout: float = 600
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``bench/gpu_check.py ARGS`` as on the GPU machine; its output and a report: the modules
    it loaded, and every blocked import attempt of any of its processes."""
    run = len(list(tmp_path.glob("run-*")))
    folder = tmp_path / f"run-{run}"
    (folder / "site").mkdir(parents=True)
    (folder / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    launcher = folder / "launch_as_on_the_gpu_machine.py"
    launcher.write_text(LAUNCHER)
    report, attempts = folder / "modules.json", folder / "attempts.jsonl"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(folder / "site"),
        "KILN_TEST_BLOCKED": ",".join(BLOCKED),
        "KILN_TEST_ATTEMPTS": str(attempts),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(launcher),
            str(report),
            str(REPO / "bench" / "gpu_check.py"),
            *map(str, args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert report.exists(), f"the launcher wrote no report:\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads(report.read_text())
    doc["attempts"] = (
        [json.loads(line) for line in attempts.read_text().splitlines()]
        if attempts.exists()
        else []
    )
    return proc, doc


def assert_gpu_machine_imports(report: dict[str, Any]) -> None:
    """gpu_check.py loaded nothing the GPU machine lacks, and no Kiln file or bench script, in
    any process of the run, asked for a package that neither it nor the carried wheels have."""
    modules = set(report["modules"])
    loaded = sorted(m for m in modules if m.split(".")[0] in BLOCKED)
    assert not loaded, f"modules the GPU machine does not have were imported: {loaded}"
    ours = [
        a
        for a in report["attempts"]
        if a["from"].startswith((str(REPO / "kiln"), str(REPO / "bench"), str(REPO / "serving")))
    ]
    assert not ours, f"Kiln code tried to import a package the GPU machine lacks: {ours}"
    # kiln.spec (pydantic) and the kiln.backends package (which imports it) stay out of the
    # check itself; only its engines, with the carried wheels, import them.
    assert "kiln.spec" not in modules and "kiln.backends" not in modules


@pytest.fixture(scope="module")
def carry(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The carry folder, its wheels for this interpreter (the GPU machine's are CPython 3.12):
    pip downloads the versions requirements.lock pins, as `make setup` installs them."""
    out = tmp_path_factory.mktemp("gpu") / "gpu-carry"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "prepare_gpu_check.py"),
            "--data-root",
            str(examples),
            "--out",
            str(out),
            "--wheels-for",
            "here",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"prepare failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_carry_folder_fits_and_is_complete(carry: Path) -> None:
    manifest = json.loads((carry / "manifest.json").read_text())
    wheels = {n for n in manifest["files"] if n.startswith("wheels/")}
    assert set(manifest["files"]) - wheels == {
        "digits/model.pt2",
        "digits/test.npz",
        "minilm/config.json",
        "minilm/model.fp16.safetensors",
        "minilm/tokenizer.json",
        "minilm/sentences.json",
        "minilm/reference.npy",
    }
    projects = {Path(n).name.split("-")[0].lower() for n in wheels}
    assert {
        "litserve",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "pydantic_core",
        "pyzmq",
        "orjson",
    } <= projects
    assert sum(manifest["files"][n]["bytes"] for n in wheels) < 8 * 2**20
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
    proc, report = run_blocked(
        tmp_path,
        "--carry",
        carry,
        "--out",
        out,
        "--cpu-smoke",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--requests",
        "24",
        "--concurrency",
        "6",
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    assert_gpu_machine_imports(report)

    md = (out / "gpu_check.md").read_text()
    assert "| model | variant | batch | p50 ms | p99 ms | samples/s | speedup |" in md
    assert md in proc.stdout  # the same table is printed
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["machine"]["device"] == "cpu"
    cells = {(r["model"], r["variant"], r["batch"]) for r in doc["rows"]}
    assert cells == {
        (m, v, b)
        for m in ("digits", "minilm")
        for v in ("torch-eager fp32", "inductor fp32")
        for b in (1, 32)
    }
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

    # Kiln's engine served every variant from the carried wheels and answered the burst
    serving = doc["serving"]
    assert serving["errors"] == [] and not serving["skipped"], serving
    assert "| model | variant | requests | concurrency | p50 ms | p99 ms | requests/s |" in md
    served = {(r["model"], r["variant"]): r for r in serving["rows"]}
    assert set(served) == {
        (m, v) for m in ("digits", "minilm") for v in ("torch-eager fp32", "inductor fp32")
    }
    for (model, variant), row in served.items():
        assert row["status"] == "ok", row
        assert row["ok"] == row["requests"] == 24 and row["errors"] == 0
        assert row["p99_ms"] >= row["p50_ms"] > 0 and row["requests_per_s"] > 0
        assert 1 <= row["mean_batch"] <= row["max_batch_size"] == 32
        assert row["engine_stats"]["served"] == 24
        assert f"| {model} | {variant} | 24 | 6 |" in md
    assert served[("digits", "inductor fp32")]["quality"]["top1_agreement"] == 1.0
    assert served[("minilm", "inductor fp32")]["quality"]["cos_min"] > 0.999
    assert served[("minilm", "torch-eager fp32")]["quality"]["cos_min"] > 0.999
    # the engines ran LitServe from the carried wheels (the blocker keeps this venv's out)
    assert any(n.startswith("litserve-") for n in serving["wheels"])
