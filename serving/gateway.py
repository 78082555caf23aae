"""Kiln's API gateway: the Open Inference Protocol v2 REST API in front of the engines.

A plain ASGI app (run by :func:`serve` under uvicorn with :mod:`serving.http`'s limits). One
request goes: normalise the path -> liveness/readiness (open) or authenticate (401) -> authorise
(403) -> per-key rate limit (429 + Retry-After) -> read the body (capped by the protocol) and
decode JSON or Triton's binary extension (415 for any other content type) -> validate against
the model's input spec (400 naming the field) -> result cache -> admission (503 + Retry-After
when the model's queue is full) -> route (a pinned version, or the deployment's stable/canary
weights, sticky per ``X-Kiln-Routing-Key``) -> the least-loaded ready replica, with a circuit
breaker per replica and retries on another replica when an engine fails or dies mid-flight
(inference is idempotent; never on a 4xx, never past the deadline) -> fall back to the stable
version when the canary has no engine, then to the model's declared fallback model (marked in
``X-Kiln-Fallback``) -> encode the outputs (JSON, or binary when asked) -> metrics.

Lifecycle: ``create_app(settings)`` builds it; the ASGI lifespan starts the supervisor (which
reconciles engines to the registry and fills :class:`~serving.state.RoutingState`) and the
engine client; shutdown stops both, engines included.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from kiln.errors import (
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    KilnError,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from kiln.rollout.guardrails import disagreements
from kiln.settings import Settings
from kiln.spec import TensorSpec
from serving import heap, oip
from serving.auth import KeyStore, Principal, RateLimiter, authorize
from serving.channel import Channel, ChannelBroken, WireJob
from serving.inference_log import InferenceLog
from serving.metrics import GatewayMetrics
from serving.state import Replica, RoutingState, ServedModel

log = logging.getLogger("kiln.gateway")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]
ROUTING_KEY = b"x-kiln-routing-key"
DEADLINE_HEADER = b"x-kiln-deadline-ms"
MAX_ATTEMPTS = 4  # engine calls per candidate version (first try + retries)
_STATS_PATH = re.compile(r"^/kiln/models/([^/]+)/stats$")
INFERENCE_LOG_FLUSH_S = 10.0  # at shutdown, the inference log's writer gets this long
MAX_SHADOW_INFLIGHT = 64  # mirrored requests in flight at most; more are not mirrored
MAX_CHANNELS = 64  # connections to engine workers kept; idle ones of gone engines are dropped
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
# a full queue, no served version or no engine yet: come back in a second
RETRY_SHORTLY: Mapping[str, str] = {"Retry-After": "1"}
DEADLINE_BEFORE_ENGINE = "deadline passed before an engine could answer"
INTERNAL_ERROR = "internal error: see the gateway's log"  # any error not a kiln.errors one
# the errors of a request that reached a model: counted against its version (its canary falls
# back to the stable), inference-logged; an engine's other errors are the request's: not retried
REACHED_A_MODEL = (InferenceFailed, DeadlineExceeded)
# an engine's 4xx as the kiln.errors class of the same status (others: EngineRefused)
_ENGINE_REFUSALS: dict[int, type[KilnError]] = {400: InvalidInput, 404: NotFound, 413: TooLarge}


class EngineRefused(KilnError):
    """An engine's answer (a 4xx) whose status no :mod:`kiln.errors` class stands for, passed on
    with the engine's status and reason: ``http_status`` is set per error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class EngineUnavailable(Exception):
    """The engine could not answer (refused, died mid-flight, 502/503): retry elsewhere."""


class ClientGone(Exception):
    """The client disconnected (or its request was refused by the HTTP layer) before its body
    was read: there is no one to answer."""


@dataclass(frozen=True)
class ErrorResponse:
    """What the gateway answers for an error: its status, JSON body and extra headers."""

    status: int
    body: bytes
    headers: dict[str, str]


def error_response(error: KilnError) -> ErrorResponse:
    """The one mapping from a :mod:`kiln.errors` error to its HTTP answer: the class's status,
    ``{"error": message}`` (the Open Inference Protocol v2 error body) and the error's headers."""
    return ErrorResponse(
        status=error.http_status,
        body=orjson.dumps({"error": str(error)}),
        headers=dict(error.headers),
    )


@dataclass
class EngineAnswer:
    outputs: dict[str, np.ndarray]
    batch_size: int
    engine_ms: float


def normalise_path(path: str) -> str:
    """``//v2//models/x/`` and ``/v2/models/x`` are one route (and one rate-limit bucket)."""
    if "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    if path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return cast(bytes, value).decode("latin-1")
    return None


class Gateway:
    """The ASGI app. Routes are few and fixed, so they are matched by hand (no framework cost
    on the hot path)."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: RoutingState | None = None,
        keys: KeyStore | None = None,
        limiter: RateLimiter | None = None,
        supervise: bool = True,
        role: str = "all",
        address: str | None = None,
    ) -> None:
        self.settings = settings
        self.role = role  # kiln serve --role: all, gateway or reconciler (serving.supervisor)
        self.address = address
        self.state = state or RoutingState()
        self.metrics = GatewayMetrics()
        self.keys = keys or KeyStore(settings)
        self.limiter = limiter or RateLimiter(settings)
        self.metrics.rate_limit_local.set_function(
            lambda: float(self.limiter.degraded_since is not None)
        )
        self.supervise = supervise
        self.supervisor: Any = None
        self.alerts: Any = None  # serving.alerts.AlertMonitor, started with the supervisor
        self.channels: dict[str, Channel] = {}  # engine worker endpoint -> its connection
        secret = settings.engine_secret
        self._channel_secret = secret.get_secret_value().encode() if secret else None
        self._shadows: set[asyncio.Task[None]] = set()
        self.inference_log = InferenceLog(settings, self.metrics)  # sampled requests

    # --- lifespan
    async def startup(self) -> None:
        self.inference_log.start()
        if self.supervise:
            from serving.supervisor import Supervisor

            self.supervisor = Supervisor(
                self.settings, self.state, self.metrics, role=self.role, address=self.address
            )
            self.metrics.watch_engines(self.supervisor.engine_rows)
            await self.supervisor.start()
            from serving.alerts import AlertMonitor

            self.alerts = AlertMonitor(
                self.settings,
                self.state,
                self.metrics,
                describe=self.supervisor.describe,
                limiter=self.limiter,
                gateway=self.address,
            )
            await self.alerts.start()
        heap.freeze("gateway")  # what startup built lives until exit (serving/heap.py)

    async def shutdown(self) -> None:
        if self.alerts is not None:
            await self.alerts.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await asyncio.gather(*(c.close() for c in self.channels.values()))
        # last: requests answered while the engines drained are logged too
        await asyncio.to_thread(self.inference_log.stop, INFERENCE_LOG_FLUSH_S)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except KilnError as exc:
            await self._error(send, exc)
        except ClientGone:
            pass
        except Exception:  # never a traceback or a path in a body (docs/reliability.md)
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await self._error(send, KilnError(INTERNAL_ERROR))

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = normalise_path(scope["path"])
        method = scope["method"]
        if path == "/v2/health/live":
            await self._json(send, 200, {"live": True})
            return
        if path == "/v2/health/ready":
            ready, missing = self.state.all_ready()
            body = {"ready": ready} if ready else {"ready": False, "waiting_for": missing}
            await self._json(send, 200 if ready else 503, body)
            return
        principal = await self.keys.authenticate(_header(scope, b"authorization"))
        if principal is None:
            self.metrics.auth_failures.labels("401").inc()
            raise Unauthorized(
                "missing or unknown API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": 'Bearer realm="kiln"'},
            )
        retry_after = await self.limiter.hit(principal)
        if retry_after is not None:
            self.metrics.rate_limited.inc()
            raise RateLimited(
                f"rate limit of key {principal.prefix} exceeded; retry after {retry_after:g} s",
                headers={"Retry-After": str(int(retry_after))},
            )
        if path == "/metrics":
            self._method(method, "GET")
            await self._respond(
                send, 200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
            )
            return
        if path == "/v2":
            self._method(method, "GET")
            self._authorize(principal, "infer", None)
            await self._json(
                send, 200, {"name": SERVER_NAME, "version": _version(), "extensions": EXTENSIONS}
            )
            return
        match = _STATS_PATH.match(path)
        if match is not None:
            self._method(method, "GET")
            self._authorize(principal, "deploy", match.group(1))
            await self._json(send, 200, self._stats(match.group(1), scope))
            return
        match = _MODEL_PATH.match(path)
        if match is None:
            raise NotFound(f"no route {path}: see the Open Inference Protocol v2 routes")
        if self.role == "reconciler":
            raise NotFound(
                f"no route {path} on a reconciler (kiln serve --role reconciler): "
                "send model requests to a gateway"
            )
        name, version, action = match.group(1), match.group(2), match.group(3)
        self._authorize(principal, "infer", name)
        served = self._served(name, version)
        if action == "/infer":
            self._method(method, "POST")
            await self._infer(scope, receive, send, served, version)
        elif action == "/ready":
            self._method(method, "GET")
            chosen = version or served.stable or served.canary
            ok = chosen is not None and self.state.ready(name, chosen)
            await self._json(
                send, 200 if ok else 503, {"name": name, "version": chosen, "ready": ok}
            )
        else:
            self._method(method, "GET")
            await self._json(send, 200, self._metadata(served, version))

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise MethodNotAllowed(
                f"method {method} not allowed here: use {allowed}", headers={"Allow": allowed}
            )

    def _authorize(self, principal: Principal, scope: str, model: str | None) -> None:
        try:
            authorize(principal, scope, model)
        except Forbidden:
            self.metrics.auth_failures.labels("403").inc()
            raise

    def _served(self, name: str, version: str | None) -> ServedModel:
        served = self.state.models.get(name)
        if served is None:
            raise NotFound(f"model {name!r} is not deployed: see `kiln models` and `kiln deploy`")
        if version is not None and version not in served.specs:
            deployed = ", ".join(served.versions()) or "none"
            raise NotFound(f"version {version!r} of {name!r} is not served (served: {deployed})")
        return served

    def _metadata(self, served: ServedModel, version: str | None) -> dict[str, Any]:
        chosen = version or served.stable or served.canary
        spec = served.specs[chosen] if chosen else None

        def tensors(ts: list[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in ts]

        return {
            "name": served.name,
            "versions": served.versions(),
            "platform": f"kiln_{served.backends.get(chosen or '', 'unknown')}",
            "inputs": tensors(spec.served_inputs()) if spec else [],
            "outputs": tensors(spec.outputs) if spec else [],
        }

    def _stats(self, name: str, scope: Scope) -> dict[str, Any]:
        """Per-version figures since ``?since=`` (unix seconds; default: all kept), for the
        rollout's guardrails and ``kiln status``."""
        served = self.state.models.get(name)
        if served is None:
            raise NotFound(f"model {name!r} is not deployed")
        numbers: dict[str, float] = {}
        query = scope.get("query_string", b"").decode("latin-1")
        for part in filter(None, query.split("&")):
            key, _, value = part.partition("=")
            if key in ("since", "over_ms"):
                try:
                    numbers[key] = float(value)
                except ValueError:
                    raise InvalidInput(
                        f"{key} must be a number (since: unix seconds; over_ms: milliseconds)"
                    ) from None
        since = numbers.get("since", 0.0)
        versions = {
            version: self.state.window(name, version).summary(since, numbers.get("over_ms"))
            for (model, version) in list(self.state.windows)
            if model == name
        }
        return {
            "model": name,
            "stable": served.stable,
            "canary": served.canary,
            "canary_weight": served.canary_weight,
            "shadow_share": served.shadow_share,
            "ready": {v: self.state.ready(name, v) for v in served.versions()},
            "now": time.time(),
            "since": since,
            "versions": versions,
        }

    # --- inference
    async def _read_body(self, receive: Receive) -> bytes:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, served: ServedModel, pinned: str | None
    ) -> None:
        start = time.perf_counter()
        settings = served.settings
        header_length = _header(scope, b"inference-header-content-length")
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type not in ("", "application/json", "application/octet-stream"):
            raise UnsupportedMediaType(
                f"content type {content_type!r} is not accepted: send JSON, or "
                "the binary tensor extension with Inference-Header-Content-Length",
            )
        if content_type == "application/octet-stream" and header_length is None:
            raise UnsupportedMediaType(
                "application/octet-stream needs the Inference-Header-Content-"
                "Length header (Triton's binary tensor extension)",
            )
        encoding = (_header(scope, b"content-encoding") or "identity").lower()
        if encoding != "identity":
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed"
            )
        body = await self._read_body(receive)
        deadline = self._deadline(scope, settings.deadline_ms)
        version = pinned or served.pick_version(_header(scope, ROUTING_KEY))
        if version is None:
            raise Unavailable(
                f"model {served.name!r} has no served version yet", headers=RETRY_SHORTLY
            )
        spec = served.specs[version]
        try:
            doc, tail = oip.parse(body, header_length)
            req = oip.request(doc, tail, spec.served_inputs(), max_rows=settings.max_request_batch)
        except oip.BadRequest as exc:
            self.metrics.requests.labels(served.name, version, "400").inc()
            raise InvalidInput(str(exc)) from None

        cache = self.state.cache_for(served)
        cache_key = _cache_key(version, req.inputs) if cache is not None else None
        cached = cache.get(cache_key) if cache is not None and cache_key else None
        if cached is not None:
            self.metrics.cache_hits.labels(served.name).inc()
            await self._answer(send, served.name, version, req, cached, start, {})
            return

        inflight = self.state.inflight.get(served.name, 0)
        if inflight >= settings.max_queue:
            self.metrics.rejected.labels(served.name, "queue_full").inc()
            self.metrics.requests.labels(served.name, version, "503").inc()
            raise Unavailable(
                f"model {served.name!r} is at its queue limit "
                f"({settings.max_queue}); retry shortly",
                headers=RETRY_SHORTLY,
            )
        self.state.inflight[served.name] = inflight + 1
        self.metrics.inflight.labels(served.name).inc()
        try:
            answer, used, fallback = await self._dispatch(
                served, version, pinned, req, deadline, start
            )
        except KilnError as exc:
            self.metrics.requests.labels(served.name, version, str(exc.http_status)).inc()
            if isinstance(exc, REACHED_A_MODEL):  # logged, with no output
                self.inference_log.offer(
                    served.name,
                    version,
                    req.inputs,
                    {},
                    (time.perf_counter() - start) * 1000,
                    exc.http_status,
                )
            raise
        finally:
            self.state.inflight[served.name] -= 1
            self.metrics.inflight.labels(served.name).dec()
        self.state.window(*used).record((time.perf_counter() - start) * 1000, True)
        if (
            pinned is None
            and not fallback
            and served.canary is not None
            and used == (served.name, served.stable)
            and served.shadow_share > 0
            and len(self._shadows) < MAX_SHADOW_INFLIGHT
            and random.random() < served.shadow_share
        ):
            self._mirror(served, served.canary, req, answer, deadline)
        if cache is not None and cache_key and not fallback:
            cache.put(cache_key, answer)
        extra = {"X-Kiln-Fallback": fallback} if fallback else {}
        await self._answer(send, used[0], used[1], req, answer, start, extra)

    def _deadline(self, scope: Scope, default_ms: float) -> float:
        """Monotonic deadline: the model's default, shortened by ``X-Kiln-Deadline-Ms``."""
        ms = default_ms
        asked = _header(scope, DEADLINE_HEADER)
        if asked is not None:
            try:
                ms = min(ms, float(asked))
            except ValueError:
                raise InvalidInput("X-Kiln-Deadline-Ms must be a number of milliseconds") from None
            if not ms > 0:
                raise InvalidInput("X-Kiln-Deadline-Ms must be positive")
        return time.monotonic() + ms / 1000

    def _candidates(
        self, served: ServedModel, version: str, pinned: str | None
    ) -> list[tuple[str, str, str]]:
        """(model, version, fallback reason) in the order to try them."""
        order = [(served.name, version, "")]
        if pinned is None and version != served.stable and served.stable is not None:
            order.append(
                (
                    served.name,
                    served.stable,
                    f"canary {version} unavailable or failed; served by stable {served.stable}",
                )
            )
        if pinned is None and served.previous is not None:
            order.append(
                (
                    served.name,
                    served.previous,
                    f"stable {served.stable} warming up; served by the previous stable "
                    f"{served.previous}",
                )
            )
        fallback = served.settings.fallback_model
        if pinned is None and fallback:
            other = self.state.models.get(fallback)
            if other is not None and other.stable is not None:
                order.append(
                    (
                        other.name,
                        other.stable,
                        f"{served.name} unavailable; served by {other.name}@{other.stable}",
                    )
                )
        return order

    async def _dispatch(
        self,
        served: ServedModel,
        version: str,
        pinned: str | None,
        req: oip.InferRequest,
        deadline: float,
        start: float,
    ) -> tuple[EngineAnswer, tuple[str, str], str]:
        """The first candidate that answers. A canary that fails on a request (a 5xx from its
        model, NaN outputs, its deadline) has that request answered by the stable version
        (inference is idempotent), and the failure is counted against the canary's window,
        which is what its guardrails judge."""
        last = "no engine is ready"
        candidates = self._candidates(served, version, pinned)
        for index, (model, candidate, reason) in enumerate(candidates):
            if reason:
                other = self.state.models.get(model)
                spec = other.specs.get(candidate) if other else None
                if spec is None or [t.name for t in spec.served_inputs()] != list(req.inputs):
                    continue  # a fallback must take the same inputs
            try:
                answer = await self._call_version(model, candidate, req, deadline)
            except EngineUnavailable as exc:
                last = str(exc)
                continue
            except REACHED_A_MODEL as exc:
                self.state.window(model, candidate).record(
                    (time.perf_counter() - start) * 1000, False
                )
                is_canary = (
                    model == served.name
                    and candidate == served.canary
                    and candidate != served.stable
                )
                if is_canary and index + 1 < len(candidates) and time.monotonic() < deadline:
                    last = str(exc)
                    continue
                raise
            if reason:
                self.metrics.fallbacks.labels(
                    served.name, "canary" if model == served.name else "fallback_model"
                ).inc()
            return answer, (model, candidate), reason
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(DEADLINE_BEFORE_ENGINE)
        self.metrics.rejected.labels(served.name, "no_engine").inc()
        raise Unavailable(
            f"model {served.name!r} has no engine able to answer ({last}); retry shortly",
            headers=RETRY_SHORTLY,
        )

    def _mirror(
        self,
        served: ServedModel,
        canary: str,
        req: oip.InferRequest,
        answer: EngineAnswer,
        deadline: float,
    ) -> None:
        """Shadow traffic: send the same request to the canary in the background, discard its
        answer, record its latency or failure and how far its outputs differ from the stable's."""
        task = asyncio.get_running_loop().create_task(
            self._shadow(served.name, served.task, canary, req, answer, deadline)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self,
        name: str,
        task: str,
        canary: str,
        req: oip.InferRequest,
        answer: EngineAnswer,
        deadline: float,
    ) -> None:
        """Mirrored calls count only as comparisons (a failed one: every row disagrees), not
        as the canary's requests: they arrive in bursts right after the stable's answers, so
        their latency is not what a client of the canary sees."""
        window = self.state.window(name, canary)
        rows = req.rows
        try:
            mirrored = await self._call_version(name, canary, req, deadline)
        except REACHED_A_MODEL:
            window.record_shadow(rows, rows)
            return
        except Exception:  # an engine that is not up yet: nothing to compare
            return
        out = next((n for n in answer.outputs if n in mirrored.outputs), None)
        if out is not None:
            window.record_shadow(*disagreements(task, answer.outputs[out], mirrored.outputs[out]))

    async def _call_version(
        self, model: str, version: str, req: oip.InferRequest, deadline: float
    ) -> EngineAnswer:
        """Call one replica of ``model@version``; on failure retry another, within the deadline."""
        job = WireJob(
            model=model,
            version=version,
            deadline=time.time() + (deadline - time.monotonic()),
            inputs=req.inputs,
            outputs=req.outputs,
            rows=req.rows,
        )
        tried: set[int] = set()

        async def attempt_once() -> EngineAnswer:
            replica = self.state.pick_replica(model, version, tried)
            if replica is None and tried:  # every replica tried once: any available one
                replica = self.state.pick_replica(model, version, set())
            if replica is None:
                raise EngineUnavailable(f"no ready engine for {model}@{version}")
            tried.add(id(replica))
            return await self._call_replica(replica, job, deadline)

        try:  # the common case: the first replica answers (no retry machinery built)
            return await attempt_once()
        except EngineUnavailable:
            # no engine at all (warming up, breaker open): retrying in milliseconds would not
            # change that, so go to the next candidate (stable, previous stable, fallback) now
            if time.monotonic() >= deadline or not tried:
                raise
        retrying = AsyncRetrying(
            stop=stop_after_attempt(MAX_ATTEMPTS - 1)
            | stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=wait_exponential_jitter(initial=0.005, max=0.1, jitter=0.01),
            retry=retry_if_exception_type(EngineUnavailable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                self.metrics.retries.labels(model, version).inc()
                return await attempt_once()
        raise EngineUnavailable(f"no ready engine for {model}@{version}")  # pragma: no cover

    def _channel(self, replica: Replica) -> Channel:
        """The connection to the least busy worker of ``replica`` (made on first use), sending
        up to the model's ``max_batch_size`` rows per frame."""
        served = self.state.models.get(replica.model)
        max_rows = served.settings.max_batch_size if served is not None else 1
        best: Channel | None = None
        for endpoint in replica.channels:
            channel = self.channels.get(endpoint)
            if channel is None or channel.closed:
                if len(self.channels) >= MAX_CHANNELS:
                    self._forget_idle_channels()
                channel = self.channels[endpoint] = Channel(
                    endpoint, max_rows=max_rows, secret=self._channel_secret
                )
            channel.max_rows = max_rows
            if best is None or channel.busy < best.busy:
                best = channel
        if best is None:
            raise EngineUnavailable(f"engine {replica.url} names no channel endpoint")
        return best

    def _forget_idle_channels(self) -> None:
        """Endpoints of engines long gone: drop the unconnected, idle ones."""
        for endpoint, channel in list(self.channels.items()):
            if not channel.connected and not channel.busy:
                del self.channels[endpoint]

    async def _call_replica(self, replica: Replica, job: WireJob, deadline: float) -> EngineAnswer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(DEADLINE_BEFORE_ENGINE)
        channel = self._channel(replica)
        replica.outstanding += 1
        try:
            answer = await channel.call(job, timeout=remaining)
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while the engine was working") from None
        except ChannelBroken as exc:
            replica.failed(time.monotonic())
            raise EngineUnavailable(str(exc)) from None
        finally:
            replica.outstanding -= 1
        if answer.status in (502, 503):
            replica.failed(time.monotonic())
            raise EngineUnavailable(f"engine {replica.url} answered {answer.status}")
        replica.succeeded()
        if answer.status != 200:
            raise _engine_error(answer.status, answer.detail[:500])
        return EngineAnswer(
            outputs=answer.outputs, batch_size=answer.batch_size, engine_ms=answer.engine_ms
        )

    async def _answer(
        self,
        send: Send,
        model: str,
        version: str,
        req: oip.InferRequest,
        answer: EngineAnswer,
        start: float,
        extra: dict[str, str],
    ) -> None:
        outputs = answer.outputs
        if req.outputs is not None:
            missing = [n for n in req.outputs if n not in outputs]
            if missing:
                raise InvalidInput(
                    f"unknown output {missing[0]!r}: the model returns {', '.join(outputs)}"
                )
            outputs = {n: outputs[n] for n in req.outputs}
        binary = set(outputs) if req.binary_default else req.binary_outputs & set(outputs)
        body, header_length = oip.response(
            model=model, version=version, request_id=req.request_id, outputs=outputs, binary=binary
        )
        headers = {"Kiln-Model-Version": version, **extra}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        content_type = (
            "application/octet-stream" if header_length is not None else "application/json"
        )
        await self._respond(send, 200, body, content_type, headers)
        elapsed = time.perf_counter() - start
        self.inference_log.offer(model, version, req.inputs, outputs, elapsed * 1000, 200)
        m = self.metrics
        m.requests.labels(model, version, "200").inc()
        m.latency.labels(model, version, "gateway").observe(elapsed)
        if answer.engine_ms:
            m.latency.labels(model, version, "engine").observe(answer.engine_ms / 1000)
        if answer.batch_size:
            m.batch.labels(model, version).observe(answer.batch_size)

    # --- responses
    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def _json(
        self, send: Send, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        await self._respond(send, status, orjson.dumps(doc), "application/json", headers)

    async def _error(self, send: Send, error: KilnError) -> None:
        answer = error_response(error)
        try:
            await self._respond(
                send, answer.status, answer.body, "application/json", answer.headers
            )
        except Exception:  # the client is gone or a response already started
            pass


def _engine_error(status: int, detail: str) -> KilnError:
    """The error for an engine's answer other than 200 (502 and 503 never get here: they are
    :class:`EngineUnavailable`). A 504 is the deadline passing in the engine's queue, any other
    5xx the model failing on this request; the engine's other answers (its 4xx) pass on with
    their status and the engine's reason."""
    if status == 504:
        return DeadlineExceeded("deadline passed while the request waited in the engine")
    if status >= 500:
        return InferenceFailed(f"the model failed on this request: {detail}")
    known = _ENGINE_REFUSALS.get(status)
    return known(detail) if known is not None else EngineRefused(status, detail)


def _cache_key(version: str, inputs: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(version.encode())
    for name, array in inputs.items():
        digest.update(name.encode())
        digest.update(str(array.shape).encode())
        digest.update(
            repr(array.tolist()).encode()
            if array.dtype == object
            else np.ascontiguousarray(array).tobytes()
        )
    return digest.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "0"


def create_app(settings: Settings, **kwargs: Any) -> Gateway:
    return Gateway(settings, **kwargs)


def serve(
    settings: Settings, *, port: int | None = None, host: str | None = None, role: str = "all"
) -> None:
    """Run the gateway (and its supervisor) under uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from serving.http import HttpLimits, guarded_protocol

    bind = host or settings.gateway_host
    port = settings.gateway_port if port is None else port
    app = create_app(settings, role=role, address=f"{bind}:{port}")
    config = uvicorn.Config(
        app,
        host=bind,
        port=port,
        http=guarded_protocol(HttpLimits(max_body_bytes=settings.max_body_bytes)),
        loop="uvloop",
        lifespan="on",
        log_level="warning",
        access_log=False,
        ws="none",  # no WebSocket route: an Upgrade request is read as plain HTTP
        timeout_keep_alive=5,
        limit_concurrency=settings.gateway_max_connections,
        server_header=False,
        date_header=False,
    )
    uvicorn.Server(config).run()
