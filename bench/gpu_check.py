"""`make gpu-check`: the digits CNN and MiniLM compiled for a CUDA GPU, timed against eager fp32.

On a CUDA machine this extracts both example models as Kiln's pipeline does (``torch.export``
with a dynamic batch, and sequence length for MiniLM), compiles them with AOTInductor in fp16
(``torch._inductor.aoti_compile_and_package``, the program cast as Kiln's inductor backend casts
it) and, where ``import torch_tensorrt`` works, with TensorRT fp16 through torch-tensorrt's
dynamo path; then it times every variant at batch 1 and 32 against the fp32 eager baseline and
checks its outputs against the baseline's (digits: top-1 accuracy on the test split; MiniLM:
cosine similarity and nearest-neighbour agreement on 256 sentences, plus cosine against
embeddings of the original fp32 weights computed when the carry folder was built). Then it
serves the eager and inductor variants with Kiln's engine (LitServe, dynamic batching up to 32,
on the GPU) and fires a burst of single-row requests at each (``bench/gpu_serve.py``: latency,
requests/s, the batch sizes the engine ran, errors, answers checked against eager). It prints
markdown tables and writes them, with the full results as JSON, to ``--out``.

It runs under the GPU machine's own ``python3`` (torch, transformers, tokenizers, safetensors;
no pydantic, prefect, dvc, litserve or fastapi), so it imports no Kiln module that needs them:
only ``kiln.examples`` (torch), ``kiln.processes`` (standard library, through
``bench/gpu_serve.py``) and ``kiln/backends/_torch.py``, loaded by path so that the
``kiln.backends`` package (which imports pydantic through ``kiln.spec``) is not imported. The
engines run in child processes with the wheels carried in ``gpu-carry/wheels/`` unpacked into
a temporary folder on their ``PYTHONPATH``. Its inputs come from ``--carry``
(``bench/prepare_gpu_check.py`` builds it: about 50 MiB).

Without a CUDA device it prints "no CUDA device: nothing to check" and exits 0, unless
``--cpu-smoke`` is given: then the same pipeline runs on CPU, inductor in fp32, with a few
iterations and a small burst (for tests). Exit status 1 when a variant that should build failed
to, or an engine failed to start or answered with errors (the tables and JSON are written
first); a backend that is not installed is skipped with its reason.

One call on a session's GPU machine (the device tool), from the repo root, after
``make gpu-check`` (or ``python bench/prepare_gpu_check.py``) here::

    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --carry bench/gpu-carry --out $OUT",
        carry=["bench/gpu-carry"], timeout_s=420)

then copy ``gpu_check.md`` and ``gpu_check.json`` from the reply's files into ``bench/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing to check"
BATCHES = (1, 32)
MAX_BATCH = 1024  # kiln.optimize.extract.ExtractSettings: the dynamic batch's upper bound
SEQ_MIN, SEQ_MAX = 2, 512  # and the sequence length's
TRT_OPT_BATCH, TRT_OPT_SEQ = 32, 128  # kiln.backends.tensorrt: the shapes TensorRT tunes for
# Kiln's default gates: accuracy drop <= 0.5 points, or cosine mean >= 0.99 and
# min >= 0.97; at least 1.1x the baseline's throughput at the serving batch (32).
MAX_DROP_POINTS = 0.5
MIN_COS_MEAN, MIN_COS_MIN = 0.99, 0.97
MIN_SPEEDUP = 1.1
SERVING_BATCH = 32
# The optimize benchmark's targets at batch 32, for reference (they were set for the CPU pipeline).
TARGETS = {"digits": 5.0, "minilm": 2.5}
BUILD_RESERVE_S = 90  # no build starts with less than this left of --budget-s (CUDA default 270)
# Serving (bench/gpu_serve.py): Kiln's default max_batch_size; a burst of single-row requests.
SERVE_BATCH = 32
SERVE_REQUESTS, SERVE_CONCURRENCY, SERVE_BUDGET_S = 512, 64, 60.0  # CUDA defaults
SMOKE_REQUESTS, SMOKE_CONCURRENCY, SMOKE_BUDGET_S = 32, 8, 300.0  # --cpu-smoke defaults
SERVE_MIN_S = 20  # serving is skipped with less than this left of --budget-s
_OIP_OF_TORCH = {
    "torch.float32": "FP32",
    "torch.float16": "FP16",
    "torch.int64": "INT64",
    "torch.int32": "INT32",
    "torch.bool": "BOOL",
}


def _module_at(name: str, path: Path) -> ModuleType:
    """The module at ``path``, imported once under ``name`` (not through its package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def torch_helpers() -> ModuleType:
    """``kiln/backends/_torch.py`` as a stand-alone module (cast_program, input_dims...).

    Importing it as ``kiln.backends._torch`` would run ``kiln/backends/__init__.py``, which
    imports every backend and ``kiln.spec`` (pydantic): not installed on the GPU machine.
    """
    return _module_at("kiln_gpu_check_torch_helpers", ROOT / "kiln" / "backends" / "_torch.py")


def gpu_serve() -> ModuleType:
    """``bench/gpu_serve.py``, the serving part's client (standard library, numpy and
    ``kiln.processes``)."""
    return _module_at("kiln_gpu_check_serve", ROOT / "bench" / "gpu_serve.py")


# ------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    device: str
    carry: Path
    work: Path
    warmup: int
    iters: int
    budget_s: float | None  # None: no limit (--cpu-smoke)
    started: float = field(default_factory=time.perf_counter)

    def left_s(self) -> float:
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - (time.perf_counter() - self.started)


@dataclass
class Variant:
    backend: str
    precision: str
    status: str = "pending"  # ok | failed | skipped
    reason: str = ""
    build_s: float | None = None
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    samples_per_s: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    passed: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass
class Model:
    """An example model, extracted: its fp32 program, inputs to time and inputs to judge."""

    name: str
    program: Path  # the extracted fp32 .pt2 (dynamic batch, and sequence for MiniLM)
    timing: dict[int, list[Any]]  # batch -> CPU tensors
    evaluation: list[list[Any]]  # CPU tensor batches the quality is measured on
    judge: Callable[[np.ndarray, np.ndarray], dict[str, Any]]  # (variant, eager) -> quality
    passes: Callable[[dict[str, Any]], bool]
    extract: dict[str, Any] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    eager_out: np.ndarray | None = None
    # serving (bench/gpu_serve.py): the model's inputs as kiln.spec.TensorSpec JSON, one wire
    # request's inputs per row of ``evaluation`` (in order), how a served answer is judged
    # (row indices, outputs, eager outputs), the tokenizer the engine runs first
    spec_inputs: list[dict[str, Any]] = field(default_factory=list)
    preprocess: dict[str, Any] | None = None
    serve_rows: list[dict[str, np.ndarray]] = field(default_factory=list)
    serve_judge: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, Any]] | None = None
    tokenizer: Path | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)  # variant label -> built file


def spec_inputs(program: Any) -> list[dict[str, Any]]:
    """The program's user inputs as kiln.spec.TensorSpec JSON (dynamic dimensions: -1), as
    Kiln's upload probe records them."""
    h = torch_helpers()
    nodes = h.user_input_nodes(program)
    return [
        {
            "name": node.name,
            "datatype": _OIP_OF_TORCH[str(node.meta["val"].dtype)],
            "shape": [d if isinstance(d, int) else -1 for d in dims],
        }
        for node, dims in zip(nodes, h.input_dims(program), strict=True)
    ]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ------------------------------------------------------------------------------ models
def digits_model(s: Settings) -> Model:
    """The carried digits program as extraction keeps it (its batch is already dynamic)."""
    import torch

    h = torch_helpers()
    folder = s.carry / "digits"
    program_path = folder / "model.pt2"
    started = time.perf_counter()
    program = torch.export.load(str(program_path))
    if not h.has_dynamic_batch(program):
        raise SystemExit(f"{program_path}: the batch dimension is not dynamic")
    with np.load(folder / "test.npz", allow_pickle=False) as npz:
        x = torch.from_numpy(np.ascontiguousarray(npz["inputs"], dtype=np.float32))
        labels = np.asarray(npz["labels"])
    extract = {
        "source": "digits/model.pt2 (dynamic batch: kept as it is)",
        "load_s": round(time.perf_counter() - started, 2),
        "test_rows": len(x),
    }

    def judge(out: np.ndarray, eager: np.ndarray) -> dict[str, Any]:
        acc = float((out.argmax(1) == labels).mean())
        eager_acc = float((eager.argmax(1) == labels).mean())
        return {
            "accuracy": round(acc, 6),
            "eager_accuracy": round(eager_acc, 6),
            "drop_points": round((eager_acc - acc) * 100, 4),
            "top1_agreement": round(float((out.argmax(1) == eager.argmax(1)).mean()), 6),
            "max_abs_logit_diff": round(float(np.abs(out - eager).max()), 6),
        }

    def passes(q: dict[str, Any]) -> bool:
        return q["drop_points"] <= MAX_DROP_POINTS

    def judge_served(rows: np.ndarray, out: np.ndarray, eager: np.ndarray) -> dict[str, Any]:
        top1 = out.argmax(1)
        return {
            "top1_agreement": round(float((top1 == eager[rows].argmax(1)).mean()), 6),
            "accuracy": round(float((top1 == labels[rows]).mean()), 6),
        }

    timing = {b: [x[:b].clone()] for b in BATCHES}
    evaluation = [[x[i : i + 32]] for i in range(0, len(x), 32)]
    model = Model("digits", program_path, timing, evaluation, judge, passes, extract)
    model.spec_inputs = spec_inputs(program)
    name = model.spec_inputs[0]["name"]
    model.serve_rows = [{name: x[i : i + 1].numpy()} for i in range(len(x))]
    model.serve_judge = judge_served
    return model


def minilm_model(s: Settings) -> Model:
    """MiniLM built from the carried fp16 weights (upcast to fp32), exported as Kiln's
    extraction exports a kiln.yaml model: dynamic batch and sequence, checked against eager."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT))
    from kiln.examples import minilm

    h = torch_helpers()
    folder = s.carry / "minilm"
    config = json.loads((folder / "config.json").read_text())
    sentences = json.loads((folder / "sentences.json").read_text())
    reference = np.load(folder / "reference.npy")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(texts: list[str]) -> list[Any]:
        encoded = tokenizer.encode_batch(texts)
        return [
            torch.tensor([e.ids for e in encoded], dtype=torch.int64),
            torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64),
        ]

    started = time.perf_counter()
    model = minilm(**config)
    weights = {k: v.float() for k, v in load_file(folder / "model.fp16.safetensors").items()}
    model.load_state_dict(weights, strict=True)
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=SEQ_MIN, max=SEQ_MAX)
    gen = torch.Generator().manual_seed(0)
    args = (torch.randint(1, 100, (2, 8), generator=gen), torch.ones(2, 8, dtype=torch.int64))
    program = torch.export.export(
        model, args, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    export_s = time.perf_counter() - started
    path = s.work / "minilm.pt2"
    torch.export.save(program, str(path))
    reloaded = torch.export.load(str(path)).module()
    check = encode(sentences[:32])
    with torch.inference_mode():
        want, got = model(*check), reloaded(*check)
    diff = float((want - got).abs().max())
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-4
    )  # kiln.optimize.extract's tolerances
    extract = {
        "source": "minilm fp16 safetensors, upcast to fp32, torch.export "
        f"(batch 1..{MAX_BATCH}, seq {SEQ_MIN}..{SEQ_MAX})",
        "export_s": round(export_s, 2),
        "parity_max_abs_diff": diff,
        "sentences": len(sentences),
        "dims": [[str(d) for d in dims] for dims in h.input_dims(program)],
    }

    def judge(out: np.ndarray, eager: np.ndarray) -> dict[str, Any]:
        cos = _cosine(out, eager)
        ref = _cosine(out, reference)
        return {
            "cos_mean": round(float(cos.mean()), 6),
            "cos_min": round(float(cos.min()), 6),
            "nn_agreement": round(_nn_agreement(out, eager), 4),
            "max_abs_diff": round(float(np.abs(out - eager).max()), 6),
            "cos_vs_fp32_weights_mean": round(float(ref.mean()), 6),
            "cos_vs_fp32_weights_min": round(float(ref.min()), 6),
        }

    def passes(q: dict[str, Any]) -> bool:
        return q["cos_mean"] >= MIN_COS_MEAN and q["cos_min"] >= MIN_COS_MIN

    def judge_served(rows: np.ndarray, out: np.ndarray, eager: np.ndarray) -> dict[str, Any]:
        cos = _cosine(out, eager[rows])
        return {"cos_mean": round(float(cos.mean()), 6), "cos_min": round(float(cos.min()), 6)}

    timing = {b: encode(sentences[:b]) for b in BATCHES}
    evaluation = [encode(sentences[i : i + 32]) for i in range(0, len(sentences), 32)]
    extract["padded_length"] = {str(b): int(t[0].shape[1]) for b, t in timing.items()}
    checked = Model("minilm", path, timing, evaluation, judge, passes, extract)
    checked.spec_inputs = spec_inputs(program)
    truncation = json.loads((folder / "tokenizer.json").read_text()).get("truncation") or {}
    checked.preprocess = {
        "kind": "tokenizer",
        "file": "tokenizer.json",
        "max_length": int(truncation.get("max_length", 128)),
        "text_input": "text",
    }
    checked.tokenizer = folder / "tokenizer.json"
    checked.serve_rows = [{"text": np.array([text], dtype=object)} for text in sentences]
    checked.serve_judge = judge_served
    return checked


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


def _nn_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under ``a`` and ``b``."""

    def nearest(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return float((nearest(a) == nearest(b)).mean())


# ------------------------------------------------------------------------------ builds
def load_eager(model: Model, s: Settings) -> Callable[..., Any]:
    """The baseline as kiln.backends.torch_eager runs it: the program's module, fp32."""
    import torch
    from torch.export.passes import move_to_device_pass

    program = torch.export.load(str(model.program))
    if s.device != "cpu":
        program = move_to_device_pass(program, s.device)
    return program.module()


def build_inductor(model: Model, precision: str, s: Settings) -> Callable[..., Any]:
    """kiln.backends.inductor's build: cast (fp16/bf16, or any precision on CUDA), then one
    AOTInductor package, loaded back as the engine loads it."""
    import torch
    import torch._inductor

    h = torch_helpers()
    program = torch.export.load(str(model.program))
    if precision != "fp32" or s.device != "cpu":
        dtype = getattr(torch, h.FLOAT_DTYPES[precision])
        program = h.cast_program(program, dtype=dtype, device=s.device)
    path = s.work / f"{model.name}-inductor-{precision}.pt2"
    torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(path),
        inductor_configs={"aot_inductor.metadata": {"kiln_precision": precision}},
    )
    probe_aoti_load(path)
    return torch._inductor.aoti_load_package(str(path))


def probe_aoti_load(path: Path) -> None:
    """Load the package once in a fresh process first: on the GPU image of 2026-11-27 (torch
    2.11.0+cu130) every AOTInductor package, CPU ones included, segfaults in ``_load_aoti``, and
    a crash here must fail this variant, not the whole check."""
    import subprocess

    code = (
        "import torch._inductor, sys; torch._inductor.aoti_load_package(sys.argv[1]); "
        "print('loaded')"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        import signal

        how = (
            f"signal {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit {proc.returncode}"
        )
        frame = next((ln.strip() for ln in proc.stderr.splitlines() if "line" in ln), "")
        raise RuntimeError(
            f"the AOTInductor package compiled, but loading it in a fresh process "
            f"failed ({how}) at {frame}"
        )


def build_inductor_jit(model: Model, precision: str, s: Settings) -> Callable[..., Any]:
    """For comparison when the AOTInductor package cannot be loaded: the same cast program
    through ``torch.compile`` (inductor, JIT, dynamic shapes). Not Kiln's serving path (the
    engine loads AOTInductor packages); compiled on the first calls, inside the warm-up."""
    import torch

    h = torch_helpers()
    program = torch.export.load(str(model.program))
    dtype = getattr(torch, h.FLOAT_DTYPES[precision])
    program = h.cast_program(program, dtype=dtype, device=s.device)
    return torch.compile(program.module(), dynamic=True)


def build_tensorrt(
    model: Model, precision: str, s: Settings, notes: list[str]
) -> Callable[..., Any]:
    """kiln.backends.tensorrt's build (fp16): the program cast to fp16 on CUDA, compiled by
    torch_tensorrt.dynamo.compile for the dynamic range, saved and loaded back."""
    import torch
    import torch_tensorrt

    h = torch_helpers()
    program = torch.export.load(str(model.program))
    dims = h.input_dims(program)
    program = h.cast_program(program, dtype=torch.float16, device="cuda")
    inputs = []
    for node, shape in zip(h.user_input_nodes(program), dims, strict=True):
        lo, opt, hi = [], [], []
        for i, dim in enumerate(shape):
            if not isinstance(dim, h.DimRange):
                lo.append(dim)
                opt.append(dim)
                hi.append(dim)
                continue
            top = dim.max or (MAX_BATCH if i == 0 else SEQ_MAX)
            want = TRT_OPT_BATCH if i == 0 else TRT_OPT_SEQ
            lo.append(dim.min)
            opt.append(max(dim.min, min(top, want)))
            hi.append(top)
        inputs.append(
            torch_tensorrt.Input(
                min_shape=lo,
                opt_shape=opt,
                max_shape=hi,
                dtype=node.meta["val"].dtype,
                name=node.name,
            )
        )
    compiled = torch_tensorrt.dynamo.compile(
        program, inputs=inputs, enabled_precisions={torch.float16}
    )
    path = s.work / f"{model.name}-tensorrt-{precision}.ep"
    try:
        torch_tensorrt.save(
            compiled, str(path), output_format="exported_program", arg_inputs=inputs, retrace=True
        )
        return torch.export.load(str(path)).module()
    except Exception as exc:  # time the in-memory engine, and say why the round trip failed
        notes.append(f"save/reload failed, timed the in-memory module: {_first_line(exc)}")
        return compiled


# ------------------------------------------------------------------------------ measuring
def _device_inputs(tensors: list[Any], device: str, float_dtype: Any) -> list[Any]:
    return [
        (t.to(float_dtype) if float_dtype is not None and t.dtype.is_floating_point else t).to(
            device
        )
        for t in tensors
    ]


def _run(fn: Callable[..., Any], tensors: list[Any]) -> np.ndarray:
    h = torch_helpers()
    outs = h.flatten_outputs(fn(*tensors))
    return outs[0].detach().float().cpu().numpy()


def measure(
    fn: Callable[..., Any], model: Model, float_dtype: Any, s: Settings, v: Variant
) -> np.ndarray:
    """Outputs on the evaluation batches, then latency at each batch size (device-resident
    inputs, synchronised after every call: host transfers are not timed)."""
    import torch

    sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        out = np.concatenate(
            [_run(fn, _device_inputs(b, s.device, float_dtype)) for b in model.evaluation]
        )
        for batch, tensors in model.timing.items():
            args = _device_inputs(tensors, s.device, float_dtype)
            for _ in range(s.warmup):
                fn(*args)
            sync()
            times = []
            for _ in range(s.iters):
                t0 = time.perf_counter()
                fn(*args)
                sync()
                times.append(time.perf_counter() - t0)
            ms = np.array(times) * 1000
            v.latency_ms[str(batch)] = {
                "p50": round(float(np.percentile(ms, 50)), 4),
                "p99": round(float(np.percentile(ms, 99)), 4),
                "mean": round(float(ms.mean()), 4),
            }
            v.samples_per_s[str(batch)] = round(batch * 1000 / float(ms.mean()), 1)
    return out


def check_model(model: Model, backends: list[tuple[str, str]], s: Settings) -> None:
    """Baseline first, then each (backend, precision): build, measure, judge."""
    eager = Variant("torch-eager", "fp32")
    model.variants.append(eager)
    try:
        started = time.perf_counter()
        fn = load_eager(model, s)
        eager.build_s = round(time.perf_counter() - started, 2)
        model.eager_out = measure(fn, model, None, s, eager)
    except Exception as exc:  # no baseline: nothing to compare the variants with
        eager.status, eager.reason = "failed", _first_line(exc)
        traceback.print_exc()
        return
    eager.quality = model.judge(model.eager_out, model.eager_out)
    eager.status, eager.passed = "ok", None
    model.artifacts[eager.label] = model.program
    del fn
    for backend, precision in backends:
        run_variant(model, backend, precision, s)


def run_variant(model: Model, backend: str, precision: str, s: Settings) -> None:
    import torch

    v = Variant(backend, precision)
    model.variants.append(v)
    if backend == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as exc:  # a missing libnvinfer raises a plain Exception
            v.status, v.reason = "skipped", f"torch_tensorrt not importable: {_first_line(exc)}"
            return
    if s.left_s() < BUILD_RESERVE_S:
        v.status = "skipped"
        v.reason = (
            f"time budget: {max(s.left_s(), 0):.0f}s of --budget-s {s.budget_s:.0f} "
            f"left, a build needs {BUILD_RESERVE_S}s"
        )
        return
    print(f"[gpu-check] {model.name}: building {v.label}", file=sys.stderr, flush=True)
    float_dtype = getattr(torch, torch_helpers().FLOAT_DTYPES[precision])
    try:
        started = time.perf_counter()
        if backend == "inductor":
            fn = build_inductor(model, precision, s)
            model.artifacts[v.label] = s.work / f"{model.name}-inductor-{precision}.pt2"
        elif backend == "inductor-jit":
            fn = build_inductor_jit(model, precision, s)
            v.notes.append(
                "torch.compile JIT (not Kiln's serving path); its compile time is "
                "inside the first calls, not build_s"
            )
        else:
            fn = build_tensorrt(model, precision, s, v.notes)
        v.build_s = round(time.perf_counter() - started, 2)
        out = measure(fn, model, float_dtype, s, v)
    except Exception as exc:
        v.status, v.reason = "failed", _first_line(exc)
        traceback.print_exc()
        print(f"[gpu-check] {model.name} {v.label} failed: {v.reason}", file=sys.stderr)
        if backend == "inductor" and s.device == "cuda":
            run_variant(model, "inductor-jit", precision, s)
        return
    assert model.eager_out is not None
    v.quality = model.judge(out, model.eager_out)
    v.status = "ok"
    base = model.variants[0]
    for batch, rate in v.samples_per_s.items():
        v.speedup[batch] = round(rate / base.samples_per_s[batch], 3)
    v.passed = model.passes(v.quality) and v.speedup.get(str(SERVING_BATCH), 0) >= MIN_SPEEDUP
    del fn
    if s.device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ serving
@dataclass
class ServeOptions:
    requests: int
    concurrency: int
    budget_s: float


def serve_targets(model: Model, labels: list[str]) -> list[Any]:
    """What bench/gpu_serve.py serves for ``model``: each built variant in ``labels``."""
    serve = gpu_serve()
    assert model.eager_out is not None and model.serve_judge is not None
    eager_out, judge, n_rows = model.eager_out, model.serve_judge, len(model.serve_rows)

    def judge_burst(requests: np.ndarray, out: np.ndarray) -> dict[str, Any]:
        return judge(requests % n_rows, out, eager_out)  # request k sent row k % n_rows

    spec = {
        "inputs": model.spec_inputs,
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, *eager_out.shape[1:]]}],
        "preprocess": model.preprocess,
    }
    targets = []
    for v in model.variants:
        if v.label not in labels or v.status != "ok" or v.label not in model.artifacts:
            continue
        backend = {"torch-eager": "torch-eager", "inductor": "inductor"}[v.backend]
        version = v.label.replace(" ", "-")
        bodies = [serve.wire_request(model.name, version, row) for row in model.serve_rows]
        targets.append(
            serve.Target(
                model=model.name,
                variant=v.label,
                backend=backend,
                precision=v.precision,
                artifact=model.artifacts[v.label],
                spec=spec,
                bodies=bodies,
                judge=judge_burst,
                tokenizer=model.tokenizer,
            )
        )
    return targets


def serve_models(
    models: list[Model], precision: str, s: Settings, opts: ServeOptions
) -> dict[str, Any]:
    """Kiln's engine serving eager fp32 and inductor ``precision`` of each model (one engine
    each, dynamic batching up to SERVE_BATCH), a burst at each: bench/gpu_serve.py."""
    serve = gpu_serve()
    wheels = s.carry / "wheels"
    budget = min(opts.budget_s, s.left_s())
    if budget < SERVE_MIN_S:
        reason = (
            f"time budget: {max(s.left_s(), 0):.0f}s of --budget-s left, serving needs "
            f"{SERVE_MIN_S}s"
        )
        return {"skipped": reason, "rows": [], "errors": []}
    labels = ["torch-eager fp32", f"inductor {precision}"]
    targets = [t for m in models for t in serve_targets(m, labels)]
    if not targets:
        return {"skipped": "no variant was built", "rows": [], "errors": []}
    logs = s.work / "serve"
    logs.mkdir()
    settings = serve.ServeSettings(
        device=s.device,
        site=s.work / "site",
        logs=logs,
        requests=opts.requests,
        concurrency=opts.concurrency,
        warmup=min(opts.requests, 2 * opts.concurrency),
        max_batch_size=SERVE_BATCH,
        budget_s=budget,
    )
    print(
        f"[gpu-check] serving {len(targets)} variants ({budget:.0f}s budget)",
        file=sys.stderr,
        flush=True,
    )
    section = serve.serve_check(targets, wheels, settings)
    section["skipped"] = ""
    return dict(section)


def _serving_markdown(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    lines = ["", "## Serving: Kiln's engine (LitServe), dynamic batching", ""]
    if section.get("skipped"):
        return [*lines, f"Skipped: {section['skipped']}."]
    if not section["rows"]:  # it stopped before any engine started: the errors say why
        return [*lines, *(f"- **{error}**" for error in section["errors"])]
    lines += [
        (
            f"One engine per variant on {section['device']} (max_batch_size "
            f"{section['max_batch_size']}, batch_timeout 0), each sent {section['warmup']} "
            f"warm-up then {section['requests']} timed single-row requests, "
            f"{section['concurrency']} at a time (http.client, keep-alive). Mean batch: "
            "rows per model call during the burst (engine /stats); CPU ms/req: user + system "
            "CPU of the engine's processes (its root and LitServe workers, not the client) "
            "during the burst, per answer; check: answers against the eager model's on the "
            "same rows."
        ),
        "",
        (
            "| model | variant | requests | concurrency | p50 ms | p99 ms | requests/s | "
            "mean batch | max batch | CPU ms/req | errors | check |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        if r.get("p50_ms") is None:
            lines.append(
                f"| {r['model']} | {r['variant']} | {r.get('requests', '')} | "
                f"{r.get('concurrency', '')} | | | | | | | {r['status']} | "
                f"{r['reason'].replace('|', '/')} |"
            )
            continue
        q = r.get("quality", {})
        check = (
            f"top-1 agree {q['top1_agreement']:.4f}, acc {q['accuracy']:.4f}"
            if "top1_agreement" in q
            else f"cos {q.get('cos_mean', 0):.4f} (min {q.get('cos_min', 0):.4f})"
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['requests']} | "
            f"{r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['requests_per_s']:.0f} | {r['mean_batch']} | "
            f"{r.get('max_batch_seen', '')} | {r.get('cpu_ms_per_request') or '-'} | "
            f"{r['errors']} | {check} |"
        )
    lines += [f"- **{error}**" for error in section["errors"]]
    wheels = ", ".join(" ".join(w.split("-")[:2]) for w in section.get("wheels", []))
    lines.append(
        f"- wheels unpacked from the carry folder in {section.get('install_s', 0)}s: "
        f"{wheels}; serving took {section.get('total_s', 0)}s in all"
    )
    return lines


# ------------------------------------------------------------------------------ report
def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as exc:
        info["transformers"] = _first_line(exc)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
        try:  # torch's defaults, recorded: eager fp32 convolutions may run in TF32
            info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
            info["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
        except Exception as exc:
            info["tf32"] = _first_line(exc)
    try:
        import torch_tensorrt

        info["torch_tensorrt"] = torch_tensorrt.__version__
    except Exception as exc:
        info["torch_tensorrt"] = f"not importable ({_first_line(exc)})"
    return info


def _quality_text(model: str, q: dict[str, Any]) -> str:
    if not q:
        return ""
    if model == "digits":
        return (
            f"acc {q['accuracy']:.4f} ({-q['drop_points']:+.2f} pt), "
            f"top-1 agree {q['top1_agreement']:.4f}"
        )
    return (
        f"cos {q['cos_mean']:.4f} (min {q['cos_min']:.4f}), nn {q['nn_agreement']:.2f}; "
        f"vs fp32 weights {q['cos_vs_fp32_weights_mean']:.4f}"
    )


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    where = (
        f"{m['gpu']} (sm {m['capability']}, {m['gpu_memory_gib']} GiB), CUDA {m['cuda']}"
        if m["device"] == "cuda"
        else f"CPU only ({m['cpu_count']} cores): --cpu-smoke"
    )
    lines = [
        "# Kiln GPU check",
        "",
        f"{where}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, torch_tensorrt {m['torch_tensorrt']}.",
        "",
        f"Command: `{doc['command']}` ({doc['generated']}, {doc['total_s']:.0f}s in all; "
        f"{doc['settings']['iters']} timed calls after {doc['settings']['warmup']} warm-up "
        "per cell, inputs on the device, host transfers not timed).",
        "",
        "| model | variant | batch | p50 ms | p99 ms | samples/s | speedup | quality | gates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        gates = "baseline" if r["passed"] is None else ("pass" if r["passed"] else "fail")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch']} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['samples_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['quality']} | {gates} |"
        )
    lines += ["", "| model | variant | status | build s | notes |", "|---|---|---|---|---|"]
    for name, entry in doc["models"].items():
        for v in entry["variants"]:
            notes = "; ".join(filter(None, [v["reason"], *v["notes"]])).replace("|", "/")
            build = "" if v["build_s"] is None else f"{v['build_s']:.1f}"
            lines.append(
                f"| {name} | {v['backend']} {v['precision']} | {v['status']} | {build} | {notes} |"
            )
    lines += [
        "",
        "Gates (Kiln's defaults): accuracy drop <= 0.5 points, or cosine mean >= 0.99 "
        f"and min >= 0.97; >= {MIN_SPEEDUP}x the baseline's samples/s at batch "
        f"{SERVING_BATCH}. The batch-32 targets, set for the CPU pipeline: "
        + ", ".join(f"{k} >= {t}x" for k, t in TARGETS.items())
        + ".",
    ]
    lines += [f"- **{error}**" for error in doc["errors"]]
    for name, entry in doc["models"].items():
        lines.append(
            f"- {name} extraction: "
            + ", ".join(f"{k} {v}" for k, v in entry["extract"].items() if k != "dims")
        )
    lines += _serving_markdown(doc.get("serving", {}))
    return "\n".join(lines) + "\n"


def rows(models: list[Model]) -> list[dict[str, Any]]:
    out = []
    for model in models:
        for v in model.variants:
            if v.status != "ok":
                continue
            for batch in map(str, BATCHES):
                lat = v.latency_ms[batch]
                out.append(
                    {
                        "model": model.name,
                        "variant": v.label,
                        "batch": int(batch),
                        "p50_ms": lat["p50"],
                        "p99_ms": lat["p99"],
                        "samples_per_s": v.samples_per_s[batch],
                        "speedup": v.speedup.get(batch, 1.0),
                        "quality": _quality_text(model.name, v.quality),
                        "passed": v.passed,
                    }
                )
    return out


def output_paths(out: Path) -> tuple[Path, Path]:
    """``--out DIR`` -> DIR/gpu_check.{md,json}; ``--out NAME.md`` (or .json) -> NAME.{md,json}."""
    if out.suffix in (".md", ".json"):
        return out.with_suffix(".md"), out.with_suffix(".json")
    return out / "gpu_check.md", out / "gpu_check.json"


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--carry",
        type=Path,
        default=ROOT / "bench" / "gpu-carry",
        help="the folder bench/prepare_gpu_check.py builds",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu_check.{md,json}, or a NAME.md / NAME.json path (default: print only)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="no CUDA: run the pipeline on CPU (inductor fp32, few iterations)",
    )
    parser.add_argument("--models", default="digits,minilm", help="comma-separated subset")
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed calls per cell (default 200 on CUDA, 3 with --cpu-smoke)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up calls per cell (default 20 on CUDA, 1 with --cpu-smoke)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16", "fp32"),
        default=None,
        help="inductor's precision (default fp16 on CUDA, fp32 with "
        "--cpu-smoke; a reduced one on CPU exercises the cast only)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole check: no build starts with less than "
        f"{BUILD_RESERVE_S}s of it left (default 270 on CUDA, no limit "
        "with --cpu-smoke)",
    )
    parser.add_argument(
        "--no-serve",
        action="store_true",
        help="skip the serving part (Kiln's engine and a burst of requests)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"requests per burst (default {SERVE_REQUESTS} on CUDA, "
        f"{SMOKE_REQUESTS} with --cpu-smoke)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"requests in flight (default {SERVE_CONCURRENCY} on CUDA, "
        f"{SMOKE_CONCURRENCY} with --cpu-smoke)",
    )
    parser.add_argument(
        "--serve-budget-s",
        type=float,
        default=None,
        help="seconds for the serving part, engine starts included (default "
        f"{SERVE_BUDGET_S:.0f} on CUDA, {SMOKE_BUDGET_S:.0f} with "
        "--cpu-smoke; never more than --budget-s leaves)",
    )
    args = parser.parse_args(argv)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(NO_CUDA)
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"digits", "minilm"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}: use digits, minilm")
    if not (args.carry / "manifest.json").exists():
        print(
            f"{args.carry} has no manifest.json: run bench/prepare_gpu_check.py first",
            file=sys.stderr,
        )
        return 2

    device = "cuda" if cuda else "cpu"
    smoke = device == "cpu"
    if smoke:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as work:
        s = Settings(
            device=device,
            carry=args.carry,
            work=Path(work),
            warmup=args.warmup if args.warmup is not None else (1 if smoke else 20),
            iters=args.iters if args.iters is not None else (3 if smoke else 200),
            budget_s=args.budget_s if args.budget_s is not None else (None if smoke else 270.0),
        )
        precision = args.precision or ("fp32" if smoke else "fp16")
        builders = {"digits": digits_model, "minilm": minilm_model}
        models: list[Model] = []
        errors: list[str] = []
        for name in names:
            print(f"[gpu-check] {name}: extract", file=sys.stderr, flush=True)
            try:
                model = builders[name](s)
            except Exception as exc:  # the other model is still checked
                traceback.print_exc()
                errors.append(f"{name}: extraction failed: {_first_line(exc)}")
                continue
            models.append(model)
            check_model(model, [("inductor", precision)], s)
        serving: dict[str, Any] = {}
        if not args.no_serve and models:
            opts = ServeOptions(
                requests=args.requests or (SMOKE_REQUESTS if smoke else SERVE_REQUESTS),
                concurrency=args.concurrency or (SMOKE_CONCURRENCY if smoke else SERVE_CONCURRENCY),
                budget_s=args.serve_budget_s or (SMOKE_BUDGET_S if smoke else SERVE_BUDGET_S),
            )
            try:
                serving = serve_models(models, precision, s, opts)
            except Exception as exc:  # the build results are still reported
                traceback.print_exc()
                serving = {"skipped": "", "rows": [], "errors": [f"serving: {_first_line(exc)}"]}
        if not smoke:
            for model in models:
                run_variant(model, "tensorrt", "fp16", s)
        total_s = time.perf_counter() - s.started

    doc: dict[str, Any] = {
        "machine": machine(device),
        "command": "python3 bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {
            "warmup": s.warmup,
            "iters": s.iters,
            "batches": list(BATCHES),
            "budget_s": s.budget_s,
            "timing": "device-resident inputs, synchronised "
            "after every call; samples/s = batch / mean latency; speedup = samples/s "
            "over the eager fp32 baseline's at the same batch",
        },
        "total_s": round(total_s, 1),
        "models": {
            m.name: {"extract": m.extract, "variants": [dict(vars(var)) for var in m.variants]}
            for m in models
        },
        "rows": rows(models),
        "errors": errors,
        "serving": serving,
    }
    text = markdown(doc)
    print(text)
    if args.out is not None:
        md, js = output_paths(args.out)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        js.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {md} and {js}", file=sys.stderr)
    failed = [f"{m.name} {v.label}" for m in models for v in m.variants if v.status == "failed"]
    failed += errors
    failed += [
        f"serving {r['model']} {r['variant']}"
        for r in serving.get("rows", [])
        if r.get("status") == "failed"
    ]
    failed += serving.get("errors", [])
    if failed:
        print(f"[gpu-check] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
