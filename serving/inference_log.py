"""The inference log: a sample of the gateway's answered requests, written to the registry's
``InferenceRecord`` table for monitoring (drift) and for replaying real traffic to a canary.

Serving never waits on it, and the gateway does almost none of its work. The event loop only
draws the sample and appends a reference to the request's arrays to a bounded deque (no lock,
no thread woken); a full one drops the record and counts it (``queue_full``). A feeder thread
wakes every :data:`FLUSH_S`, takes what is there (:data:`BATCH_ROWS` at most per frame) and
hands it, tensors as their raw bytes (:func:`pack`: a copy, no number formatting), through a
pipe to a writer process, ``python -m serving.inference_log``, which runs at a lower CPU
priority (nice +:data:`WRITER_NICE`), builds the rows and inserts them, one transaction per
frame, and answers each frame with one line: what it wrote per model, or how many it could not
write and why. Encoding JSON and SQL in its own process keeps that work off the gateway's GIL
and its CPU share: done in a gateway thread (the previous design), logging every request under
saturating load on two cores raised serving p99 by 4-36 % over three runs of ``bench/
serve_bench.py --sections log-overhead``; the feeder's part is about 3 us a record. KServe's
request logger runs beside the model server for the same reason.

Faults: a failed write is counted (``write_error``) and logged by the writer, which goes on; a
writer that dies is started again (at most once per :data:`RESPAWN_S`: records that arrive
before then wait in the deque for it), what it had been sent and not answered counted as
``write_error``; while the pipe is full (the registry stalled), the feeder waits, the deque
fills and the event loop drops. The writer purges records older than
``inference_log_retention_days`` at most every :data:`PURGE_EVERY_S`; it ends when its stdin
closes, after writing what it was sent, so a gateway killed outright leaves no writer behind.

Lifecycle: ``InferenceLog(settings, metrics)`` (cheap, no thread) -> ``start()`` (the feeder,
which starts the writer; nothing at a sample of 0) -> ``offer(...)`` per answered request, from
the event loop (the one producer: the bound holds because only it appends) -> ``stop(timeout_s)``
at the gateway's shutdown: what is queued is sent and written within the time cap, the rest
counted as dropped (``shutdown``). ``write`` and ``purge`` do the same work in the calling
process (tests, and the writer itself).

What is logged: 200s, and the failures that reached a model (500, 504) with their status and
no output; refusals (4xx, 429, 503) are not. ``batch_id`` stays None: the engine's answer
carries its batch's size, not an identifier of the batch, and one is not made up here.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import numpy as np
import orjson

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.records import NATIVE, datatype_of, encode
from kiln.settings import Settings
from serving import heap
from serving.metrics import GatewayMetrics

log = logging.getLogger("kiln.inference_log")

BATCH_ROWS = 500  # records per frame, and so per insert transaction, at most
FLUSH_S = 0.1  # the feeder wakes this often: a record waits about this long
PURGE_EVERY_S = 300.0  # retention runs at most this often
WRITER_NICE = 10  # the writer's niceness above the gateway's (lower CPU priority)
RESPAWN_S = 1.0  # a writer that died is started again at most this often
FRAME = struct.Struct("!II")  # a frame's header: lengths of its meta (JSON) and its data
RAW_KINDS = frozenset("biuf")  # numeric arrays cross the pipe as raw bytes


@dataclass(frozen=True, slots=True)
class Pending:
    """One sampled request as the event loop hands it over: references, not copies (the
    arrays are not changed after the answer)."""

    model: str
    version: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    latency_ms: float
    status: int
    at: float  # unix seconds when it was answered
    batch_id: str | None = None


@dataclass(slots=True)
class _Writer:
    """One writer process and what it was sent and has answered (records)."""

    proc: subprocess.Popen[bytes]
    reader: threading.Thread | None = None
    sent: int = 0
    answered: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def unanswered(self) -> int:
        return max(0, self.sent - self.answered)


class InferenceLog:
    """The gateway's sampled request log (see the module docstring for its lifecycle)."""

    def __init__(
        self, settings: Settings, metrics: GatewayMetrics, *, sample: float | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sample = settings.inference_log_sample if sample is None else sample
        self.capacity = settings.inference_log_queue
        self._pending: deque[Pending] = deque()  # appended by the event loop, popped by the feeder
        self._stopping = threading.Event()
        self._deadline = float("inf")  # monotonic; set by stop()
        self._thread: threading.Thread | None = None
        self._writer: _Writer | None = None
        self._last_spawn = -RESPAWN_S
        self._last_purge = 0.0  # monotonic, for purge() called in this process
        metrics.log_queue.set_function(self.depth)  # read at scrape time only

    # --- the event loop's side: a draw and an enqueue, nothing else
    def offer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        latency_ms: float,
        status: int,
        batch_id: str | None = None,
    ) -> None:
        """Log this answered request if it falls in the sample; never blocks."""
        sample = self.sample
        if sample <= 0.0 or (sample < 1.0 and random.random() >= sample):
            return
        if len(self._pending) >= self.capacity:
            self.metrics.log_dropped.labels("queue_full").inc()
            return
        self._pending.append(
            Pending(model, version, inputs, outputs, latency_ms, status, time.time(), batch_id)
        )

    def depth(self) -> int:
        """Records waiting for the feeder."""
        return len(self._pending)

    # --- lifecycle
    def start(self) -> None:
        """Start the feeder thread, which starts the writer (not at a sample of 0: nothing
        would be offered)."""
        if self.sample <= 0.0 or self._thread is not None:
            return
        self._stopping.clear()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="kiln-inference-log", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send and write what is queued (within ``timeout_s``), then end the feeder and the
        writer; records not written by then are counted as dropped (``shutdown``)."""
        thread = self._thread
        if thread is None:
            return
        self._deadline = time.monotonic() + timeout_s
        self._stopping.set()
        thread.join(timeout=timeout_s)
        if thread.is_alive() and (writer := self._writer) is not None:
            writer.proc.kill()  # a writer stalled with the pipe full: the feeder's write ends
            thread.join(timeout=2.0)
        self._thread = None
        left = len(self._pending)
        if left:
            self._pending.clear()
            log.warning(
                "inference log: %d sampled requests not written at shutdown (the "
                "writer did not finish within %.0f s)",
                left,
                timeout_s,
            )
            self.metrics.log_dropped.labels("shutdown").inc(left)

    # --- the feeder thread
    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(FLUSH_S)
            while self._pending and time.monotonic() < self._deadline:
                if not self._writer_due():
                    break  # the writer died moments ago: the records wait for its restart
                self._send(self._take(BATCH_ROWS))
            if stopping:
                self._finish()
                return

    def _take(self, n: int) -> list[Pending]:
        """Up to ``n`` of the oldest waiting records."""
        batch: list[Pending] = []
        pop = self._pending.popleft
        try:
            for _ in range(n):
                batch.append(pop())
        except IndexError:
            pass
        return batch

    def _writer_due(self) -> bool:
        """Whether a frame can go now: the writer runs, or its (re)start is due
        (:data:`RESPAWN_S` since the last one)."""
        writer = self._writer
        if writer is not None and writer.proc.poll() is None:
            return True
        return time.monotonic() - self._last_spawn >= RESPAWN_S

    def _send(self, batch: list[Pending]) -> None:
        """One frame to the writer (started or restarted here); a batch that cannot be sent is
        counted as dropped (``write_error``)."""
        writer = self._writer
        if writer is None or writer.proc.poll() is not None:
            writer = self._spawn()
        if writer is None:
            self._dropped(len(batch), "the writer process could not be started")
            return
        try:
            frame = pack(batch)
        except Exception as exc:  # an array the log cannot carry: never the gateway's problem
            self._dropped(len(batch), f"{type(exc).__name__}: {exc}")
            return
        try:
            assert writer.proc.stdin is not None
            writer.proc.stdin.write(frame)  # blocks while the pipe is full: the deque fills
            writer.proc.stdin.flush()
            writer.sent += len(batch)
        except (OSError, ValueError) as exc:  # the writer died: its reader counts the unanswered
            if writer.done.is_set():  # ... unless it has counted already
                self._dropped(len(batch), f"the writer process is gone ({type(exc).__name__})")
            else:
                writer.sent += len(batch)

    def _spawn(self) -> _Writer | None:
        """Start a writer (the previous one, if any, has exited: its reader counts what it
        did not answer); the feeder starts one only when :meth:`_writer_due`."""
        self._last_spawn = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "serving.inference_log"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert proc.stdin is not None
            proc.stdin.write(
                orjson.dumps(
                    {
                        "db_url": self.settings.db_url,
                        "retention_days": self.settings.inference_log_retention_days,
                    }
                )
                + b"\n"
            )
            proc.stdin.flush()
        except OSError as exc:
            log.warning("inference log: cannot start the writer process: %s", exc)
            self._writer = None
            return None
        writer = _Writer(proc)
        writer.reader = threading.Thread(
            target=self._read, args=(writer,), name="kiln-inference-log-answers", daemon=True
        )
        writer.reader.start()
        self._writer = writer
        return writer

    def _read(self, writer: _Writer) -> None:
        """The writer's answers -> metrics; at its exit, what it never answered is dropped."""
        assert writer.proc.stdout is not None
        for line in writer.proc.stdout:
            try:
                answer = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            for model, n in answer.get("written", {}).items():
                self.metrics.log_records.labels(model).inc(n)
                writer.answered += n
            if failed := answer.get("failed", 0):
                self.metrics.log_dropped.labels("write_error").inc(failed)
                writer.answered += failed
        code = writer.proc.wait()
        lost = writer.unanswered()
        if lost:
            reason = "shutdown" if self._stopping.is_set() else "write_error"
            self.metrics.log_dropped.labels(reason).inc(lost)
            log.warning(
                "inference log: the writer process exited (code %s) with %d sampled "
                "requests not written",
                code,
                lost,
            )
        writer.done.set()

    def _finish(self) -> None:
        """Close the writer's stdin (it writes what it has, then exits) and wait for it until
        the deadline; a writer still busy then is killed (its reader counts the rest)."""
        writer = self._writer
        if writer is None:
            return
        try:
            assert writer.proc.stdin is not None
            writer.proc.stdin.close()
        except OSError:
            pass
        if not writer.done.wait(max(0.0, self._deadline - time.monotonic())):
            writer.proc.kill()
            writer.done.wait(2.0)
        self._writer = None

    def _dropped(self, n: int, why: str) -> None:
        self.metrics.log_dropped.labels("write_error").inc(n)
        log.warning("inference log: %d sampled requests dropped: %s", n, why)

    # --- the same work in this process (tests; the writer process runs these)
    def write(self, batch: list[Pending]) -> int:
        """Insert ``batch`` in one transaction here; on any error count it as dropped
        (``write_error``) and log it."""
        try:
            written = insert(self.settings.db_url, [to_row(p) for p in batch])
        except Exception as exc:
            self._dropped(len(batch), f"the write failed: {type(exc).__name__}: {str(exc)[:300]}")
            return 0
        for model, n in written.items():
            self.metrics.log_records.labels(model).inc(n)
        return len(batch)

    def purge(self, now: datetime | None = None) -> int:
        """Retention: delete records older than ``inference_log_retention_days``."""
        self._last_purge = time.monotonic()
        return purge(self.settings.db_url, self.settings.inference_log_retention_days, now)


# --- the frame: the feeder packs it in the gateway, the writer unpacks it
def pack(batch: list[Pending]) -> bytes:
    """Records -> one frame: a JSON list of their fields and tensor specs, then the numeric
    tensors' bytes (``[name, datatype, dtype, shape, offset]``; a BYTES tensor goes in its
    record form, ``[name, doc]``). About 4 us a digits record (the writer's side is ~10x)."""
    meta: list[list[Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for p in batch:
        sides: list[list[Any]] = []
        for tensors in (p.inputs, p.outputs):
            specs: list[Any] = []
            for name, value in tensors.items():
                array = np.asarray(value)
                if array.dtype.kind in RAW_KINDS:
                    raw = np.ascontiguousarray(array).tobytes()
                    specs.append(
                        [name, datatype_of(array), array.dtype.str, list(array.shape), offset]
                    )
                    chunks.append(raw)
                    offset += len(raw)
                else:
                    specs.append([name, encode({name: array})[name]])
            sides.append(specs)
        meta.append([p.model, p.version, p.latency_ms, p.status, p.batch_id, p.at, *sides])
    head = orjson.dumps(meta)
    return FRAME.pack(len(head), offset) + head + b"".join(chunks)


@functools.cache
def _dtype(dtype_str: str) -> np.dtype[Any]:
    dtype = np.dtype(dtype_str)
    if dtype.kind not in RAW_KINDS:
        raise ValueError(f"dtype {dtype_str!r} is not numeric")
    return dtype


def unpack(meta: list[list[Any]], data: bytes) -> list[dict[str, Any]]:
    """A frame's parts -> ``InferenceRecord`` rows, as :func:`to_row` makes them (numeric
    ``data`` as flat read-only views of ``data``)."""
    rows: list[dict[str, Any]] = []
    for model, version, latency_ms, status, batch_id, at, ins, outs in meta:
        docs: list[dict[str, Any]] = []
        for specs in (ins, outs):
            doc: dict[str, Any] = {}
            for spec in specs:
                if len(spec) == 2:  # BYTES, in record form already
                    doc[spec[0]] = spec[1]
                    continue
                name, datatype, dtype_str, shape, offset = spec
                dtype = _dtype(dtype_str)
                flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
                doc[name] = (
                    {"datatype": datatype, "shape": shape, "data": flat}
                    if dtype in NATIVE
                    else encode({name: flat.reshape(shape)}, arrays=True)[name]
                )
            docs.append(doc)
        rows.append(
            {
                "model_name": model,
                "version": version,
                "input": docs[0],
                "output": docs[1],
                "latency_ms": round(latency_ms, 3),
                "status": status,
                "batch_id": batch_id,
                "timestamp": datetime.fromtimestamp(at, UTC),
            }
        )
    return rows


def to_row(p: Pending) -> dict[str, Any]:
    """A record -> an ``InferenceRecord`` row's columns (tensors in their OIP JSON form)."""
    return {
        "model_name": p.model,
        "version": p.version,
        "input": encode(p.inputs, arrays=True),
        "output": encode(p.outputs, arrays=True),
        "latency_ms": round(p.latency_ms, 3),
        "status": p.status,
        "batch_id": p.batch_id,
        "timestamp": datetime.fromtimestamp(p.at, UTC),
    }


def insert(db_url: str, rows: list[dict[str, Any]]) -> Tally[str]:
    """Rows into the registry in one transaction; rows written per model (raises on any
    error: nothing of them is written then)."""
    with session_scope(db_url) as session:
        crud.insert_inference_rows(session=session, rows=rows)
    return Tally(row["model_name"] for row in rows)


def purge(db_url: str, retention_days: float, now: datetime | None = None) -> int:
    """Delete records older than ``retention_days``; a failure is logged, not raised."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    try:
        with session_scope(db_url) as session:
            gone = crud.purge_inferences(session=session, older_than=cutoff)
    except Exception as exc:
        log.warning(
            "inference log: retention purge failed (retried in %.0f s): %s: %s",
            PURGE_EVERY_S,
            type(exc).__name__,
            str(exc)[:300],
        )
        return 0
    if gone:
        log.info("inference log: purged %d records older than %s", gone, cutoff.isoformat())
    return gone


# --- the writer process: ``python -m serving.inference_log`` (started by the feeder)
def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n) if n else b""
    return data if len(data) == n else None


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """A config line, then frames until EOF; one answer line per frame."""
    config = orjson.loads(stdin.readline())
    db_url, retention_days = config["db_url"], float(config["retention_days"])
    stop = threading.Event()

    def retention() -> None:  # beside the inserts, on its own timer (an idle log is purged too)
        while True:
            purge(db_url, retention_days)
            if stop.wait(PURGE_EVERY_S):
                return

    purger = threading.Thread(target=retention, name="kiln-inference-log-purge", daemon=True)
    purger.start()
    try:
        while (head := _read_exactly(stdin, FRAME.size)) is not None:
            meta_len, data_len = FRAME.unpack(head)
            meta, data = _read_exactly(stdin, meta_len), _read_exactly(stdin, data_len)
            if meta is None or data is None:
                break  # the gateway died mid-frame
            records = orjson.loads(meta)
            try:
                answer: dict[str, Any] = {"written": insert(db_url, unpack(records, data))}
            except Exception as exc:
                log.warning(
                    "inference log: %d sampled requests dropped, the write failed: %s: %s",
                    len(records),
                    type(exc).__name__,
                    str(exc)[:300],
                )
                answer = {"failed": len(records)}
            stdout.write(orjson.dumps(answer) + b"\n")
            stdout.flush()
    finally:
        stop.set()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # the gateway ends it by closing its stdin, after its own graceful shutdown: a SIGTERM or
    # SIGINT sent to the gateway's whole process group must not lose what is still in the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(WRITER_NICE)
    except OSError:  # pragma: no cover - a platform without nice: same priority then
        pass
    heap.freeze("inference-log writer")
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
