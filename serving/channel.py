"""The gateway's channel to an inference worker: one TCP connection, frames both ways.

Each LitServe inference worker of an engine listens on a port of its own
(:class:`ChannelServer`, started by the engine's ``setup`` once the model is warm; the engine's
``GET /channel`` lists the endpoints) and runs every frame it receives through the engine's
own batch path (:meth:`serving.engine.KilnEngine.answer_frame`: check, deadline, one model call
per input shape, split, non-finite check), so a frame skips LitServe's HTTP route and its queue
to the worker, the two hops that cost most of a request's CPU (bench/profiles/summary.md).

The gateway's end, :class:`Channel`, coalesces: a request for a worker that has no frame in
flight is sent at once, alone (batching never waits for company); requests that arrive while
one is in flight wait and go together, up to the model's ``max_batch_size`` rows, as soon as
the answer is back. That is dynamic batching with a queue delay of zero, at the first hop that
sees concurrent requests, as Triton's and Ray Serve's batchers do it. Each caller gets its own
answer (status, rows) back. A connection that breaks fails what it carried with
:class:`~serving.gateway.EngineUnavailable`-like errors the gateway retries on another replica.

Frames are :mod:`serving.wire`'s (JSON header + raw tensor bytes; nothing pickled), over plain
TCP, so the worker may be on another machine: it binds the address the engine was given. With a
shared secret (``KILN_ENGINE_SECRET``, required for an address other machines reach) a
connection starts with a challenge: the worker sends 16 random bytes, the gateway answers their
HMAC-SHA256 under the secret, and a wrong or late answer closes the connection before any frame
is read. The secret itself never crosses the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.wire import (
    FRAME_HEAD,
    FrameError,
    frame,
    frame_length,
    read_header,
    read_tensors,
    tensor_entries,
)

log = logging.getLogger("kiln.channel")
CONNECT_TIMEOUT_S = 2.0
NONCE_BYTES = 16  # the worker's challenge; the answer is an HMAC-SHA256 (32 bytes)
SECRET_ENV = "KILN_ENGINE_SECRET"  # kiln.settings.Settings.engine_secret
FramedHandler = Callable[[bytes, int], list[bytes]]


def secret_from_env() -> bytes | None:
    """The channel secret of this process (an engine worker reads it here, not from
    ``kiln.settings``, which it does not import when a loader is given)."""
    raw = os.environ.get(SECRET_ENV)
    return raw.encode() if raw else None


def _proof(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


# ------------------------------------------------------------------------ engine side
class ChannelServer:
    """A worker's listener: each accepted connection is served by a thread of its own that
    reads a frame, hands it to ``handler`` (which returns the answer frame's pieces) and writes
    the answer, in order. A broken frame closes that connection only."""

    def __init__(
        self, host: str, handler: FramedHandler, port: int = 0, *, secret: bytes | None = None
    ) -> None:
        self.handler = handler
        self.secret = secret
        self.sock = socket.create_server((host, port), backlog=64)
        self.host, self.port = self.sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, name="kiln-channel", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ChannelServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._serve, args=(conn, peer), name="kiln-channel-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        prefix = bytearray(FRAME_HEAD.size)
        with conn:
            try:
                if self.secret is not None and not self._challenge(conn):
                    log.warning("refused a channel from %s: wrong or missing proof", peer)
                    return
                while _read_exactly(conn, prefix):
                    length, head = frame_length(bytes(prefix))
                    body = bytearray(length)
                    if not _read_exactly(conn, body):
                        return
                    conn.sendmsg(self.handler(bytes(body), head))
            except FrameError as exc:
                log.error("closing the channel from %s: %s", peer, exc)
            except OSError:  # the gateway went away
                return
            except Exception:  # a bug: the gateway sees the connection close and retries
                log.exception("closing the channel from %s", peer)

    def _challenge(self, conn: socket.socket) -> bool:
        assert self.secret is not None
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.sendall(nonce)
        answer = bytearray(hashlib.sha256().digest_size)
        try:
            got = _read_exactly(conn, answer)
        except (OSError, TimeoutError):
            return False
        conn.settimeout(None)
        return got and hmac.compare_digest(bytes(answer), _proof(self.secret, nonce))

    def close(self) -> None:
        self.sock.close()


def _read_exactly(conn: socket.socket, buf: bytearray) -> bool:
    """Fill ``buf`` from ``conn``; False on a clean end of stream before its first byte."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise OSError("the channel closed inside a frame")
        got += n
    return True


# ----------------------------------------------------------------------- gateway side
class ChannelBroken(Exception):
    """The connection to a worker failed or closed: what it carried was not answered."""


@dataclass(frozen=True)
class WireJob:
    """One request for a worker: what the engine needs to run it."""

    model: str
    version: str
    deadline: float  # wall-clock epoch seconds
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int


@dataclass(frozen=True)
class Answer:
    """One job's answer: ``status`` 200 with ``outputs``, else ``detail`` says why."""

    status: int
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    detail: str = ""
    batch_size: int = 0
    engine_ms: float = 0.0


@dataclass
class _Pending:
    job: WireJob
    future: asyncio.Future[Answer]


class Channel:
    """The gateway's connection to one worker (``host:port``), coalescing concurrent jobs."""

    def __init__(self, endpoint: str, *, max_rows: int, secret: bytes | None = None) -> None:
        host, _, port = endpoint.rpartition(":")
        self.secret = secret  # answer the worker's challenge with it (ChannelServer)
        self.endpoint = endpoint
        self.host, self.port = host, int(port)
        self.max_rows = max_rows
        self.queue: deque[_Pending] = deque()
        self.inflight: dict[int, list[_Pending]] = {}
        self.frames_sent = 0
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[None] | None = None
        self.closed = False

    @property
    def connected(self) -> bool:
        return self._writer is not None

    @property
    def busy(self) -> int:
        """Jobs sent or waiting: how loaded this worker is, as the gateway sees it."""
        return len(self.queue) + sum(len(p) for p in self.inflight.values())

    async def call(self, job: WireJob, timeout: float | None = None) -> Answer:
        """Send ``job`` (alone now, or with the others waiting once the frame in flight is
        answered) and wait for its answer, at most ``timeout`` seconds (then TimeoutError).
        A job that times out or is cancelled before it was sent is never sent."""
        if self.closed:
            raise ChannelBroken(f"channel to {self.endpoint} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        pending = _Pending(job, future)
        self.queue.append(pending)
        # a timer on the future, not asyncio.wait_for: no task per request on the hot path
        timer = loop.call_later(timeout, _expire, future) if timeout is not None else None
        try:
            if self._writer is None:
                await self._connect()
            self._flush()
            return await future
        except (asyncio.CancelledError, ChannelBroken, TimeoutError):
            if pending in self.queue:
                self.queue.remove(pending)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S
                )
                if self.secret is not None:
                    try:
                        nonce = await asyncio.wait_for(
                            reader.readexactly(NONCE_BYTES), CONNECT_TIMEOUT_S
                        )
                    except (asyncio.IncompleteReadError, OSError, TimeoutError):
                        writer.close()
                        raise
                    writer.write(_proof(self.secret, nonce))
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                error = ChannelBroken(f"cannot connect to {self.endpoint}: {type(exc).__name__}")
                self._connecting.set_exception(error)
                self._connecting.exception()  # retrieved: the other waiters raise it themselves
                self._connecting = None
                raise error from None
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader))
            self._connecting.set_result(None)
            self._connecting = None
        else:
            await asyncio.shield(self._connecting)

    def _flush(self) -> None:
        """Send what waits as one frame, if no frame is in flight (one frame at a time: while
        the worker runs one, the next fills up)."""
        if self.inflight or not self.queue or self._writer is None:
            return
        batch: list[_Pending] = []
        rows = 0
        while self.queue and (not batch or rows + self.queue[0].job.rows <= self.max_rows):
            pending = self.queue.popleft()
            if pending.future.done():  # its caller gave up (deadline) before it was sent
                continue
            batch.append(pending)
            rows += pending.job.rows
        if not batch:
            return
        self._next_id += 1
        jobs, chunks = [], []
        for pending in batch:
            entries, data = tensor_entries(list(pending.job.inputs.items()))
            j = pending.job
            jobs.append(
                {
                    "model": j.model,
                    "version": j.version,
                    "deadline": j.deadline,
                    "outputs": j.outputs,
                    "inputs": entries,
                    "nbytes": sum(len(c) for c in data),
                }
            )
            chunks += data
        self.inflight[self._next_id] = batch
        self.frames_sent += 1
        self._writer.writelines(frame({"id": self._next_id, "jobs": jobs}, chunks))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: Exception = ChannelBroken(f"channel to {self.endpoint} closed")
        try:
            while True:
                prefix = await reader.readexactly(FRAME_HEAD.size)
                length, head = frame_length(prefix)
                body = await reader.readexactly(length)
                header, tail = read_header(body, head)
                batch = self.inflight.pop(int(header["id"]))
                answers = _answers(header, tail, len(batch))
                self._flush()  # the worker is free: send what waited before answering these
                for pending, answer in zip(batch, answers, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(answer)
        except (asyncio.IncompleteReadError, OSError) as exc:
            error = ChannelBroken(f"channel to {self.endpoint} broke: {type(exc).__name__}")
        except (FrameError, KeyError, TypeError, ValueError) as exc:
            log.error("bad answer frame from %s: %s", self.endpoint, exc)
            error = ChannelBroken(f"bad answer frame from {self.endpoint}")
        except asyncio.CancelledError:
            error = ChannelBroken(f"channel to {self.endpoint} closed")
            raise
        finally:
            self._drop(error)

    def _drop(self, error: Exception) -> None:
        """The connection is gone: fail what it carried and what waits; the next call
        reconnects (a restarted worker on the same endpoint is found again)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        waiting = [p for batch in self.inflight.values() for p in batch] + list(self.queue)
        self.inflight.clear()
        self.queue.clear()
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self) -> None:
        self.closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._drop(ChannelBroken(f"channel to {self.endpoint} closed"))


def _expire(future: asyncio.Future[Answer]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _answers(header: dict[str, Any], tail: memoryview, expected: int) -> list[Answer]:
    docs = header["answers"]
    if not isinstance(docs, list) or len(docs) != expected:
        raise ValueError(f"{expected} answers expected")
    answers, offset = [], 0
    for doc in docs:
        status = int(doc["status"])
        if status != 200:
            answers.append(Answer(status=status, detail=str(doc.get("detail", ""))))
            continue
        tensors, offset = read_tensors(doc["outputs"], tail, offset)
        answers.append(
            Answer(
                status=200,
                outputs=dict(tensors),
                batch_size=int(doc.get("batch_size", 0)),
                engine_ms=float(doc.get("engine_ms", 0.0)),
            )
        )
    return answers
