"""The serving part of ``make gpu-check``: Kiln's engine serving the compiled models on the GPU,
dynamically batched, answering a burst of requests.

Two sides, one module:

- **The client** (:func:`serve_check`, imported by ``bench/gpu_check.py``; standard library,
  numpy and :mod:`kiln.processes` (standard library only), so the check itself still runs on
  the GPU machine's bare ``python3``). It unpacks
  the wheels carried in ``gpu-carry/wheels/`` into a temporary folder (the GPU machine has no
  network and no pydantic, LitServe or FastAPI), starts one engine per (model, variant), each
  in its own process group with that folder first on its ``PYTHONPATH``, waits for their
  ``/health``, then, one engine at a time, sends warm-up requests and a timed burst
  (``http.client``, one keep-alive connection per thread of a pool) and reads the engine's
  ``/stats`` before and after it. Every process group is stopped at the end, whatever happened.
- **The server** (``python3 bench/gpu_serve.py --name ... --artifact ...``): Kiln's
  :class:`serving.engine.KilnEngine` with a :class:`CarriedModel` loader in place of the
  registry (``kiln.settings`` needs pydantic-settings and sqlmodel, which do not travel),
  served by :func:`serving.engine.lit_server` (LitServe, Kiln's batch loop and queues) on
  127.0.0.1, exactly as ``python -m serving.engine`` serves a registered version.

Each request is one row (a digits image, a MiniLM sentence) in :mod:`serving.wire`'s format,
as the gateway sends it; the engine batches concurrent requests up to ``max_batch_size``.
The answers are checked against the eager model's outputs on the same rows.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # kiln.processes and bench.cpu (standard library only) from here
    sys.path.insert(0, str(ROOT))

from bench.cpu import TreeCpu
from kiln.processes import start_group, stop_groups

PARENT_ENV = "KILN_ENGINE_PARENT_PID"  # serving.engine: the engine stops when this pid is gone
STOP_TIMEOUT_S = 15.0
_OIP_DTYPES = {
    "FP32": "<f4",
    "FP16": "<f2",
    "FP64": "<f8",
    "INT64": "<i8",
    "INT32": "<i4",
    "INT8": "<i1",
    "UINT8": "<u1",
    "BOOL": "|b1",
}


# ------------------------------------------------------------------------------ client
@dataclass
class Target:
    """One (model, variant) to serve: what the engine loads and what the burst sends."""

    model: str
    variant: str  # the label the tables use, e.g. "inductor fp16"
    backend: str  # Kiln's backend name: torch-eager, inductor
    precision: str
    artifact: Path
    spec: dict[str, Any]  # kiln.spec.ModelSpec as JSON
    bodies: list[bytes]  # serving.wire requests; request k sends bodies[k % len(bodies)]
    judge: Callable[[np.ndarray, np.ndarray], dict[str, Any]]  # (request numbers, outputs)
    tokenizer: Path | None = None

    @property
    def version(self) -> str:
        return self.variant.replace(" ", "-")


@dataclass
class ServeSettings:
    device: str  # cuda | cpu
    site: Path  # where the carried wheels are unpacked
    logs: Path  # one log per engine
    requests: int  # per burst
    concurrency: int
    warmup: int  # untimed requests before each burst
    max_batch_size: int = 32
    budget_s: float = 60.0  # the whole serving part, engine starts included
    started: float = field(default_factory=time.perf_counter)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


@dataclass
class Engine:
    target: Target
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float | None = None
    row: dict[str, Any] = field(default_factory=dict)


def wire_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """One tensor in :mod:`serving.wire`'s format (that module needs pydantic: not imported)."""
    if array.dtype.kind in ("U", "S", "O"):
        return {
            "name": name,
            "datatype": "BYTES",
            "shape": list(array.shape),
            "data": [str(v) for v in array.reshape(-1)],
        }
    datatype = {np.dtype(v).name: k for k, v in _OIP_DTYPES.items()}[array.dtype.name]
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(array.shape),
        "b64": base64.b64encode(raw).decode("ascii"),
    }


def wire_request(model: str, version: str, inputs: dict[str, np.ndarray]) -> bytes:
    return json.dumps(
        {
            "model": model,
            "version": version,
            "deadline": None,
            "inputs": [wire_tensor(n, a) for n, a in inputs.items()],
            "outputs": None,
        },
        separators=(",", ":"),
    ).encode()


def _wire_output(doc: dict[str, Any]) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(doc["b64"]), dtype=_OIP_DTYPES[doc["datatype"]])
    return array.reshape(doc["shape"])


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """Every wheel in ``wheels`` unpacked into ``site``, once its tags are checked against this
    interpreter: what ``pip install --no-deps --target site`` does for wheels without a
    ``.data`` folder (these have none), with no pip, index or network needed."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise RuntimeError(
            f"{wheels} holds no wheels: rebuild the carry folder with "
            "bench/prepare_gpu_check.py (it downloads them)"
        )
    for wheel in found:
        why = wheel_mismatch(wheel.name)
        if why:
            raise RuntimeError(
                f"{wheel.name} {why}: rebuild the carry folder with "
                "bench/prepare_gpu_check.py --wheels-for gpu (CPython 3.12 on "
                "x86_64) or --wheels-for here"
            )
    site.mkdir(parents=True, exist_ok=True)
    for wheel in found:
        with zipfile.ZipFile(wheel) as archive:
            if any(n.split("/")[0].endswith(".data") for n in archive.namelist()):
                raise RuntimeError(f"{wheel.name} has a .data folder: install it with pip")
            archive.extractall(site)
    return [w.name for w in found]


def wheel_mismatch(filename: str) -> str:
    """Why the wheel called ``filename`` cannot run on this interpreter, or ``""``."""
    python, abi, plat = filename.removesuffix(".whl").split("-")[-3:]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if abi not in ("none", here) and not (
        abi == "abi3"
        and python.startswith("cp3")
        and int(python[3:] or 0) <= sys.version_info.minor
    ):
        return f"is built for {python}/{abi}, and this is CPython {sys.version.split()[0]}"
    if plat != "any" and not plat.endswith(platform.machine()):
        return f"is built for {plat}, and this machine is {platform.machine()}"
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_engine(target: Target, s: ServeSettings) -> Engine:
    """``target``'s engine in a process group of its own, the carried wheels first on its path."""
    engine = Engine(target, free_port(), s.logs / f"engine-{target.model}-{target.version}.log")
    spec = s.logs / f"spec-{target.model}-{target.version}.json"
    spec.write_text(json.dumps(target.spec))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--name",
        target.model,
        "--version",
        target.version,
        "--backend",
        target.backend,
        "--precision",
        target.precision,
        "--artifact",
        str(target.artifact),
        "--spec",
        str(spec),
        "--port",
        str(engine.port),
        "--device",
        s.device,
        "--max-batch-size",
        str(s.max_batch_size),
    ]
    if target.tokenizer is not None:
        command += ["--tokenizer", str(target.tokenizer)]
    path = [str(s.site), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "PYTHONUNBUFFERED": "1",
        PARENT_ENV: str(os.getpid()),
    }
    engine.proc = start_group(command, cwd=ROOT, env=env, log_path=engine.log)
    return engine


def stop_engines(engines: list[Engine]) -> None:
    """SIGTERM every engine's process group (LitServe's workers are in it), give them
    STOP_TIMEOUT_S together to exit, then SIGKILL whatever is left of each group."""
    stop_groups([e.proc for e in engines if e.proc is not None], timeout_s=STOP_TIMEOUT_S)


def last_lines(log: Path, lines: int) -> list[str]:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return text[-lines:] or ["(no output)"]


def tail(log: Path, lines: int = 4) -> str:
    """The end of ``log`` as one line for a table cell (600 characters at most)."""
    return " | ".join(line.strip() for line in last_lines(log, lines))[-600:]


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(engines: list[Engine], s: ServeSettings) -> None:
    """Until every engine's ``/health`` answers 200, it exits, or the budget runs out; an engine
    that is not ready gets a failed row saying why."""
    waiting = [e for e in engines if e.proc is not None]
    while waiting and s.left_s() > 0:
        for engine in list(waiting):
            assert engine.proc is not None
            if engine.proc.poll() is not None:
                engine.row = _failed(
                    engine,
                    f"the engine exited with {engine.proc.returncode} "
                    f"before it was ready: {tail(engine.log)}",
                )
                waiting.remove(engine)
                continue
            try:
                status, _ = _get(engine.port, "/health", timeout=2.0)
            except (OSError, http.client.HTTPException):
                continue
            if status == 200:
                engine.ready_s = round(time.perf_counter() - s.started, 1)
                print(
                    f"[gpu-check] serving {engine.target.model} {engine.target.variant}: "
                    f"ready after {engine.ready_s:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                waiting.remove(engine)
        time.sleep(0.25)
    for engine in waiting:
        engine.row = _failed(
            engine, f"not ready within the serving budget ({s.budget_s:.0f}s): {tail(engine.log)}"
        )


def _failed(engine: Engine, reason: str, status: str = "failed") -> dict[str, Any]:
    print(
        f"[gpu-check] serving {engine.target.model} {engine.target.variant} {status}: {reason}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "model": engine.target.model,
        "variant": engine.target.variant,
        "status": status,
        "reason": reason,
    }


@dataclass
class Answer:
    index: int  # request number in the burst
    status: int | None  # HTTP status; None: no answer (the reason is in ``body``)
    ms: float
    body: bytes


def burst(
    port: int, bodies: list[bytes], requests: int, concurrency: int
) -> tuple[list[Answer], float]:
    """``requests`` POSTs to ``/predict``, ``concurrency`` at a time (a thread each, with its
    own keep-alive connection); the answers and the seconds the burst took."""
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []
    lock = threading.Lock()
    headers = {"Content-Type": "application/json"}

    def one(index: int) -> Answer:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                opened.append(conn)
        started = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=bodies[index % len(bodies)], headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            local.conn = None
            return Answer(
                index,
                None,
                (time.perf_counter() - started) * 1000,
                f"{type(exc).__name__}: {exc}".encode(),
            )
        return Answer(index, resp.status, (time.perf_counter() - started) * 1000, body)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        started = time.perf_counter()
        answers = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    for conn in opened:
        conn.close()
    return answers, wall


def stats(port: int) -> dict[str, int]:
    status, body = _get(port, "/stats")
    if status != 200:
        raise RuntimeError(f"/stats answered {status}")
    return {k: v for k, v in json.loads(body).items() if isinstance(v, int)}


def measure(engine: Engine, s: ServeSettings) -> dict[str, Any]:
    """Warm-up requests, then the timed burst; the row for the serving table."""
    target = engine.target
    warm, _ = burst(engine.port, target.bodies, s.warmup, s.concurrency)
    bad = [a for a in warm if a.status != 200]
    if bad:
        return _failed(
            engine,
            f"{len(bad)} of {len(warm)} warm-up requests failed, the first: "
            f"{bad[0].status} {bad[0].body[:200].decode(errors='replace')}",
        )
    before = stats(engine.port)
    assert engine.proc is not None
    meter = TreeCpu(engine.proc.pid)  # the engine's root, its LitServe workers: not this client
    meter.start()
    answers, wall = burst(engine.port, target.bodies, s.requests, s.concurrency)
    cpu = meter.stop()
    after = stats(engine.port)
    delta = {k: after[k] - before.get(k, 0) for k in after}

    ok = [a for a in answers if a.status == 200]
    errors = Counter(
        str(a.status) if a.status is not None else a.body.decode()[:80]
        for a in answers
        if a.status != 200
    )
    row: dict[str, Any] = {
        "model": target.model,
        "variant": target.variant,
        "status": "ok",
        "reason": "",
        "requests": s.requests,
        "concurrency": s.concurrency,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 1),
        "ready_s": engine.ready_s,
        "max_batch_size": s.max_batch_size,
        "engine_stats": delta,
        # user + system CPU of the engine's whole process tree during the burst, per answer
        "cpu_ms_per_request": cpu.ms_per_request(len(ok)),
        "cpu_s": round(cpu.seconds, 3),
        "cpu_processes": cpu.processes,
    }
    if ok:
        ms = np.array([a.ms for a in ok])
        row |= {
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
        }
        docs = [json.loads(a.body) for a in ok]
        sizes = np.array([d["batch_size"] for d in docs])
        row["max_batch_seen"] = int(sizes.max())
        row["engine_ms_mean"] = round(float(np.mean([d["engine_ms"] for d in docs])), 3)
        outputs = np.concatenate([_wire_output(d["outputs"][0]) for d in docs])
        row["quality"] = target.judge(np.array([a.index for a in ok]), outputs)
    calls = delta.get("model_calls", 0)
    # rows per model call during the burst: the batches the engine actually ran
    row["mean_batch"] = round(delta.get("model_rows", 0) / calls, 2) if calls else None
    if row["errors"]:
        row["status"] = "failed"
        row["reason"] = f"{row['errors']} of {s.requests} requests failed: {dict(errors)}"
    return row


def serve_check(targets: list[Target], wheels: Path, s: ServeSettings) -> dict[str, Any]:
    """Serve every target, burst each in turn, stop them all: the JSON section and its rows."""
    section: dict[str, Any] = {
        "device": s.device,
        "requests": s.requests,
        "concurrency": s.concurrency,
        "warmup": s.warmup,
        "max_batch_size": s.max_batch_size,
        "budget_s": s.budget_s,
        "rows": [],
        "errors": [],
    }
    try:
        started = time.perf_counter()
        section["wheels"] = install_wheels(wheels, s.site)
        section["install_s"] = round(time.perf_counter() - started, 1)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        section["errors"].append(f"serving: {exc}")
        print(f"[gpu-check] serving: {exc}", file=sys.stderr, flush=True)
        return section
    engines: list[Engine] = []
    try:
        for target in targets:
            print(
                f"[gpu-check] serving {target.model} {target.variant}: starting the engine",
                file=sys.stderr,
                flush=True,
            )
            engines.append(start_engine(target, s))
        wait_ready(engines, s)
        for engine in engines:
            if engine.row:  # not ready: its row says why
                continue
            if s.left_s() <= 0:
                engine.row = _failed(
                    engine, "serving budget spent before its burst", status="skipped"
                )
                continue
            try:
                engine.row = measure(engine, s)
            except Exception as exc:  # the other engines are still measured
                engine.row = _failed(engine, f"{type(exc).__name__}: {exc}"[:300])
            else:
                r = engine.row
                if r.get("p50_ms") is not None:
                    print(
                        f"[gpu-check] serving {r['model']} {r['variant']}: {r['ok']}/"
                        f"{r['requests']} ok, p50 {r['p50_ms']:.1f} ms, "
                        f"{r['requests_per_s']:.0f} req/s, mean batch {r['mean_batch']}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        stop_engines(engines)
    for engine in engines:  # the GPU machine keeps no files: its log goes to the output
        if engine.row.get("status") == "failed":
            end = "\n".join(last_lines(engine.log, 40))
            print(
                f"[gpu-check] log of the {engine.target.model} {engine.target.variant} "
                f"engine, its end:\n{end}",
                file=sys.stderr,
                flush=True,
            )
    section["rows"] = [e.row for e in engines]
    section["total_s"] = round(time.perf_counter() - s.started, 1)
    return section


# ------------------------------------------------------------------------------ server
@dataclass
class CarriedModel:
    """Loads the one version this engine serves from a built artifact, without the registry
    (a :class:`serving.engine.ModelLoader`). It travels to LitServe's spawned worker inside
    the LitAPI, so it holds only picklable values."""

    name: str
    version: str
    backend: str
    precision: str
    artifact: str
    spec: dict[str, Any]
    tokenizer: str | None = None

    def __call__(self, name: str, version: str, *, device: str, threads: int | None) -> Any:
        from kiln.backends import get_backend
        from kiln.errors import NotFound
        from kiln.spec import ModelSpec
        from serving.loader import LoadedModel

        if (name, version) != (self.name, self.version):
            raise NotFound(
                f"{name}@{version} is not served here: this engine serves "
                f"{self.name}@{self.version}"
            )
        spec = ModelSpec.model_validate(self.spec)
        runner = get_backend(self.backend).load(
            Path(self.artifact), spec=spec, device=device, threads=threads
        )
        tokenizer = None
        if spec.preprocess is not None:  # as serving.loader loads a text model's tokenizer
            from tokenizers import Tokenizer

            if self.tokenizer is None:
                raise ValueError(f"{name}@{version} tokenizes its inputs: pass --tokenizer")
            tokenizer = Tokenizer.from_file(self.tokenizer)
            tokenizer.enable_truncation(spec.preprocess.max_length)
            tokenizer.enable_padding()
        return LoadedModel(
            name=name,
            version=version,
            spec=spec,
            runner=runner,
            memory_bytes=Path(self.artifact).stat().st_size,
            backend=self.backend,
            precision=self.precision,
            tokenizer=tokenizer,
        )


def serve(argv: list[str] | None = None) -> int:
    """The engine process: serve one artifact until SIGTERM; the exit code."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(
        description="Serve one built artifact with Kiln's engine "
        "(no registry); bench/gpu_check.py starts it."
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--backend", required=True, choices=["torch-eager", "inductor"])
    parser.add_argument("--precision", required=True)
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--spec", required=True, type=Path, help="kiln.spec.ModelSpec as JSON")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    from serving import engine
    from serving.config import ServingSettings

    engine.configure_logging()
    log = logging.getLogger("kiln.engine")
    signal.signal(signal.SIGTERM, engine._raise_interrupt)  # LitServe's Ctrl-C path
    engine._watch_parent()  # stop with bench/gpu_check.py, even when it is killed
    loader = CarriedModel(
        args.name,
        args.version,
        args.backend,
        args.precision,
        str(args.artifact),
        json.loads(args.spec.read_text()),
        str(args.tokenizer) if args.tokenizer else None,
    )
    api = engine.KilnEngine(
        args.name,
        args.version,
        ServingSettings(max_batch_size=args.max_batch_size),
        engine.EngineStats(),
        loader=loader,
    )
    # one GPU, whatever nvidia-smi and CUDA_VISIBLE_DEVICES say (LitServe's "auto" reads both)
    server = engine.lit_server(
        api, accelerator=args.device, devices=1 if args.device == "cuda" else "auto"
    )
    code = 0
    try:
        server.run(
            host="127.0.0.1",
            port=args.port,
            num_api_servers=1,
            log_level="warning",
            generate_client_file=False,
            api_server_worker_type="thread",
            access_log=False,
        )
    except KeyboardInterrupt:
        log.info("engine for %s@%s stopping", args.name, args.version)
    except Exception as exc:  # a worker failed its setup (it logged why) or died
        log.error(
            "engine for %s@%s stopped: %s: %s", args.name, args.version, type(exc).__name__, exc
        )
        code = 1
    engine._stop_children()
    return code


if __name__ == "__main__":
    exit_code = serve()
    # as serving.engine: LitServe's API server thread cannot be stopped; the workers are
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
