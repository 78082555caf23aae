"""`make bench` (serve part): five serving systems, one load generator, the same requests.

Each system serves the same example model (``digits``: one 8x8 image per request; ``minilm``:
one sentence per request) and ``wrk`` (a compiled load generator, Lua body script
``bench/servers/post_bodies.lua``) drives it for ``--duration`` seconds at each concurrency:

- ``naive-fastapi``: FastAPI + uvicorn, eager fp32 PyTorch, one forward per request
  (``bench/servers/naive_fastapi.py``);
- ``naive-same-artifact``: the same thin FastAPI + uvicorn server, one model call per request,
  serving the very artifact Kiln selected (the one the ``kiln`` system's engine serves, from the
  same KILN_HOME) through the same backend, loaded as the engine loads it
  (``serving.loader.load_version``; ``bench/servers/naive_same_artifact.py``);
- ``litserve-plain``: LitServe as its docs teach, the same eager fp32 model, ``max_batch_size``
  32 and ``fast_queue``, at the best ``batch_timeout`` of 0, 1 and 5 ms (tried at concurrency
  64 first; ``bench/servers/litserve_plain.py``);
- ``kiln-engine``: Kiln's engine (``python -m serving.engine``) called directly with the
  gateway's wire format;
- ``kiln``: the gateway + engine (``kiln serve``), Open Inference Protocol v2 JSON with a key.

The Kiln systems (and ``naive-same-artifact``) serve what ``kiln optimize`` selected in a
private KILN_HOME (prepared here with the real CLI, or ``--reuse-home DIR``). A system that
cannot run (its command missing, its server failing) is skipped with the reason printed; no
number is ever filled in for it. Every row has ``cpu_ms_per_request``: the CPU seconds (user +
system) that all of the system's server processes used during the wrk run (its whole process
tree: for ``kiln`` the gateway/supervisor and every engine's process group with LitServe's
workers; ``bench/cpu.py``), per request answered; never the load generator's. Rows go into
``bench/results.json`` (``serve``; the ``machine`` and ``optimize`` parts are kept) and a table
into ``bench/results.md``.

More sections, each with its own table: ``gateway-overhead`` times the gateway against the
very engine worker it routes to, reached over the same channel the gateway uses, in
alternating pairs of concurrency-1 runs (``gateway_overhead`` in results.json);
``log-overhead`` measures the inference log's cost: the gateway's p99 with
``KILN_INFERENCE_LOG_SAMPLE`` 1 against 0, medians of ``--log-runs`` alternating runs
(``log_overhead``); ``idle`` measures what ``kiln serve`` with digits deployed costs with no
traffic at all: the CPU of its whole process tree over ``--idle-seconds`` (30), in percent of
one core (``idle``; run first, while digits is the only model deployed in the KILN_HOME).

Not run by default: ``profile`` (``--sections profile --models digits``; needs py-spy, ``make
bench-deps``) puts wrk at 64 connections on ``kiln`` for digits and records the gateway process
and the engine (its root process and its LitServe workers: ``py-spy record --subprocesses``)
with py-spy (``--idle --native``) for the run: flame graphs
``profiles/{gateway,engine}-digits.svg``, then, in a second run as long, their collapsed stacks
``profiles/{gateway,engine}-digits.txt`` and ``profiles/summary.md``: per process, the
functions with the largest inclusive and self shares of the samples, idle waits (epoll, poll,
read, sleeps, lock waits) marked (``bench/pyspy.py``; ``--profile-duration``,
``--profile-rate``; the folder is under ``--out``).

    python bench/serve_bench.py [--duration 20] [--concurrency 1,16,64] [--models digits,minilm]
                                [--systems naive-fastapi,naive-same-artifact,litserve-plain,
                                           kiln-engine,kiln]
                                [--sections serve,gateway-overhead,log-overhead,idle]
                                [--reuse-home DIR] [--out bench]
    python bench/serve_bench.py --sections profile --models digits --reuse-home DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench.cpu (and kiln) from this checkout
    sys.path.insert(0, str(ROOT))

from bench import pyspy
from bench.cpu import CpuUse, TreeCpu, tree
from kiln import processes

SERVERS = ROOT / "bench" / "servers"
LUA = SERVERS / "post_bodies.lua"
PY = sys.executable
KILN = str(Path(PY).with_name("kiln"))
SYSTEMS = ("naive-fastapi", "naive-same-artifact", "litserve-plain", "kiln-engine", "kiln")
BATCH_TIMEOUTS = (0.0, 0.001, 0.005)
TUNE_CONCURRENCY = 64
N_BODIES = 64  # distinct requests each system cycles through (the same ones for every system)
READY_TIMEOUT_S = 300.0
SERVE_MARKER = "<!-- serve-bench -->"
SECTIONS = ("serve", "gateway-overhead", "log-overhead", "idle", "profile")
DEFAULT_SECTIONS = ("serve", "gateway-overhead", "log-overhead", "idle")


@dataclass(frozen=True)
class ExampleModel:
    """An example model from ``dvc repro``: what to upload and what to send."""

    source: str  # .pt2 or kiln.yaml folder, relative to ROOT
    dataset: str  # uploaded with it (the optimize gates' data)
    requests: str  # .npz whose ``inputs`` the requests are made of


MODELS = {
    "digits": ExampleModel("data/digits/model.pt2", "data/digits/val.npz", "data/digits/test.npz"),
    "minilm": ExampleModel(
        "data/minilm/model", "data/minilm/sentences.npz", "data/minilm/sentences.npz"
    ),
}


class Skip(Exception):
    """A system that cannot be measured here; the message says why (printed, never faked)."""


@dataclass
class KilnModel:
    """A model as the prepared KILN_HOME holds it."""

    version: str
    status: str
    input_name: str  # the tensor a request carries: the text input or the first spec input
    selected: str  # backend/precision the engine serves


@dataclass
class Target:
    """A running server under test: where wrk sends what, and whose memory and CPU to count."""

    url: str
    bodies: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    memory: Callable[[], dict[str, float]] = dict
    info: dict[str, Any] = field(default_factory=dict)  # extra keys for the rows
    # the server's root process: its whole tree (kiln: the gateway, the engines it started, their
    # workers) is what the CPU columns count; None: no CPU figures (a target inside another)
    pid: int | None = None
    # the CPU of a run split into the system's parts (kiln: gateway, this model's engine, ...)
    cpu_parts: Callable[[CpuUse], dict[str, Any]] | None = None


# ------------------------------------------------------------------------------ requests
def samples(model: str, n: int = N_BODIES) -> list[Any]:
    """The first ``n`` inputs of the model's request set: 1x8x8 float32 images or sentences."""
    inputs = np.load(ROOT / MODELS[model].requests, allow_pickle=False)["inputs"][:n]
    return [str(s) for s in inputs] if model == "minilm" else list(inputs)


def plain_body(model: str, sample: Any) -> dict[str, Any]:
    """The naive/LitServe body, as a user designs it: nested lists or the text."""
    return {"text": sample} if model == "minilm" else {"inputs": sample[None].tolist()}


def engine_body(model: str, km: KilnModel, sample: Any) -> dict[str, Any]:
    """A :mod:`serving.wire` request, as the gateway sends it to the engine."""
    if model == "minilm":
        tensor = {"name": km.input_name, "datatype": "BYTES", "shape": [1], "data": [sample]}
    else:
        from serving.wire import encode_tensor

        tensor = encode_tensor(km.input_name, np.ascontiguousarray(sample[None]))
    return {
        "model": model,
        "version": km.version,
        "deadline": None,
        "inputs": [tensor],
        "outputs": None,
    }


def oip_body(model: str, km: KilnModel, sample: Any) -> dict[str, Any]:
    """An Open Inference Protocol v2 JSON request, as a KServe/Triton client sends it."""
    if model == "minilm":
        tensor = {"name": km.input_name, "datatype": "BYTES", "shape": [1], "data": [sample]}
    else:
        x = sample[None]
        tensor = {
            "name": km.input_name,
            "datatype": "FP32",
            "shape": list(x.shape),
            "data": x.reshape(-1).tolist(),
        }
    return {"inputs": [tensor]}


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A server in its own process group (stopped as a group), logging to ``log``."""
    return processes.start_group(command, cwd=ROOT, env={**os.environ, **(env or {})}, log_path=log)


def family(root: int) -> list[psutil.Process]:
    """``root``'s process tree (:func:`bench.cpu.tree`): its process group, every descendant
    and the groups they lead (engines the supervisor starts live in groups of their own, their
    LitServe workers in the engine's). The same processes the CPU columns count."""
    found = []
    for proc in tree(root):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(proc.pid))
    return [p for p in found if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return round(total / 2**20, 1)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop the server's group (SIGTERM, then SIGKILL after ``timeout``), then SIGKILL the
    groups of its descendants that live in their own (engines the supervisor left behind)."""
    others = [p for p in family(proc.pid) if _pgid(p.pid) not in (None, proc.pid)]
    deadline = time.monotonic() + timeout
    processes.stop_group(proc, timeout_s=timeout)
    while time.monotonic() < deadline and any(map(_alive, others)):
        time.sleep(0.2)
    for p in others:
        if _alive(p):
            group = _pgid(p.pid)
            if group is not None:
                processes.signal_group(group, signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    log: Path,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> None:
    """Until ``GET url`` answers 200; Skip if the server exits or takes longer than ``timeout``."""
    try:
        processes.wait_ready(
            proc, processes.http_ok(url, headers=headers), timeout_s=timeout, what=url
        )
    except processes.ExitedEarly as exc:
        raise Skip(
            f"server exited with {exc.returncode} before it was ready: {tail(log)}"
        ) from None
    except processes.ReadyTimeout:
        raise Skip(f"not ready within {timeout:.0f} s ({url}): {tail(log)}") from None


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


def check_answers(target: Target, count: int = 8) -> None:
    """One request for each of the first ``count`` bodies: every one must be a 2xx."""
    for body in target.bodies[:count]:
        try:
            resp = httpx.post(
                target.url,
                content=body,
                timeout=120.0,
                headers={"Content-Type": "application/json", **target.headers},
            )
        except httpx.TransportError as exc:
            raise Skip(f"a request failed: {exc!r}") from None
        if resp.status_code // 100 != 2:
            raise Skip(f"a request was answered {resp.status_code}: {resp.text[:300]}")


def drain(target: Target) -> None:
    """Wait out the requests wrk left in flight when it stopped (a batching server still runs
    them): one fresh request answered means the queue before it is done."""
    check_answers(target, count=1)


# ----------------------------------------------------------------------------------- wrk
def run_wrk(
    target: Target, *, connections: int, duration: float, threads: int, workdir: Path
) -> dict[str, Any]:
    """One wrk run; returns the script's JSON (requests, errors, latency in microseconds)."""
    bodies = workdir / "bodies.jsonl"
    bodies.write_text("\n".join(target.bodies) + "\n")
    command = [
        "wrk",
        "-t",
        str(max(1, min(threads, connections))),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
    ]
    for name, value in target.headers.items():
        command += ["-H", f"{name}: {value}"]
    command += [target.url, "--", str(bodies)]
    meter = TreeCpu(target.pid) if target.pid is not None else None
    if meter is not None:
        meter.start()
    proc = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=duration + 60
    )
    cpu = meter.stop() if meter is not None else None  # before the drain: wrk's run only
    drain(target)
    for line in proc.stdout.splitlines():
        if line.startswith("KILN_WRK "):
            doc: dict[str, Any] = json.loads(line.removeprefix("KILN_WRK "))
            if cpu is not None:
                doc["cpu"] = cpu
                if target.cpu_parts is not None:
                    doc["cpu_parts"] = target.cpu_parts(cpu)
            return doc
    raise Skip(f"wrk printed no result (exit {proc.returncode}): {proc.stderr.strip()[:300]}")


def to_row(system: str, model: str, connections: int, doc: dict[str, Any]) -> dict[str, Any]:
    seconds = doc["duration_us"] / 1e6
    ok = doc["requests"] - doc["errors"]["status"]
    lat = doc["latency_us"]
    row = {
        "system": system,
        "model": model,
        "concurrency": connections,
        "rps": round(ok / seconds, 1) if seconds else 0.0,
        "p50_ms": round(lat["p50"] / 1000, 3),
        "p99_ms": round(lat["p99"] / 1000, 3),
        "errors": doc["error_total"],
        "requests": doc["requests"],
        "p90_ms": round(lat["p90"] / 1000, 3),
        "p999_ms": round(lat["p999"] / 1000, 3),
        "duration_s": round(seconds, 2),
        "error_kinds": doc["errors"],
    }
    cpu: CpuUse | None = doc.get("cpu")
    if cpu is not None:  # the server's whole process tree over the wrk run, per answer below 400
        row |= {
            "cpu_ms_per_request": cpu.ms_per_request(ok),
            "cpu_s": round(cpu.seconds, 3),
            "cpu_cores": round(cpu.seconds / cpu.wall_s, 2) if cpu.wall_s else None,
            "cpu_processes": cpu.processes,
        }
        for part, seconds_used in doc.get("cpu_parts", {}).items():
            row[f"cpu_{part}_ms_per_request"] = (
                round(seconds_used * 1000 / ok, 3) if ok > 0 else None
            )
    return row


# ------------------------------------------------------------------------------- systems
def group_memory(proc: subprocess.Popen[bytes]) -> Callable[[], dict[str, float]]:
    return lambda: {"rss_mb": rss_mb(family(proc.pid))}


@contextmanager
def plain_server(
    proc: subprocess.Popen[bytes],
    port: int,
    log: Path,
    model: str,
    ctx: Bench,
    info: dict[str, Any] | None = None,
) -> Iterator[Target]:
    """A started server of the plain ``/predict`` bodies (naive, LitServe) as a Target, once
    its ``/health`` answers; stopped afterwards."""
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
        yield Target(
            f"http://127.0.0.1:{port}/predict",
            [dumps(plain_body(model, s)) for s in ctx.samples[model]],
            memory=group_memory(proc),
            info=info or {},
            pid=proc.pid,
        )
    finally:
        stop(proc)


@contextmanager
def naive_fastapi(model: str, ctx: Bench) -> Iterator[Target]:
    port, log = free_port(), ctx.log("naive-fastapi", model)
    proc = spawn(
        [
            PY,
            str(SERVERS / "naive_fastapi.py"),
            "--model",
            model,
            "--path",
            str(ROOT / MODELS[model].source),
            "--port",
            str(port),
        ],
        log,
    )
    with plain_server(proc, port, log, model, ctx) as target:
        yield target


@contextmanager
def naive_same_artifact(model: str, ctx: Bench) -> Iterator[Target]:
    """The naive server on the artifact the ``kiln`` system serves (the same KILN_HOME)."""
    km = ctx.kiln_model(model)
    port, log = free_port(), ctx.log("naive-same-artifact", model)
    proc = spawn(
        [
            PY,
            str(SERVERS / "naive_same_artifact.py"),
            "--model",
            model,
            "--version",
            km.version,
            "--port",
            str(port),
        ],
        log,
        env=ctx.kiln_env(),
    )
    with plain_server(
        proc, port, log, model, ctx, {"served": km.selected, "version": km.version}
    ) as target:
        yield target


@contextmanager
def litserve_plain(model: str, ctx: Bench, batch_timeout: float) -> Iterator[Target]:
    port, log = free_port(), ctx.log(f"litserve-plain-{batch_timeout}", model)
    proc = spawn(
        [
            PY,
            str(SERVERS / "litserve_plain.py"),
            "--model",
            model,
            "--path",
            str(ROOT / MODELS[model].source),
            "--port",
            str(port),
            "--max-batch-size",
            "32",
            "--batch-timeout",
            str(batch_timeout),
        ],
        log,
    )
    info = {"batch_timeout_s": batch_timeout, "max_batch_size": 32}
    with plain_server(proc, port, log, model, ctx, info) as target:
        yield target


@contextmanager
def kiln_engine(model: str, ctx: Bench) -> Iterator[Target]:
    km = ctx.kiln_model(model)
    port, log = free_port(), ctx.log("kiln-engine", model)
    proc = spawn(
        [
            PY,
            "-m",
            "serving.engine",
            "--model",
            model,
            "--version",
            km.version,
            "--port",
            str(port),
        ],
        log,
        env=ctx.kiln_env(),
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
        yield Target(
            f"http://127.0.0.1:{port}/predict",
            [dumps(engine_body(model, km, s)) for s in ctx.samples[model]],
            memory=lambda: {
                "rss_mb": rss_mb(family(proc.pid)),
                "rss_engine_mb": rss_mb(family(proc.pid)),
            },
            info={"served": km.selected, "version": km.version},
            pid=proc.pid,
        )
    finally:
        stop(proc)


@contextmanager
def kiln_gateway(model: str, ctx: Bench) -> Iterator[Target]:
    km = ctx.kiln_model(model)
    key = ctx.kiln_key()
    port, log = free_port(), ctx.log("kiln", model)
    env = {**ctx.kiln_env(), "KILN_GATEWAY_PORT": str(port)}
    proc = spawn([KILN, "serve", "--port", str(port)], log, env=env)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        wait_ready(proc, f"{base}/v2/health/live", log)
        kiln_cli(
            [
                "deploy",
                model,
                "--strategy",
                "direct",
                "--wait",
                str(int(READY_TIMEOUT_S)),
                "--json",
            ],
            env,
        )
        wait_ready(proc, f"{base}/v2/models/{model}/ready", log, headers=auth)

        def memory() -> dict[str, float]:
            gateway = [p for p in family(proc.pid) if _pgid(p.pid) == proc.pid]
            engines = [p for p in family(proc.pid) if _pgid(p.pid) != proc.pid]
            mine = [p for p in engines if _serves(p, model)]
            return {
                "rss_mb": round(rss_mb(gateway) + rss_mb(mine), 1),
                "rss_gateway_mb": rss_mb(gateway),
                "rss_engine_mb": rss_mb(mine),
                "rss_all_engines_mb": rss_mb(engines),
                "engine_replicas": len({_pgid(p.pid) for p in mine} - {None}),
            }

        def cpu_parts(use: CpuUse) -> dict[str, float]:
            """The gateway's group, this model's engines, any other model's engines."""
            parts = {"gateway": 0.0, "engine": 0.0, "other_engines": 0.0}
            for group, seconds in use.by_group().items():
                if group == proc.pid:
                    parts["gateway"] += seconds
                elif _leads_engine_of(group, model):
                    parts["engine"] += seconds
                else:
                    parts["other_engines"] += seconds
            return parts

        yield Target(
            f"{base}/v2/models/{model}/infer",
            [dumps(oip_body(model, km, s)) for s in ctx.samples[model]],
            headers=auth,
            memory=memory,
            info={"served": km.selected, "version": km.version},
            pid=proc.pid,
            cpu_parts=cpu_parts,
        )
    finally:
        stop(proc)


def _serves(proc: psutil.Process, model: str) -> bool:
    """Whether ``proc`` belongs to an engine of ``model`` (its group leader's command line)."""
    try:
        return _leads_engine_of(os.getpgid(proc.pid), model)
    except ProcessLookupError:
        return False


def _leads_engine_of(pid: int, model: str) -> bool:
    """Whether process ``pid`` is an engine serving ``model`` (by its command line)."""
    try:
        args = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "--model" in args and args[args.index("--model") + 1 :][:1] == [model]


# ----------------------------------------------------------------------------- Kiln home
def kiln_cli(args: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """``kiln ARGS`` (with ``--json``): its one JSON document; Skip with its stderr on failure."""
    proc = subprocess.run(
        [KILN, *args],
        check=False,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise Skip(
            f"`kiln {' '.join(args)}` failed ({proc.returncode}): "
            f"{proc.stderr.strip()[-400:] or proc.stdout.strip()[-400:]}"
        )
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def has_command(command: list[str]) -> str | None:
    """None when ``command --help`` works, else why not."""
    try:
        proc = subprocess.run(
            [*command, "--help"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(command)}` cannot run: {exc}"
    if proc.returncode != 0:
        lines = [ln.strip(" │╭╮╰╯─") for ln in (proc.stderr or proc.stdout).splitlines()]
        lines = [ln for ln in lines if ln and ln != "Error"]
        why = next(
            (ln for ln in lines if "No such" in ln or "No module" in ln),
            lines[-1] if lines else f"exit {proc.returncode}",
        )
        return f"`{' '.join(command)}` is not available yet: {why}"
    return None


class Bench:
    """One run: shared samples, logs, and the Kiln home (prepared once, on first use)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, home: Path | None = None) -> None:
        self.args = args
        self.workdir = workdir
        self.samples = {m: samples(m) for m in args.models}
        self.home: Path | None = home or args.reuse_home
        self._kiln_models: dict[str, KilnModel] = {}
        self._key: str | None = None
        self._home_error: str | None = None

    def log(self, system: str, model: str) -> Path:
        return self.workdir / f"{system}-{model}.log"

    def kiln_env(self) -> dict[str, str]:
        if self.home is None:
            self.home = self.workdir / "kiln-home"
        self.home.mkdir(parents=True, exist_ok=True)
        return {"KILN_HOME": str(self.home)}

    def kiln_model(self, model: str) -> KilnModel:
        """The model uploaded and optimized in the home (done here unless already there)."""
        if self._home_error:
            raise Skip(self._home_error)
        if model in self._kiln_models:
            return self._kiln_models[model]
        env = self.kiln_env()
        data = MODELS[model]
        try:
            try:
                doc = kiln_cli(["show", model, "--json"], env)
            except Skip:
                print(f"[serve] kiln upload {model} (KILN_HOME={self.home})", file=sys.stderr)
                kiln_cli(
                    [
                        "upload",
                        model,
                        str(ROOT / data.source),
                        "--dataset",
                        str(ROOT / data.dataset),
                        "--json",
                    ],
                    env,
                )
                doc = kiln_cli(["show", model, "--json"], env)
            if doc["status"] == "uploaded":
                print(
                    f"[serve] kiln optimize {model}@{doc['version']} (minilm takes minutes)",
                    file=sys.stderr,
                )
                kiln_cli(["optimize", f"{model}@{doc['version']}", "--json"], env)
                doc = kiln_cli(["show", f"{model}@{doc['version']}", "--json"], env)
        except Skip as exc:
            self._home_error = f"preparing KILN_HOME failed: {exc}"
            raise Skip(self._home_error) from None
        if doc["status"] in ("uploaded", "optimizing", "rejected"):
            raise Skip(f"{model}@{doc['version']} is {doc['status']} in {self.home}, not servable")
        spec = doc["spec"]
        pre = spec.get("preprocess") or {}
        selected = next(
            (f"{a['backend']}/{a['precision']}" for a in doc["artifacts"] if a["selected"]), "?"
        )
        km = KilnModel(
            version=doc["version"],
            status=doc["status"],
            input_name=pre.get("text_input") or spec["inputs"][0]["name"],
            selected=selected,
        )
        print(
            f"[serve] {model}@{km.version} in KILN_HOME: {km.status}, serves {selected}",
            file=sys.stderr,
        )
        self._kiln_models[model] = km
        return km

    def kiln_key(self) -> str:
        if self._key is None:
            self._key = str(
                kiln_cli(["keys", "create", "--scope", "infer", "--json"], self.kiln_env())["key"]
            )
        return self._key


# ---------------------------------------------------------------------------------- runs
def measure(system: str, model: str, target: Target, ctx: Bench) -> list[dict[str, Any]]:
    """Warm up, then one wrk run per concurrency; memory is read after the last one."""
    check_answers(target)
    args = ctx.args
    if args.warmup > 0:
        run_wrk(
            target,
            connections=min(16, max(args.concurrency)),
            duration=args.warmup,
            threads=args.threads,
            workdir=ctx.workdir,
        )
    rows = []
    for connections in args.concurrency:
        doc = run_wrk(
            target,
            connections=connections,
            duration=args.duration,
            threads=args.threads,
            workdir=ctx.workdir,
        )
        row = {**to_row(system, model, connections, doc), **target.info}
        cpu = row.get("cpu_ms_per_request")
        print(
            f"[serve] {system:19} {model:7} c={connections:<3} {row['rps']:9.1f} rps  "
            f"p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
            f"errors {row['errors']}  CPU {'-' if cpu is None else f'{cpu:.3f}'} ms/req "
            f"({row.get('cpu_processes', '-')} processes)",
            file=sys.stderr,
        )
        rows.append(row)
    memory = target.memory()
    for row in rows:
        row.update(memory)
    return rows


def run_litserve(model: str, ctx: Bench) -> list[dict[str, Any]]:
    """Try each batch timeout at concurrency 64, keep the best, then measure with it."""
    tuning: dict[str, float] = {}
    for timeout in ctx.args.batch_timeouts:
        try:
            with litserve_plain(model, ctx, timeout) as target:
                check_answers(target)
                run_wrk(
                    target,
                    connections=TUNE_CONCURRENCY,
                    duration=1,
                    threads=ctx.args.threads,
                    workdir=ctx.workdir,
                )
                doc = run_wrk(
                    target,
                    connections=TUNE_CONCURRENCY,
                    duration=ctx.args.tune_duration,
                    threads=ctx.args.threads,
                    workdir=ctx.workdir,
                )
        except Skip as exc:
            print(f"[serve] litserve-plain {model} batch_timeout {timeout}: {exc}", file=sys.stderr)
            continue
        trial = to_row("litserve-plain", model, TUNE_CONCURRENCY, doc)
        tuning[str(timeout)] = trial["rps"]
        print(
            f"[serve] litserve-plain {model} batch_timeout {timeout * 1000:g} ms: "
            f"{trial['rps']} rps at c={TUNE_CONCURRENCY}, p50 {trial['p50_ms']} ms, "
            f"errors {trial['errors']}",
            file=sys.stderr,
        )
    if not tuning:
        raise Skip("no batch timeout got a LitServe server running (logs in the work dir)")
    best = float(max(tuning, key=lambda t: tuning[t]))
    with litserve_plain(model, ctx, best) as target:
        target.info["tuning_rps"] = tuning
        return measure("litserve-plain", model, target, ctx)


def availability(systems: list[str]) -> dict[str, str]:
    """Why each unavailable system is skipped (checked once, before anything runs)."""
    missing: dict[str, str] = {}
    if shutil.which("wrk") is None:
        return {s: "wrk is not installed: run `make bench-deps`" for s in systems}
    if "kiln-engine" in systems and (why := has_command([PY, "-m", "serving.engine"])):
        missing["kiln-engine"] = why
    if "kiln" in systems:
        for sub in (["serve"], ["deploy"], ["keys", "create"]):
            if why := has_command([KILN, *sub]):
                missing["kiln"] = why
                break
    return missing


def run(
    args: argparse.Namespace, home: Path | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    missing = availability(args.systems)
    for system, why in missing.items():
        print(f"[serve] skipping {system}: {why}", file=sys.stderr)
        skipped.append({"system": system, "model": "*", "reason": why})
    with tempfile.TemporaryDirectory(prefix="kiln-serve-bench-") as tmp:
        ctx = Bench(args, Path(tmp), home)
        for model in args.models:
            for system in args.systems:
                if system in missing:
                    continue
                print(f"[serve] {system} / {model}", file=sys.stderr)
                try:
                    if system == "litserve-plain":
                        rows += run_litserve(model, ctx)
                    else:
                        starter = {
                            "naive-fastapi": naive_fastapi,
                            "naive-same-artifact": naive_same_artifact,
                            "kiln-engine": kiln_engine,
                            "kiln": kiln_gateway,
                        }[system]
                        with starter(model, ctx) as target:
                            rows += measure(system, model, target, ctx)
                except Skip as exc:
                    print(f"[serve] skipping {system} / {model}: {exc}", file=sys.stderr)
                    skipped.append({"system": system, "model": model, "reason": str(exc)})
        if args.keep_logs:
            shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True)
    return rows, skipped


# ------------------------------------------------------------------ inference-log overhead
# The inference log's budget: logging at a 100% sample under load raises the gateway's p99 by at most
# 10% against logging off, each the median of alternating runs. Two gateways on the same
# KILN_HOME serve digits side by side (KILN_INFERENCE_LOG_SAMPLE 0 and 1), and the runs
# alternate between them (0, 1, 0, 1, ...), so drift in the machine's load hits both alike.
LOG_MARKER = "<!-- log-overhead -->"
LOG_SAMPLES = (0.0, 1.0)
LOG_MAX_RATIO = 1.10


@contextmanager
def sampled_gateway(ctx: Bench, sample: float) -> Iterator[Target]:
    """``kiln serve`` logging ``sample`` of its requests (digits already deployed)."""
    km = ctx.kiln_model("digits")
    port, log = free_port(), ctx.log(f"kiln-log-{sample:g}", "digits")
    env = {
        **ctx.kiln_env(),
        "KILN_GATEWAY_PORT": str(port),
        "KILN_INFERENCE_LOG_SAMPLE": str(sample),
    }
    proc = spawn([KILN, "serve", "--port", str(port)], log, env=env)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {ctx.kiln_key()}"}
    try:
        wait_ready(proc, f"{base}/v2/models/digits/ready", log, headers=auth)
        yield Target(
            f"{base}/v2/models/digits/infer",
            [dumps(oip_body("digits", km, s)) for s in ctx.samples["digits"]],
            headers=auth,
            info={"metrics": f"{base}/metrics", "sample": sample},
        )
    finally:
        stop(proc)


async def _closed_loop(target: Target, connections: int, duration: float) -> dict[str, Any]:
    """A closed-loop generator (each connection sends its next request when answered), for
    hosts without wrk; latencies are measured per request, percentiles over all of them."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json", **target.headers}
    stop_at = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        n = index
        while time.perf_counter() < stop_at:
            body = target.bodies[n % len(target.bodies)]
            started = time.perf_counter()
            try:
                async with session.post(target.url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += 0 if ok else 1
            n += connections

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(connections)))
    seconds = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {
        "rps": round((len(lat) - errors) / seconds, 1),
        "requests": len(lat),
        "errors": errors,
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "duration_s": round(seconds, 2),
    }


def load_run(target: Target, ctx: Bench, connections: int, duration: float) -> dict[str, Any]:
    """One measured run: wrk where installed, else the closed-loop Python generator."""
    if shutil.which("wrk") is not None:
        doc = run_wrk(
            target,
            connections=connections,
            duration=duration,
            threads=ctx.args.threads,
            workdir=ctx.workdir,
        )
        row = to_row("kiln", "digits", connections, doc)
        return {k: row[k] for k in ("rps", "requests", "errors", "p50_ms", "p99_ms", "duration_s")}
    row = asyncio.run(_closed_loop(target, connections, duration))
    drain(target)
    return row


def log_counts(target: Target) -> dict[str, float]:
    """The gateway's inference-log counters: records written, dropped (any reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(target.info["metrics"], headers=target.headers, timeout=15).text
    counts = {"logged": 0.0, "dropped": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "kiln_inference_log_records_total":
                counts["logged"] += s.value
            elif s.name == "kiln_inference_log_dropped_total":
                counts["dropped"] += s.value
    return counts


def settle(target: Target, timeout: float = 60.0) -> float:
    """Wait until the gateway's inference log has written what the last run sampled (queue
    empty, records counter still for 0.5 s), so no run pays for the one before it; seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    started = time.monotonic()
    last: float | None = None
    while time.monotonic() - started < timeout:
        text = httpx.get(target.info["metrics"], headers=target.headers, timeout=15).text
        depth, counts = 0.0, log_counts(target)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "kiln_inference_log_queue_depth":
                    depth += s.value
        total = counts["logged"] + counts["dropped"]
        if depth == 0 and total == last:
            break
        last = total
        time.sleep(0.5)
    return time.monotonic() - started


def run_log_overhead(ctx: Bench) -> dict[str, Any]:
    """Alternating runs against the two gateways; medians of p99 and their ratio."""
    args = ctx.args
    connections, duration = args.log_concurrency, args.log_duration or args.duration
    ctx.samples.setdefault("digits", samples("digits"))
    ctx.kiln_model("digits")
    kiln_cli(["deploy", "digits", "--strategy", "direct", "--wait", "0", "--json"], ctx.kiln_env())
    runs: dict[str, list[dict[str, Any]]] = {f"{s:g}": [] for s in LOG_SAMPLES}
    with sampled_gateway(ctx, LOG_SAMPLES[0]) as off, sampled_gateway(ctx, LOG_SAMPLES[1]) as on:
        targets = {f"{LOG_SAMPLES[0]:g}": off, f"{LOG_SAMPLES[1]:g}": on}
        for target in targets.values():
            check_answers(target)
            if args.warmup > 0:
                load_run(target, ctx, connections, args.warmup)
        for index in range(args.log_runs):
            for key, target in targets.items():
                row = load_run(target, ctx, connections, duration)
                row["settle_s"] = round(settle(target), 2)
                runs[key].append(row)
                print(
                    f"[log-overhead] run {index + 1} sample {key}: {row['rps']:.1f} rps  "
                    f"p99 {row['p99_ms']:.3f} ms  errors {row['errors']}  log settled in "
                    f"{row['settle_s']:.1f} s",
                    file=sys.stderr,
                )
        counts = {key: log_counts(t) for key, t in targets.items()}
    medians = {key: float(np.median([r["p99_ms"] for r in rows])) for key, rows in runs.items()}
    off_p99, on_p99 = medians[f"{LOG_SAMPLES[0]:g}"], medians[f"{LOG_SAMPLES[1]:g}"]
    ratio = on_p99 / off_p99 if off_p99 > 0 else float("nan")
    return {
        "model": "digits",
        "concurrency": connections,
        "duration_s": duration,
        "runs_each": args.log_runs,
        "generator": "wrk" if shutil.which("wrk") else "python-aiohttp (wrk not installed)",
        "p99_ms": {k: [r["p99_ms"] for r in rows] for k, rows in runs.items()},
        "rps": {k: [r["rps"] for r in rows] for k, rows in runs.items()},
        "settle_s": {k: [r["settle_s"] for r in rows] for k, rows in runs.items()},
        "errors": {k: sum(r["errors"] for r in rows) for k, rows in runs.items()},
        "median_p99_ms": medians,
        "p99_ratio": round(ratio, 4),
        "max_ratio": LOG_MAX_RATIO,
        "passed": bool(ratio <= LOG_MAX_RATIO),
        "log_counters": counts,
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def log_markdown(doc: dict[str, Any]) -> str:
    lines = [
        LOG_MARKER,
        "## Inference-log overhead",
        "",
        f"digits through `kiln serve`, {doc['concurrency']} connections, "
        f"{doc['runs_each']} alternating runs of {doc['duration_s']:g} s per sample "
        f"({doc['generator']}; {doc['at']}). Acceptance: median p99 at sample 1 <= "
        f"{doc['max_ratio']:g} x median p99 at sample 0.",
        "",
        "| sample | p99 ms per run | median p99 ms | req/s per run | errors | logged | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in doc["p99_ms"]:
        counts = doc["log_counters"][key]
        lines.append(
            f"| {key} | {', '.join(f'{v:.2f}' for v in doc['p99_ms'][key])} | "
            f"{doc['median_p99_ms'][key]:.2f} | "
            f"{', '.join(f'{v:.0f}' for v in doc['rps'][key])} | "
            f"{doc['errors'][key]} | {counts['logged']:.0f} | "
            f"{counts['dropped']:.0f} |"
        )
    settled = max(v for values in doc.get("settle_s", {"": [0.0]}).values() for v in values)
    lines.append(
        f"\nEach run started once the previous one's log was written (its queue "
        f"empty, its counters still; at most {settled:.1f} s after a run)."
    )
    verdict = "passed" if doc["passed"] else "FAILED"
    lines.append(f"\np99 ratio (sample 1 / sample 0): **{doc['p99_ratio']:.3f}** ({verdict}).")
    return "\n".join(lines) + "\n"


def write_section(out: Path, key: str, doc: Any, marker: str, table: str) -> None:
    """``doc`` into results.json under ``key`` and ``table`` (which starts with ``marker``) into
    results.md in place of that section's previous table; the other parts are kept."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = doc
    path.write_text(json.dumps(results, indent=2) + "\n")
    md = out / "results.md"
    text = md.read_text() if md.exists() else "# Kiln benchmark\n"
    if marker in text:
        before, _, after = text.partition(marker)
        rest = after.split("\n<!-- ", 1)
        text = before.rstrip("\n") + ("\n\n<!-- " + rest[1] if len(rest) > 1 else "")
    md.write_text(text.rstrip("\n") + "\n\n" + table)


# ----------------------------------------------------------------------- gateway overhead
# What the gateway adds to a request: judged on pairs, not on the serve table's rows (measured
# minutes apart, on different processes). One `kiln serve` per model, then one connection at a
# time alternating between the gateway's OIP route (HTTP, key checked, OIP JSON parsed, routed,
# answered as OIP JSON) and the very engine worker it routes to, reached the way the gateway
# reaches it: a serving.channel.Channel to one of the endpoints the engine's GET /channel names.
# Both clients run in this process on asyncio streams with the requests built beforehand, the
# order flipped every pair, so both halves of a pair meet the same processes and machine load.
GAP_MARKER = "<!-- gateway-overhead -->"
GAP_TARGET_MS = 0.5


def engines_of(gateway: Target, model: str) -> dict[int, int]:
    """The engines ``gateway``'s supervisor started for ``model``: root pid -> port (found by
    their command lines in the gateway's process tree; an engine leads its process group, and
    LitServe forks children with the same command line into it)."""
    found = {}
    for proc in family(gateway.pid or 0):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        if _pgid(proc.pid) != proc.pid:
            continue
        if "serving.engine" in args and "--port" in args and _serves(proc, model):
            found[proc.pid] = int(args[args.index("--port") + 1])
    return found


def channel_endpoint(gateway: Target, model: str) -> str:
    """A channel endpoint of the one engine ``gateway``'s supervisor started for ``model``."""
    ports = sorted(set(engines_of(gateway, model).values()))
    if len(ports) != 1:
        raise Skip(f"expected one engine serving {model} under the gateway, found ports {ports}")
    endpoints = httpx.get(f"http://127.0.0.1:{ports[0]}/channel", timeout=10).json()["endpoints"]
    if not endpoints:
        raise Skip(f"the engine of {model} names no channel endpoint")
    return str(endpoints[0])


def wire_jobs(model: str, km: KilnModel) -> Callable[[list[Any]], list[Any]]:
    """The jobs the gateway would send for the bench's samples (fresh deadlines per call)."""
    from serving.channel import WireJob

    def tensor(sample: Any) -> np.ndarray:
        if model == "minilm":
            return np.array([sample], dtype=object)  # what serving.oip parses BYTES JSON into
        return np.ascontiguousarray(sample[None])

    def make(samples: list[Any]) -> list[Any]:
        deadline = time.time() + 60
        return [
            WireJob(
                model=model,
                version=km.version,
                deadline=deadline,
                inputs={km.input_name: tensor(s)},
                outputs=None,
                rows=1,
            )
            for s in samples
        ]

    return make


async def _one_at_a_time(call: Callable[[int], Awaitable[None]], duration: float) -> list[float]:
    """``call(i)`` awaited back to back for ``duration`` seconds: each one's latency in s."""
    latencies: list[float] = []
    end = time.perf_counter() + duration
    while True:
        start = time.perf_counter()
        await call(len(latencies))
        done = time.perf_counter()
        latencies.append(done - start)
        if done >= end:
            return latencies


async def _http_c1(target: Target, duration: float) -> list[float]:
    """One keep-alive HTTP/1.1 connection, requests written back to back: latencies in s."""
    url = httpx.URL(target.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    requests = [
        (
            f"POST {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n{head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n"
        ).encode()
        + body.encode()
        for body in target.bodies
    ]

    async def call(index: int) -> None:
        writer.write(requests[index % len(requests)])
        status, _, rest = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in rest.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        if b" 200 " not in status:
            raise RuntimeError(f"gateway answered {status.decode(errors='replace')}")

    try:
        return await _one_at_a_time(call, duration)
    finally:
        writer.close()


async def _channel_c1(endpoint: str, jobs: list[Any], duration: float) -> list[float]:
    """The gateway's own channel client, one job at a time: latencies in s."""
    from serving.channel import Channel

    channel = Channel(endpoint, max_rows=1)

    async def call(index: int) -> None:
        answer = await channel.call(jobs[index % len(jobs)], timeout=10)
        if answer.status != 200:
            raise RuntimeError(f"engine answered {answer.status}: {answer.detail}")

    try:
        return await _one_at_a_time(call, duration)
    finally:
        await channel.close()


def c1_latencies(
    name: str, gateway: Target, endpoint: str, jobs: list[Any], duration: float
) -> list[float]:
    """One c1 run of ``name`` (``gateway`` or ``channel``) for ``duration`` seconds."""
    if name == "gateway":
        return asyncio.run(_http_c1(gateway, duration))
    return asyncio.run(_channel_c1(endpoint, jobs, duration))


def run_gateway_overhead(ctx: Bench) -> dict[str, Any]:
    """Per model: ``--gap-runs`` pairs of c1 runs (gateway, its engine's channel); p50s, gaps."""
    args = ctx.args
    models: dict[str, Any] = {}
    for model in args.models:
        jobs, samples = wire_jobs(model, ctx.kiln_model(model)), ctx.samples[model]
        with kiln_gateway(model, ctx) as gateway:
            endpoint = channel_endpoint(gateway, model)

            for name in ("gateway", "channel"):
                c1_latencies(name, gateway, endpoint, jobs(samples), max(args.warmup, 0.5))
            pairs = []
            for index in range(args.gap_runs):
                order = ("gateway", "channel") if index % 2 == 0 else ("channel", "gateway")
                p50 = {}
                for name in order:
                    run = c1_latencies(name, gateway, endpoint, jobs(samples), args.gap_duration)
                    p50[name] = round(1000 * float(np.median(run)), 3)
                pair = {
                    "first": order[0],
                    "gateway_p50_ms": p50["gateway"],
                    "channel_p50_ms": p50["channel"],
                    "gap_ms": round(p50["gateway"] - p50["channel"], 3),
                }
                print(
                    f"[gateway-overhead] {model} pair {index + 1}: gateway "
                    f"{pair['gateway_p50_ms']:.3f} ms, channel {pair['channel_p50_ms']:.3f} ms, "
                    f"gap {pair['gap_ms']:.3f} ms",
                    file=sys.stderr,
                )
                pairs.append(pair)
        gap = float(np.median([p["gap_ms"] for p in pairs]))
        models[model] = {
            "served": gateway.info["served"],
            "pairs": pairs,
            "median_gateway_p50_ms": round(
                float(np.median([p["gateway_p50_ms"] for p in pairs])), 3
            ),
            "median_channel_p50_ms": round(
                float(np.median([p["channel_p50_ms"] for p in pairs])), 3
            ),
            "median_gap_ms": round(gap, 3),
            "met": bool(gap <= GAP_TARGET_MS),
        }
    return {
        "concurrency": 1,
        "duration_s": args.gap_duration,
        "pairs_each": args.gap_runs,
        "target_ms": GAP_TARGET_MS,
        "models": models,
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def gap_markdown(doc: dict[str, Any]) -> str:
    lines = [
        GAP_MARKER,
        "## Gateway overhead",
        "",
        (
            f"One `kiln serve` per model; one connection, {doc['pairs_each']} pairs of "
            f"{doc['duration_s']:g} s runs alternating between the gateway (HTTP, OIP v2 JSON, "
            "key checked, routed) and the engine worker it routes to, reached as the gateway "
            "reaches it (`serving.channel.Channel`), both from the bench's process on asyncio "
            f"streams, the order flipped every pair ({doc['at']}). Target: median gap <= "
            f"{doc['target_ms']:g} ms."
        ),
        "",
        (
            "| model | served | gateway p50 ms per pair | channel p50 ms per pair | gap ms per "
            "pair | median gap ms | target |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for model, m in doc["models"].items():

        def column(key: str, pairs: list[dict[str, Any]] = m["pairs"]) -> str:
            return ", ".join(f"{p[key]:.2f}" for p in pairs)

        lines.append(
            f"| {model} | {m['served']} | {column('gateway_p50_ms')} | "
            f"{column('channel_p50_ms')} | {column('gap_ms')} | "
            f"**{m['median_gap_ms']:.2f}** | {'met' if m['met'] else 'missed'} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- idle
# What serving costs with nothing to serve: `kiln serve` with digits deployed (the only model),
# ready, then no request at all for --idle-seconds; the CPU of its whole process tree (gateway
# and supervisor, the engine and its LitServe workers) over that window.
IDLE_MARKER = "<!-- idle -->"
IDLE_SETTLE_S = 5.0  # after the model answered ready, before the window opens


def digits_only_home(home: Path) -> Path:
    """``home`` when no model but digits is deployed there (``kiln serve`` would start every
    deployed model's engines, and there is no undeploy), else a home of its own beside it
    (``HOME-idle``: prepared once, kept with ``--reuse-home``)."""
    env = {"KILN_HOME": str(home), "KILN_GATEWAY_PORT": str(free_port())}  # no gateway there
    home.mkdir(parents=True, exist_ok=True)
    deployed = {m["name"] for m in kiln_cli(["status", "--json"], env)["models"]}
    if deployed <= {"digits"}:
        return home
    own = home.with_name(f"{home.name}-idle")
    print(
        f"[idle] {home} also serves {', '.join(sorted(deployed - {'digits'}))}: digits alone in "
        f"{own}",
        file=sys.stderr,
    )
    return own


def roles(use: CpuUse, root: int) -> list[dict[str, Any]]:
    """Each process of a measured tree, most CPU first: its role, command line, CPU."""
    rows = []
    for pid, seconds in sorted(use.by_pid.items(), key=lambda kv: -kv[1]):
        group = use.pgid[pid]
        role = (
            "gateway"
            if pid == root
            else "gateway's child"
            if group == root
            else "engine"
            if pid == group
            else "engine's child"
        )
        try:  # programs in a bin folder (the venv's python, kiln) by their names
            args = psutil.Process(pid).cmdline()
            command = " ".join(
                Path(a).name if a.startswith("/") and Path(a).parent.name == "bin" else a
                for a in args
            )
        except psutil.Error:
            command = "(exited)"
        rows.append(
            {
                "pid": pid,
                "role": role,
                "command": command[:120],
                "cpu_s": round(seconds, 3),
                "cpu_percent_of_one_core": round(100 * seconds / use.wall_s, 2),
            }
        )
    return rows


def run_idle(ctx: Bench) -> dict[str, Any]:
    """``kiln serve`` with digits deployed and ready, then no traffic for ``--idle-seconds``."""
    args = ctx.args
    ctx.samples.setdefault("digits", samples("digits"))
    shared = ctx.home or ctx.workdir / "kiln-home"
    ctx.home = digits_only_home(shared)
    with kiln_gateway("digits", ctx) as gateway:
        assert gateway.pid is not None
        time.sleep(IDLE_SETTLE_S)
        meter = TreeCpu(gateway.pid)
        meter.start()
        time.sleep(args.idle_seconds)
        use = meter.stop()
        by_process = roles(use, gateway.pid)
        memory = gateway.memory()
    by_role: dict[str, float] = {}
    for row in by_process:
        by_role[row["role"]] = round(
            by_role.get(row["role"], 0.0) + row["cpu_percent_of_one_core"], 2
        )
    doc = {
        "model": "digits",
        "served": gateway.info["served"],
        "seconds": use.wall_s,
        "settle_s": IDLE_SETTLE_S,
        "cpu_s": round(use.seconds, 3),
        "cpu_percent_of_one_core": use.percent_of_one_core(),
        "processes": use.processes,
        "appeared": use.appeared,
        "exited": use.exited,
        "percent_by_role": by_role,
        "by_process": by_process,
        "rss_mb": memory.get("rss_mb"),
        "home": "shared" if ctx.home == shared else "its own (digits only)",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"[idle] kiln serve + digits, no traffic: {doc['cpu_percent_of_one_core']:.2f}% of one "
        f"core over {use.wall_s:.0f} s ({use.processes} processes)",
        file=sys.stderr,
    )
    return doc


def idle_markdown(doc: dict[str, Any]) -> str:
    lines = [
        IDLE_MARKER,
        "## Idle cost",
        "",
        (
            f"`kiln serve` with digits deployed (the only model; serves {doc['served']}), no "
            f"request at all: the user + system CPU time of its whole process tree over "
            f"{doc['seconds']:.0f} s, from {doc['settle_s']:g} s after the model answered "
            f"ready ({doc['at']}); {doc['processes']} processes, {doc['rss_mb']} MB RSS."
        ),
        "",
        "| process | role | CPU % of one core |",
        "|---|---|---|",
    ]
    for row in doc["by_process"]:
        lines.append(
            f"| `{row['command'][:70]}` | {row['role']} | {row['cpu_percent_of_one_core']:.2f} |"
        )
    lines.append(f"| all | | **{doc['cpu_percent_of_one_core']:.2f}** |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- profile
# Where the CPU goes under load: py-spy samples the gateway process and the engine (its root
# and, with --subprocesses, its LitServe workers) while wrk drives `kiln serve` at 64
# connections. py-spy writes one format per recording, and two recorders cannot share a
# process (each stops it to take a sample), so there are two runs as long: the flame graphs
# from the first, the collapsed stacks (and the summary) from the second. --idle keeps idle
# threads' samples: a share is of samples (threads x time), not of CPU; waits are marked
# (bench/pyspy.py).
PROFILE_CONCURRENCY = 64
# samples per second of each thread: with --native every sample stops the process while py-spy
# unwinds each thread's C stack, and at py-spy's default of 100 that slowed kiln down 5-fold here
PROFILE_RATE = 25
PROFILED = ("gateway", "engine")


def profile_summary(doc: dict[str, Any], files: dict[str, Path]) -> str:
    """``summary.md``: the runs, then per process recorded its top functions by inclusive and
    by self share of the samples (:func:`bench.pyspy.summary_tables`)."""
    runs = doc["runs"]

    def figures(run: dict[str, Any]) -> str:
        cpu = run.get("cpu_ms_per_request")
        return (
            f"{run['rps']:.0f} req/s, p50 {run['p50_ms']:.2f} ms, "
            f"{'-' if cpu is None else f'{cpu:.3f}'} CPU ms/req, {run['errors']} errors"
        )

    native = "`--native` (C frames too), " if doc["native"] else ""
    lines = [
        f"# Where `kiln serve` spends its time: {doc['model']} ({doc['served']}), wrk at "
        f"{doc['concurrency']} connections",
        "",
        (
            f"`python bench/serve_bench.py --sections profile` ({doc['at']}): py-spy "
            f"{doc['py_spy']}, {doc['rate']} samples/s of every thread, `--idle` (the samples "
            f"of waiting threads kept: a share is of thread time, not of CPU), {native}"
            "the gateway process and the engine (`--subprocesses`: its LitServe processes), "
            f"{doc['duration_s']:g} s runs. Without the sampler: {figures(runs['unprofiled'])}. "
            f"Flame graphs, from a run under it ({figures(runs['flamegraph'])}): "
            + ", ".join(f"`{files[p].with_suffix('.svg').name}`" for p in PROFILED)
            + f". Collapsed stacks and these tables, from the next ({figures(runs['raw'])}): "
            + ", ".join(f"`{files[p].name}`" for p in PROFILED)
            + " (py-spy's samples and errors: "
            + "; ".join(
                f"{fmt} {part} {c.get('samples', '?')}/{c.get('errors', '?')}"
                for fmt in ("flamegraph", "raw")
                for part, c in runs[fmt]["py_spy"].items()
            )
            + ")"
            + ". The sampler stops a process for each sample, so under it the system runs "
            "slower and its threads wait more than without."
        ),
        "",
        (
            "Functions are `name (file)` (a C function: `name (library)`), line numbers "
            "merged; frames py-spy found no symbol for are left out. **idle**: the thread "
            "was waiting (its C stack below the innermost Python frame is in a libc wait "
            "such as epoll_wait, poll, read or clock_nanosleep, or in the interpreter's lock "
            "or GIL wait: `bench/pyspy.py`); % of busy samples leaves the idle ones out."
        ),
    ]
    for part in PROFILED:
        lines += ["", f"## {part} (pid {doc['pids'][part]})"]
        lines += pyspy.summary_tables(files[part], f"the {part} process, all its threads")
    return "\n".join(lines) + "\n"


def run_profile(ctx: Bench, out: Path) -> dict[str, Any]:
    """A wrk run at 64 connections against ``kiln`` for digits without py-spy, then two
    recorded by py-spy (gateway, engine): the flame graphs, then the collapsed stacks;
    summary.md from those."""
    args = ctx.args
    try:
        spy = pyspy.find()
    except pyspy.PySpyError as exc:
        raise Skip(str(exc)) from None
    model = "digits"
    ctx.samples.setdefault(model, samples(model))
    out.mkdir(parents=True, exist_ok=True)
    files = {p: out / f"{p}-{model}.txt" for p in PROFILED}
    runs: dict[str, dict[str, Any]] = {}
    native = True

    def load() -> dict[str, Any]:
        doc = run_wrk(
            gateway,
            connections=PROFILE_CONCURRENCY,
            duration=args.profile_duration,
            threads=args.threads,
            workdir=ctx.workdir,
        )
        return to_row("kiln", model, PROFILE_CONCURRENCY, doc)

    def recorded(fmt: str, suffix: str) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            counts = {
                part: stack.enter_context(
                    pyspy.record(
                        spy,
                        pids[part],
                        files[part].with_suffix(suffix),
                        fmt,
                        rate=args.profile_rate,
                        subprocesses=part == "engine",  # its LitServe processes
                        native=native,
                        log=ctx.log(f"py-spy-{part}-{fmt}", model),
                    )
                )
                for part in PROFILED
            }
            run = load()
        return {**run, "py_spy": counts}  # filled in once the recorders stopped

    with kiln_gateway(model, ctx) as gateway:
        assert gateway.pid is not None
        check_answers(gateway)
        if args.warmup > 0:
            run_wrk(
                gateway,
                connections=PROFILE_CONCURRENCY,
                duration=args.warmup,
                threads=args.threads,
                workdir=ctx.workdir,
            )
        engines = sorted(engines_of(gateway, model))
        if len(engines) != 1:
            raise Skip(f"expected one engine serving {model} under the gateway, found {engines}")
        pids = {"gateway": gateway.pid, "engine": engines[0]}
        runs["unprofiled"] = load()
        for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
            try:
                runs[fmt] = recorded(fmt, suffix)
            except pyspy.PySpyError as exc:
                if not native:
                    raise Skip(str(exc)) from None
                print(f"[profile] with --native: {exc}; again without", file=sys.stderr)
                native = False
                runs[fmt] = recorded(fmt, suffix)
        for name, run in runs.items():
            print(
                f"[profile] {name} run: {run['rps']:.1f} rps, p50 {run['p50_ms']:.3f} ms, "
                f"errors {run['errors']}",
                file=sys.stderr,
            )
    result = {
        "model": model,
        "served": gateway.info["served"],
        "concurrency": PROFILE_CONCURRENCY,
        "duration_s": args.profile_duration,
        "rate": args.profile_rate,
        "native": native,
        "py_spy": pyspy.version(spy),
        "pids": pids,
        "runs": runs,
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out / "summary.md").write_text(profile_summary(result, files))
    return result


# ------------------------------------------------------------------------------- outputs
def markdown(
    rows: list[dict[str, Any]], skipped: list[dict[str, str]], args: argparse.Namespace
) -> str:
    header = (
        f"Command: `python bench/serve_bench.py --duration {args.duration:g} "
        f"--concurrency {','.join(map(str, args.concurrency))}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). wrk {args.threads} "
        "thread(s), `--timeout 10s`, on the same machine as the servers; one request is "
        "one digits image or one MiniLM sentence; the same requests for every system. "
        "RSS is read after the runs, summed over each server's processes (kiln: gateway "
        "+ this model's engine). CPU ms/req: the user + system CPU time that all the "
        "server's processes used during the run (its whole process tree: kiln's gateway "
        "and every engine with its workers), per request answered; wrk's own is not in it."
    )
    lines = [
        SERVE_MARKER,
        "## Serve",
        "",
        header,
        "",
        (
            "| model | system | concurrency | req/s | p50 ms | p99 ms | errors | CPU ms/req | "
            "RSS MB | notes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["concurrency"], SYSTEMS.index(r["system"]))):
        notes = []
        if "batch_timeout_s" in r:
            notes.append(f"batch_timeout {r['batch_timeout_s'] * 1000:g} ms")
        if "served" in r:
            notes.append(r["served"])
        if "rss_gateway_mb" in r:
            notes.append(
                f"gateway {r['rss_gateway_mb']} + {r['engine_replicas']} engine(s) "
                f"{r['rss_engine_mb']} MB"
            )
        if r.get("cpu_gateway_ms_per_request") is not None:
            cpu_note = (
                f"CPU ms/req: gateway {r['cpu_gateway_ms_per_request']:.3f} + engine "
                f"{r['cpu_engine_ms_per_request']:.3f}"
            )
            if r.get("cpu_other_engines_ms_per_request"):
                cpu_note += f" + other models' engines {r['cpu_other_engines_ms_per_request']:.3f}"
            notes.append(cpu_note)
        cpu = r.get("cpu_ms_per_request")
        lines.append(
            f"| {r['model']} | {r['system']} | {r['concurrency']} | {r['rps']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | "
            f"{'-' if cpu is None else f'{cpu:.3f}'} | "
            f"{r.get('rss_mb', '-')} | {'; '.join(notes)} |"
        )
    for r in rows:
        if r["system"] == "litserve-plain" and r["concurrency"] == args.concurrency[0]:
            tried = ", ".join(
                f"{float(t) * 1000:g} ms: {v:.1f}" for t, v in r["tuning_rps"].items()
            )
            lines.append(
                f"\n- litserve-plain {r['model']}: batch_timeout tried at concurrency "
                f"{TUNE_CONCURRENCY} ({args.tune_duration:g} s each, req/s): {tried}; "
                f"kept {r['batch_timeout_s'] * 1000:g} ms."
            )
    for s in skipped:
        lines.append(f"\n- skipped {s['system']} ({s['model']}): {s['reason']}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(kind: type, allowed: tuple[str, ...] | None = None) -> Callable[[str], list[Any]]:
        def parse(text: str) -> list[Any]:
            items = [kind(t.strip()) for t in text.split(",") if t.strip()]
            if allowed is not None and (bad := [i for i in items if i not in allowed]):
                raise argparse.ArgumentTypeError(f"{bad}: choose from {', '.join(allowed)}")
            if not items:
                raise argparse.ArgumentTypeError("give at least one value")
            return items

        return parse

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per wrk run")
    parser.add_argument(
        "--concurrency", type=csv(int), default=[1, 16, 64], help="connections, comma-separated"
    )
    parser.add_argument("--models", type=csv(str, tuple(MODELS)), default=list(MODELS))
    parser.add_argument("--systems", type=csv(str, SYSTEMS), default=list(SYSTEMS))
    parser.add_argument(
        "--reuse-home",
        type=Path,
        default=None,
        metavar="DIR",
        help="a KILN_HOME to use and keep: models missing from it are "
        "uploaded and optimized there first, so the next run skips that "
        "(default: a fresh temporary one)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench", help="folder of results.json and results.md"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of load before the measured runs (0: none)",
    )
    parser.add_argument(
        "--tune-duration", type=float, default=5.0, help="seconds per LitServe batch_timeout trial"
    )
    parser.add_argument(
        "--batch-timeouts",
        type=csv(float),
        default=list(BATCH_TIMEOUTS),
        help="LitServe batch_timeout values to try, seconds",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument(
        "--sections",
        type=csv(str, SECTIONS),
        default=list(DEFAULT_SECTIONS),
        help="what to run: the systems' table (serve), the gateway's p50 "
        "cost over its engine (gateway-overhead), the inference log's "
        "p99 cost (log-overhead), kiln serve's CPU with no traffic (idle); "
        "not by default: py-spy profiles of kiln under load (profile); "
        f"default {','.join(DEFAULT_SECTIONS)}; e.g. a smoke check: --sections "
        "log-overhead --duration 3 --warmup 1 --log-runs 2",
    )
    parser.add_argument(
        "--gap-runs",
        type=int,
        default=6,
        help="gateway-overhead: pairs of runs per model (medians of them)",
    )
    parser.add_argument(
        "--gap-duration", type=float, default=5.0, help="gateway-overhead: seconds per run"
    )
    parser.add_argument(
        "--log-runs",
        type=int,
        default=5,
        help="log-overhead: alternating runs per sample (medians of them)",
    )
    parser.add_argument(
        "--log-duration",
        type=float,
        default=None,
        help="log-overhead: seconds per run (default: --duration)",
    )
    parser.add_argument("--log-concurrency", type=int, default=16, help="log-overhead: connections")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="idle: seconds of no traffic whose CPU is measured",
    )
    parser.add_argument(
        "--profile-duration",
        type=float,
        default=None,
        help="profile: seconds of each of its two recorded wrk runs (default: --duration)",
    )
    parser.add_argument(
        "--profile-rate",
        type=int,
        default=PROFILE_RATE,
        help="profile: py-spy samples per second of each thread",
    )
    parser.add_argument(
        "--keep-logs", type=Path, default=None, metavar="DIR", help="copy the servers' logs here"
    )
    args = parser.parse_args(argv)
    if args.reuse_home is not None:
        args.reuse_home = args.reuse_home.resolve()
    if args.profile_duration is None:
        args.profile_duration = args.duration
    return args


def section(
    args: argparse.Namespace,
    name: str,
    marker: str,
    render: Callable[[dict[str, Any]], str],
    measure: Callable[[Path], dict[str, Any]],
) -> bool:
    """One of the extra sections: measured in a scratch folder, written under its marker
    (results.json key: ``name`` with underscores); False, with the reason, when skipped."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"kiln-{name}-") as tmp:
            doc = measure(Path(tmp))
    except Skip as exc:
        print(f"[{name}] skipped: {exc}", file=sys.stderr)
        return False
    table = render(doc)
    write_section(args.out, name.replace("-", "_"), doc, marker, table)
    print(table)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    needed = set(args.models) if {"serve", "gateway-overhead"} & set(args.sections) else set()
    if {"log-overhead", "idle", "profile"} & set(args.sections):
        needed.add("digits")
    for model in sorted(needed):
        if not (ROOT / MODELS[model].source).exists():
            print(
                f"[serve] {MODELS[model].source} is missing: run "
                "`.venv/bin/dvc repro train_digits build_minilm` first",
                file=sys.stderr,
            )
            return 2
    ok = True
    # idle, serve, gateway-overhead and profile share one KILN_HOME (--reuse-home, else a
    # temporary one), so the models are optimized once; idle goes first, while digits is the
    # only model deployed there (serve deploys minilm too, and nothing undeploys; a reused home
    # that serves more sends idle to one of its own); log-overhead starts from a fresh one
    # unless reused
    with tempfile.TemporaryDirectory(prefix="kiln-bench-home-") as shared:
        home = args.reuse_home or Path(shared) / "kiln-home"
        if "idle" in args.sections:
            ok &= section(
                args,
                "idle",
                IDLE_MARKER,
                idle_markdown,
                lambda work: run_idle(Bench(args, work, home)),
            )
        if "serve" in args.sections:
            rows, skipped = run(args, home)
            table = markdown(rows, skipped, args)
            write_section(args.out, "serve", rows, SERVE_MARKER, table)
            print(table)
        if "gateway-overhead" in args.sections:
            ok &= section(
                args,
                "gateway-overhead",
                GAP_MARKER,
                gap_markdown,
                lambda work: run_gateway_overhead(Bench(args, work, home)),
            )
        if "profile" in args.sections:
            try:
                with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
                    run_profile(Bench(args, Path(tmp), home), args.out / "profiles")
                print((args.out / "profiles" / "summary.md").read_text())
                print(f"[profile] written to {args.out / 'profiles'}", file=sys.stderr)
            except Skip as exc:
                print(f"[profile] skipped: {exc}", file=sys.stderr)
                ok = False
    if "log-overhead" in args.sections:
        ok &= section(
            args,
            "log-overhead",
            LOG_MARKER,
            log_markdown,
            lambda work: run_log_overhead(Bench(args, work)),
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
