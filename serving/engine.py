"""The inference engine: one LitServe server (one process group) serving one model version.

The gateway sends it :mod:`serving.wire` frames over one TCP connection per inference worker
(:mod:`serving.channel`: several callers' requests per frame); direct callers may use ``POST
/predict`` (LitServe's route and dynamic batching). Either way the engine checks, runs and
answers each request with its own status.
Run it as ``python -m serving.engine --model NAME --version V --port P``; the supervisor does so
through :func:`start_engine_process` and stops it with :func:`stop_engine_process` (LitServe
leaves its worker processes behind on SIGTERM, so the engine runs in its own process group and
the whole group is stopped: :mod:`kiln.processes`).

Routes: ``POST /predict`` (the wire format), ``GET /health`` (200 once the model is loaded and
warmed up: the engine's readiness), ``GET /stats`` (served, expired, failed... counters),
``GET /channel`` (``{"endpoints": ["host:port", ...]}``: where each inference worker listens for
the gateway's frames, :mod:`serving.channel`; the gateway's requests take that path, and
``/predict`` stays for direct callers).

This module deliberately has no ``from __future__ import annotations``: LitServe reads
``decode_request``'s and ``encode_response``'s annotations at run time to build the FastAPI
route, and string annotations would confuse it.
"""

import argparse
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from queue import Empty
from typing import Any, Protocol

import litserve as ls
import numpy as np
import orjson
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import LitAPIStatus, LoopResponseType
from starlette.responses import Response

from kiln.errors import DeadlineExceeded, InferenceFailed, InvalidInput, KilnError, NotFound
from kiln.faults import EngineFaults
from kiln.net import is_loopback
from kiln.processes import signal_group, start_group, stop_group
from serving import heap
from serving.channel import SECRET_ENV, ChannelServer, secret_from_env
from serving.config import ServingSettings
from serving.loader import LoadedModel, ModelCache, load_version, warm_up
from serving.wire import (
    FrameError,
    decode_tensor,
    encode_tensor,
    frame,
    read_header,
    read_tensors,
    tensor_entries,
)

log = logging.getLogger("kiln.engine")
STATS_LOG_INTERVAL_S = 60.0
JSON = "application/json"


# ------------------------------------------------------------------------------ stats
class EngineStats:
    """Counters shared by the inference workers (which count) and the API server (``/stats``).

    Shared memory from the ``spawn`` context, because LitServe spawns its inference workers and
    the counters travel to them inside the pickled LitAPI.
    """

    FIELDS = (
        "requests",
        "served",
        "rows",
        "model_calls",
        "model_rows",
        "expired",
        "failed",
        "invalid",
        "not_found",
    )

    def __init__(self) -> None:
        self._values = mp.get_context("spawn").Array("q", len(self.FIELDS))

    def add(self, **counts: int) -> None:
        with self._values.get_lock():
            for name, value in counts.items():
                self._values[self.FIELDS.index(name)] += value

    def snapshot(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(self.FIELDS, self._values[:], strict=True))


class ChannelPorts:
    """The channel port of each inference worker (:mod:`serving.channel`), written by the
    workers once their model is warm and read by the API server's ``GET /channel``. Shared
    memory from the ``spawn`` context, travelling to the workers inside the LitAPI."""

    SLOTS = 64

    def __init__(self) -> None:
        self._ports = mp.get_context("spawn").Array("i", self.SLOTS)

    def add(self, port: int) -> None:
        with self._ports.get_lock():
            slot = next((i for i in range(self.SLOTS) if self._ports[i] == 0), None)
            if slot is None:
                raise RuntimeError(f"more than {self.SLOTS} inference workers in one engine")
            self._ports[slot] = port

    def ports(self) -> list[int]:
        with self._ports.get_lock():
            return [p for p in self._ports[:] if p]


# --------------------------------------------------------------------------- requests
@dataclass(slots=True)
class Job:
    """One request on its way through the engine: decoded, grouped, run, answered.

    ``status`` stays 0 while the request is still to be run; any other value is its answer's
    HTTP status (``detail`` saying why, for errors).
    """

    model: str = ""
    version: str = ""
    deadline: float | None = None  # wall-clock epoch seconds
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    wanted: list[str] | None = None  # output names asked for; None: all
    status: int = 0
    detail: str = ""
    rows: int = 0
    served: list[np.ndarray] | None = None  # checked inputs, spec order
    outputs: list[tuple[str, np.ndarray]] | None = None
    batch_size: int = 0
    engine_ms: float = 0.0

    def fail(self, error: KilnError) -> None:
        """Answer with ``error``: its class's HTTP status, its message as the detail."""
        self.status, self.detail = error.http_status, str(error)


def _request_error(request: Any) -> str | None:
    """Why a decoded JSON body is not a wire request, or None."""
    if not isinstance(request, dict):
        return "the request must be a JSON object"
    model, version, deadline = request.get("model"), request.get("version"), request.get("deadline")
    inputs, wanted = request.get("inputs"), request.get("outputs")
    if not isinstance(model, str) or not model:
        return "'model' must name a model"
    if version is not None and not isinstance(version, str):
        return "'version' must be a string or null"
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, int | float)
    ):
        return "'deadline' must be epoch seconds or null"
    if not isinstance(inputs, list) or not inputs:
        return "'inputs' must be a non-empty list of tensors"
    if not all(isinstance(doc, dict) for doc in inputs):
        return "each input must be a tensor object"
    if wanted is not None and (
        not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted)
    ):
        return "'outputs' must be a list of output names or null"
    return None


def _decode(request: Any) -> Job:
    """A Job from a wire request; malformed requests become a 400 Job (never an exception,
    which LitServe would turn into a 500 for the whole batch)."""
    job = Job()
    error = _request_error(request)
    if error is not None:
        job.fail(InvalidInput(error))
        return job
    _address(job, request)
    try:
        _add_inputs(job, [decode_tensor(doc) for doc in request["inputs"]])
    except ValueError as exc:
        job.fail(InvalidInput(str(exc)))
    return job


def _address(job: Job, request: dict[str, Any]) -> None:
    """A checked request's model, version, wanted outputs and deadline onto ``job``."""
    job.model, job.version = request["model"], request.get("version") or ""
    job.wanted = request.get("outputs")
    deadline = request.get("deadline")
    job.deadline = float(deadline) if deadline is not None else None


def _add_inputs(job: Job, tensors: list[tuple[str, np.ndarray]]) -> None:
    for name, array in tensors:
        if name in job.inputs:
            raise ValueError(f"input {name!r} is given twice")
        job.inputs[name] = array


def _frame_jobs(header: dict[str, Any], tail: memoryview) -> list[Job]:
    """The Jobs of a channel frame (:mod:`serving.wire`); a malformed job becomes a 400 Job,
    the others are unaffected (each job says how many tensor bytes are its own)."""
    docs = header.get("jobs")
    if not isinstance(docs, list):
        raise FrameError("a request frame needs a 'jobs' list")
    jobs, offset = [], 0
    for doc in docs:
        job = Job()
        jobs.append(job)
        nbytes = doc.get("nbytes") if isinstance(doc, dict) else None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise FrameError("each job of a frame needs its 'nbytes'")
        start, offset = offset, offset + nbytes
        error = _request_error(doc)
        if error is not None:
            job.fail(InvalidInput(error))
            continue
        _address(job, doc)
        try:
            tensors, end = read_tensors(doc["inputs"], tail[:offset], start)
            if end != offset:
                raise ValueError(f"{offset - end} tensor bytes are not accounted for")
            _add_inputs(job, tensors)
        except ValueError as exc:
            job.fail(InvalidInput(str(exc)))
    return jobs


def _answer_frame(frame_id: Any, jobs: list[Job]) -> list[bytes]:
    """The answer frame: each Job's status and outputs (or detail), in the frame's order."""
    answers: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for job in jobs:
        if job.status == 200 and job.outputs is not None:
            try:
                entries, data = tensor_entries(job.outputs)
            except (TypeError, ValueError):  # an output dtype the wire format has no name for
                log.exception("cannot encode the outputs of %s@%s", job.model, job.version)
                answers.append(
                    {"status": 500, "detail": "the model's outputs could not be encoded"}
                )
                continue
            answers.append(
                {
                    "status": 200,
                    "outputs": entries,
                    "batch_size": job.batch_size,
                    "engine_ms": round(job.engine_ms, 3),
                }
            )
            chunks += data
        else:
            answers.append({"status": job.status or 500, "detail": job.detail or "internal error"})
    return frame({"id": frame_id, "answers": answers}, chunks)


def _encode(job: Job) -> Response:
    """A Job's answer: the wire response, or ``{"detail"}`` with the Job's status."""
    if job.status != 200 or job.outputs is None:
        return Response(
            orjson.dumps({"detail": job.detail or "internal error"}),
            status_code=job.status or 500,
            media_type=JSON,
        )
    try:
        body = orjson.dumps(
            {
                "model_name": job.model,
                "model_version": job.version,
                "outputs": [encode_tensor(name, array) for name, array in job.outputs],
                "batch_size": job.batch_size,
                "engine_ms": round(job.engine_ms, 3),
            }
        )
    except (TypeError, ValueError):  # an output dtype the wire format has no name for
        log.exception("cannot encode the outputs of %s@%s", job.model, job.version)
        return Response(
            orjson.dumps({"detail": "the model's outputs could not be encoded"}),
            status_code=500,
            media_type=JSON,
        )
    return Response(body, status_code=200, media_type=JSON)


# ------------------------------------------------------------------------------ the loop
def _payload_rows(payload: Any) -> int:
    """Rows a queued request carries (from its first tensor's shape), without decoding it."""
    try:
        return max(1, int(payload["inputs"][0]["shape"][0]))
    except (KeyError, IndexError, TypeError, ValueError):
        return 1


class DrainingBatchLoop(BatchedLoop):
    """LitServe's batched loop, collecting batches the way Kiln's batching settings mean.

    LitServe 0.2.19's collector polls without blocking when ``batch_timeout`` is 0, spinning a
    core while the queue is empty. This one blocks for the first request, then takes what is
    already queued (``batch_timeout`` 0) or what arrives within ``batch_timeout``, until the
    batch holds ``max_batch_size`` rows (a request may carry many) or requests.
    """

    def get_batch_requests(
        self, lit_api: ls.LitAPI, request_queue: Any, transport: Any
    ) -> tuple[list[Any], list[Any]]:
        try:
            first = request_queue.get(timeout=1.0)
        except Empty:
            return [], []
        payloads: list[Any] = []
        rows = 0
        item = first
        until = time.monotonic() + lit_api.batch_timeout
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, _submitted, x_enc = item
            self.put_response(
                transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
            )
            payloads.append((response_queue_id, uid, x_enc))
            rows += _payload_rows(x_enc)
            if rows >= lit_api.max_batch_size or len(payloads) >= lit_api.max_batch_size:
                break
            remaining = until - time.monotonic()
            try:
                item = (
                    request_queue.get(timeout=remaining)
                    if remaining > 0
                    else request_queue.get_nowait()
                )
            except Empty:
                break
        return payloads, []


# ---------------------------------------------------------------------------- the API
class ModelLoader(Protocol):
    """Loads ``name@version`` in an inference worker, in place of the registry (see
    :class:`KilnEngine`). It travels to LitServe's spawned workers inside the LitAPI, so it must
    pickle: a module-level function or an instance of a module-level class."""

    def __call__(
        self, name: str, version: str, *, device: str, threads: int | None
    ) -> LoadedModel: ...


class KilnEngine(ls.LitAPI):
    """The engine's LitAPI: one primary model version, dynamically batched.

    Lifecycle, per inference worker: ``setup(device)`` loads the primary version (sha256
    verified) into the model cache, pinned, and warms it up; LitServe's ``/health`` answers 200
    only after that. Then, per batch the loop collects: ``decode_request`` (each request to a
    :class:`Job`; malformed ones become 400 Jobs) -> ``batch`` (the Jobs) -> ``predict`` (group
    by model and version, load a non-primary version through the cache on demand, check each
    Job's inputs (400 naming the field), drop Jobs past their deadline (504, never run), run
    each group as one model call, split the outputs by rows, refuse non-finite outputs (500))
    -> ``unbatch`` -> ``encode_response`` (each Job's own status and JSON body).

    Every failure is confined to the Jobs it concerns: no method raises, because LitServe
    answers a whole batch with one error when one does.

    Versions load through the registry (``kiln.settings``, ``kiln.registry.crud``: imported in the
    worker, not here) unless ``loader`` is given: then it loads them instead, and the engine
    runs where no registry is installed (``bench/gpu_serve.py`` on a bare GPU machine).
    """

    def __init__(
        self,
        name: str,
        version: str,
        serving: ServingSettings,
        stats: EngineStats | None = None,
        *,
        loader: ModelLoader | None = None,
        channel_host: str | None = None,
        channel_ports: ChannelPorts | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=serving.max_batch_size,
            batch_timeout=serving.batch_timeout,
            loop=DrainingBatchLoop(),
        )
        self.name = name
        self.version = version
        self.serving = serving
        self.stats = stats
        self.loader = loader
        self.channel_host = channel_host
        self.channel_ports = channel_ports
        self.channel: ChannelServer | None = None
        self._lock: threading.Lock | None = None  # one batch at a time (LitServe's or a frame)
        self.cache: ModelCache | None = None
        self.faults: EngineFaults | None = None
        self._last_stats_log = 0.0
        self._calls = (0, 0)  # model calls and their rows in the batch being predicted

    # --- lifecycle
    def setup(self, device: str) -> None:
        from kiln.backends import default_threads

        configure_logging()
        self.faults = EngineFaults.from_env()
        if self.faults is not None:
            log.warning("test faults injected: %s (KILN_ENGINE_FAULTS)", self.faults)
        threads = None
        if device == "cpu":  # workers on one CPU share its cores
            threads = max(1, default_threads() // self.serving.workers_per_device)
        if self.loader is not None:
            loader = partial(self.loader, device=device, threads=threads)
        else:
            from kiln.settings import get_settings

            loader = partial(_load, get_settings(), device=device, threads=threads)
        self.cache = ModelCache(self.serving.cache_budget_mb * 2**20, loader)
        try:
            primary = self.cache.get(self.name, self.version, pin=True)
        except Exception as exc:
            log.error("refusing to serve %s@%s: %s", self.name, self.version, exc)
            raise
        started = time.perf_counter()
        warm_up(primary, {1, min(self.serving.max_batch_size, 64)})
        log.info(
            "%s@%s warmed up in %.0f ms; serving on %s",
            self.name,
            self.version,
            (time.perf_counter() - started) * 1000,
            device,
        )
        self._last_stats_log = time.monotonic()
        self._lock = threading.Lock()
        if self.channel_host is not None:
            self.channel = ChannelServer(
                self.channel_host, self.answer_frame, secret=secret_from_env()
            ).start()
            if self.channel_ports is not None:
                self.channel_ports.add(self.channel.port)
            log.info("channel for %s@%s on %s", self.name, self.version, self.channel.endpoint)
        heap.freeze("engine worker")  # the loaded model and imports live until exit

    # --- per request
    def decode_request(self, request) -> Job:  # type: ignore[no-untyped-def]
        # ``request`` is the decoded JSON body. It is deliberately unannotated: LitServe reads
        # this annotation to choose the parser, and only an absent one (or starlette's Request)
        # makes it read JSON whatever the Content-Type; a ``dict`` makes FastAPI demand one.
        job = _decode(request)
        if not job.status and not job.version and job.model == self.name:
            job.version = self.version
        elif not job.status and not job.version:
            job.fail(InvalidInput(f"'version' is required for model {job.model!r}"))
        return job

    def batch(self, inputs: list[Job]) -> list[Job]:
        return inputs

    def predict(self, x: list[Job]) -> list[Job]:
        assert self._lock is not None
        with self._lock:
            return self._predict(x)

    def answer_frame(self, body: bytes, head: int) -> list[bytes]:
        """One channel frame (:mod:`serving.channel`) in, its answer frame out: the same
        checks, grouping and model calls as a LitServe batch."""
        header, tail = read_header(body, head)
        jobs = _frame_jobs(header, tail)
        for job in jobs:
            if not job.status and not job.version and job.model == self.name:
                job.version = self.version
            elif not job.status and not job.version:
                job.fail(InvalidInput(f"'version' is required for model {job.model!r}"))
        self.predict(jobs)
        return _answer_frame(header.get("id"), jobs)

    def _predict(self, x: list[Job]) -> list[Job]:
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in x:
            if not job.status:
                groups.setdefault((job.model, job.version), []).append(job)
        for (name, version), jobs in groups.items():
            self._run_model(name, version, jobs)
        self._count(x)
        return x

    def unbatch(self, output: list[Job]) -> list[Job]:
        return output

    def encode_response(self, output: Job) -> Response:
        return _encode(output)

    # --- the work
    def _run_model(self, name: str, version: str, jobs: list[Job]) -> None:
        """Check, deadline-filter and run the Jobs for one version, one call per input shape."""
        assert self.cache is not None
        try:
            model = self.cache.get(name, version)
        except NotFound as exc:
            for job in jobs:
                job.fail(exc)
            return
        except Exception as exc:
            if isinstance(exc, KilnError):
                log.error("loading %s@%s failed: %s", name, version, exc)
            else:
                log.exception("loading %s@%s failed", name, version)
            for job in jobs:
                job.fail(KilnError(f"{name}@{version} could not be loaded on this engine"))
            return
        calls: dict[tuple[tuple[int, ...], ...], list[Job]] = {}
        for job in jobs:
            try:
                job.served = model.check(job.inputs)
                if job.wanted is not None:
                    unknown = [n for n in job.wanted if n not in model.output_names]
                    if unknown:
                        raise InvalidInput(
                            f"unknown output {unknown[0]!r}: {name}@{version} "
                            f"returns {', '.join(model.output_names)}"
                        )
            except InvalidInput as exc:
                job.fail(exc)
                continue
            job.rows = job.served[0].shape[0]
            # Texts are tokenized together (padded to the batch's longest); other inputs
            # concatenate only when their non-batch dimensions agree.
            shape_key = (
                () if model.tokenizer is not None else tuple(a.shape[1:] for a in job.served)
            )
            calls.setdefault(shape_key, []).append(job)
        for call in calls.values():
            self._call(model, call)

    def _call(self, model: LoadedModel, jobs: list[Job]) -> None:
        now = time.time()
        live = []
        for job in jobs:
            if job.deadline is not None and job.deadline <= now:
                job.fail(
                    DeadlineExceeded(
                        "deadline passed before the model ran; the request was dropped"
                    )
                )
            else:
                live.append(job)
        if not live:
            return
        served = [job.served for job in live if job.served is not None]
        inputs = (
            served[0]
            if len(served) == 1
            else [np.concatenate(column) for column in zip(*served, strict=True)]
        )
        rows = inputs[0].shape[0]
        started = time.perf_counter()
        faults = (
            self.faults if self.faults is not None and self.faults.applies(model.version) else None
        )
        try:
            if faults is not None:
                faults.delay()
            outputs = model.run(inputs)
        except Exception:
            log.exception("%s@%s failed on a batch of %d rows", model.name, model.version, rows)
            for job in live:
                job.fail(
                    InferenceFailed(f"the model {model.name}@{model.version} failed on this batch")
                )
            return
        engine_ms = (time.perf_counter() - started) * 1000
        self._calls = (self._calls[0] + 1, self._calls[1] + rows)
        self._split(model, live, outputs, rows, engine_ms, faults)

    def _split(
        self,
        model: LoadedModel,
        jobs: list[Job],
        outputs: list[np.ndarray],
        rows: int,
        engine_ms: float,
        faults: EngineFaults | None = None,
    ) -> None:
        """Each Job's rows of the outputs; non-finite values make that Job a 500."""
        start = 0
        for job in jobs:
            stop = start + job.rows
            mine = [
                (name, out[start:stop])
                for name, out in zip(model.output_names, outputs, strict=True)
                if job.wanted is None or name in job.wanted
            ]
            start = stop
            fault = faults.draw() if faults is not None else None
            if fault == "error":
                job.fail(InferenceFailed("injected fault (KILN_ENGINE_FAULTS): the model failed"))
                continue
            if fault == "nan":
                mine = [(n, np.full_like(a, np.nan) if a.dtype.kind == "f" else a) for n, a in mine]
            bad = next(
                (n for n, a in mine if a.dtype.kind == "f" and not np.isfinite(a).all()), None
            )
            if bad is not None:
                job.fail(
                    InferenceFailed(
                        f"output {bad!r} of {model.name}@{model.version} holds NaN or infinite "
                        "values"
                    )
                )
                continue
            job.status, job.outputs = 200, mine
            job.batch_size, job.engine_ms = rows, engine_ms

    def _count(self, jobs: list[Job]) -> None:
        counts = dict.fromkeys(EngineStats.FIELDS, 0)
        counts["requests"] = len(jobs)
        counts["model_calls"], counts["model_rows"] = self._calls
        self._calls = (0, 0)
        for job in jobs:
            if job.status == 200:
                counts["served"] += 1
                counts["rows"] += job.rows
            else:
                counts[_COUNTER_OF.get(job.status, "failed")] += 1
        if self.stats is None:
            return
        self.stats.add(**counts)
        now = time.monotonic()
        if now - self._last_stats_log >= STATS_LOG_INTERVAL_S:
            self._last_stats_log = now
            log.info("engine stats %s", self.stats.snapshot())


_COUNTER_OF = {  # a failed Job's status -> its EngineStats counter; any other: "failed"
    DeadlineExceeded.http_status: "expired",
    NotFound.http_status: "not_found",
    InvalidInput.http_status: "invalid",
}


def _load(
    settings: Any, name: str, version: str, *, device: str, threads: int | None
) -> LoadedModel:
    return load_version(settings, name, version, device, threads=threads)


# ---------------------------------------------------------------------------- the server
def resolve_device(device: str, backend: str) -> str:
    """LitServe's accelerator for ``--device``: ``auto`` is CUDA when a GPU is visible and the
    served backend can use it (LitServe's own ``auto`` picks CUDA only once torch is imported,
    which an ONNX Runtime engine never does), else the CPU."""
    if device != "auto":
        return device
    from litserve.connector import check_cuda_with_nvidia_smi

    if check_cuda_with_nvidia_smi() == 0:
        return "cpu"
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return "cuda"


def build_server(
    name: str,
    version: str,
    *,
    device: str = "auto",
    stats: EngineStats | None = None,
    channel_host: str | None = None,
) -> ls.LitServer:
    """The LitServer for ``name@version`` with the model's batching settings (not started).

    Fails fast (NotFound, IntegrityError) when the version is unknown or its artifact is
    corrupt, before any worker process starts.
    """
    from kiln.settings import get_settings
    from kiln.store.artifacts import ArtifactStore
    from serving.loader import read_version

    settings = get_settings()
    record = read_version(settings, name, version)
    ArtifactStore.of(settings).fetch(record.artifact)  # pulled here if this host lacks it
    serving = record.serving
    api = KilnEngine(
        name,
        version,
        serving,
        stats,
        channel_host=channel_host,
        channel_ports=ChannelPorts() if channel_host is not None else None,
    )
    server = lit_server(api, accelerator=resolve_device(device, record.artifact.backend))
    log.info(
        "engine for %s@%s: backend %s/%s, max_batch_size %d, batch_timeout %.3f s, workers %d",
        name,
        version,
        record.artifact.backend,
        record.artifact.precision,
        serving.max_batch_size,
        serving.batch_timeout,
        serving.workers_per_device,
    )
    return server


def lit_server(
    api: KilnEngine, *, accelerator: str, devices: int | str = "auto"
) -> "KilnLitServer":
    """The LitServer around ``api`` (not started): Kiln's queues, no gzip, ``/stats`` when
    the engine counts (``api.stats``) and ``/channel`` when its workers listen for the
    gateway's frames. ``devices``: LitServe's (``auto``: every GPU that ``nvidia-smi`` lists)."""
    name, version, stats, ports = api.name, api.version, api.stats, api.channel_ports
    server = KilnLitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=api.serving.workers_per_device,
        timeout=False,
        fast_queue=False,
        disable_openapi_url=True,
        model_metadata={"model": name, "version": version},
    )
    # LitServe gzips every response over 1 kB; the gateway is on the same host, where
    # compressing costs more time than it saves.
    server.app.user_middleware = [
        m for m in server.app.user_middleware if getattr(m.cls, "__name__", "") != "GZipMiddleware"
    ]
    if stats is not None:

        async def engine_stats() -> Response:
            return Response(
                orjson.dumps({"model": name, "version": version, **stats.snapshot()}),
                media_type=JSON,
            )

        server.app.add_api_route("/stats", engine_stats, methods=["GET"])
    if ports is not None:
        host = api.channel_host

        async def channel_endpoints() -> Response:
            endpoints = [f"{host}:{port}" for port in ports.ports()]
            return Response(orjson.dumps({"endpoints": endpoints}), media_type=JSON)

        server.app.add_api_route("/channel", channel_endpoints, methods=["GET"])
    return server


class KilnLitServer(ls.LitServer):
    """LitServer with plain multiprocessing queues between its API server and its workers.

    LitServe 0.2.19 passes requests and responses through ``multiprocessing.Manager`` queues:
    every put and get is a round trip to the manager process. Pipe-backed queues (spawn
    context, so the spawned workers can receive them) skip that hop on every request.
    ``fast_queue`` (ZeroMQ) would be LitServe's own answer, but in 0.2.19 it is never enabled
    (``TransportConfig`` is built with a misspelt keyword), and forcing it fails at start.
    """

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        ctx = mp.get_context("spawn")
        for path in list(self.litapi_request_queues):
            self.litapi_request_queues[path] = ctx.Queue()
        self._transport = MPQueueTransport(manager, [ctx.Queue() for _ in range(num_api_servers)])
        return manager

    def _perform_graceful_shutdown(
        self, manager: Any, uvicorn_workers: dict[Any, Any], shutdown_reason: str = "normal"
    ) -> None:
        # LitServe calls terminate() on API server threads, which threads do not have; the
        # engine's process exits right after this instead (see the end of this module).
        processes = {
            key: worker
            for key, worker in uvicorn_workers.items()
            if not isinstance(worker, threading.Thread)
        }
        super()._perform_graceful_shutdown(manager, processes, shutdown_reason)


def configure_logging() -> None:
    """Engine logs to stderr (the supervisor's per-engine log file), once per process: the
    main process and each spawned inference worker."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.engine``: serve one model version until stopped; the exit code.

    0 after SIGTERM or Ctrl-C; the KilnError's exit code when the version cannot be served
    (unknown: 3, corrupt artifact: 5); 1 when a worker failed to start or died.
    """
    parser = argparse.ArgumentParser(
        prog="python -m serving.engine", description="Serve one Kiln model version (LitServe)."
    )
    parser.add_argument("--model", required=True, help="model name in the registry")
    parser.add_argument("--version", required=True, help="model version (semver)")
    parser.add_argument("--port", required=True, type=int, help="port to listen on")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the workers' channels bind and advertise, for gateways on any host (not "
        "loopback: only with KILN_ENGINE_SECRET set, which a channel's caller must prove); the "
        "HTTP API (/health, /stats, /channel, /predict) is for this host's reconciler and stays "
        "on 127.0.0.1",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (auto: CUDA when usable)",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and secret_from_env() is None:
        parser.error(f"--host {args.host} is reachable from other machines: set {SECRET_ENV}")
    configure_logging()
    # SIGTERM takes LitServe's Ctrl-C path, which stops its worker processes too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _watch_parent()
    code = 0
    try:
        server = build_server(
            args.model,
            args.version,
            device=args.device,
            stats=EngineStats(),
            channel_host=args.host,
        )
        heap.freeze("engine")  # imports and the server object live until exit
        # One API server, as a thread: no fork of a process that already runs threads, one
        # process fewer, and (measured) no slower than a forked API server process.
        server.run(
            host="127.0.0.1",
            port=args.port,
            num_api_servers=1,
            log_level="warning",
            generate_client_file=False,
            api_server_worker_type="thread",
            access_log=False,
        )
    except KilnError as exc:
        log.error("refusing to serve %s@%s: %s", args.model, args.version, exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        log.info("engine for %s@%s stopping", args.model, args.version)
    except Exception as exc:  # a worker failed its setup (it logged why) or died
        log.error(
            "engine for %s@%s stopped: an inference worker failed to start or died (%s: %s)",
            args.model,
            args.version,
            type(exc).__name__,
            exc,
        )
        code = 1
    _stop_children()
    return code


PARENT_ENV = "KILN_ENGINE_PARENT_PID"


def _watch_parent(period_s: float = 1.0) -> None:
    """Stop this engine's whole process group when the supervisor that started it is gone.

    A supervisor killed with SIGKILL cannot stop its engines; without this they would keep
    their ports and memory forever. ``start_engine_process`` records its pid in the child's
    environment; when our parent changes (we were re-parented), we terminate our group.
    """
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        log.error("supervisor (pid %d) is gone: stopping this engine", parent)
        signal_group(os.getpgid(0), signal.SIGTERM)
        time.sleep(5.0)
        signal_group(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


def _stop_children(timeout: float = 5.0) -> None:
    """Terminate LitServe's worker and manager processes that are still running (after a
    failed start LitServe leaves them behind)."""
    children = mp.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)
        if child.is_alive():
            child.kill()


# ------------------------------------------------------------------------ process control
def start_engine_process(
    name: str,
    version: str,
    port: int,
    *,
    env: dict[str, str],
    log_path: Path | None = None,
    device: str = "auto",
    host: str = "127.0.0.1",
) -> "subprocess.Popen[bytes]":
    """Start an engine in its own process group (so :func:`stop_engine_process` can stop its
    LitServe workers too), logging to ``log_path`` (appended) or inheriting our output."""
    command = [
        sys.executable,
        "-m",
        "serving.engine",
        "--model",
        name,
        "--version",
        version,
        "--port",
        str(port),
        "--device",
        device,
        "--host",
        host,
    ]
    return start_group(command, env={**env, PARENT_ENV: str(os.getpid())}, log_path=log_path)


def stop_engine_process(proc: "subprocess.Popen[bytes]", *, timeout_s: float = 10.0) -> int | None:
    """SIGTERM the engine's process group, SIGKILL whatever is left after ``timeout_s``
    seconds (with a warning); returns the engine's exit code."""
    stopped = stop_group(proc, timeout_s=timeout_s)
    if stopped.killed:
        log.warning(
            "engine process group %d did not stop in %.0f s; killing it", proc.pid, timeout_s
        )
    return stopped.returncode


if __name__ == "__main__":
    exit_code = main()
    # LitServe's API server thread is not a daemon and LitServe cannot stop it (it calls
    # Thread.terminate); the workers are stopped by now, so leave without waiting for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
