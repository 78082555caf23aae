"""What the gateway routes by: served models (from the registry) and engine replicas (from the
supervisor). One process holds both; the supervisor writes, the gateway reads. Swaps are whole
assignments on the event loop, so a request sees one consistent view.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from kiln.spec import ModelSpec
from serving.config import ServingSettings

BREAKER_FAILURES = 3  # consecutive failures that open an engine's circuit
BREAKER_OPEN_S = 2.0  # how long it stays open before one trial request (half-open)
WINDOW_SAMPLES = 50_000  # per version: the newest requests the rollout's verdicts can look at


@dataclass
class Replica:
    """One engine process serving one model version, as the gateway sees it."""

    model: str
    version: str
    url: str  # http://127.0.0.1:PORT
    pid: int = 0
    channels: list[str] = field(default_factory=list)  # its workers' host:port (serving.channel)
    ready: bool = False  # passed its health check after warm-up
    draining: bool = False  # being stopped: finish what it has, take nothing new
    outstanding: int = 0  # requests the gateway has sent it and not had back
    failures: int = 0  # consecutive failed calls (circuit breaker)
    open_until: float = 0.0  # circuit open until this monotonic time
    last_ok: float = 0.0  # monotonic time of its last good answer (passive health)

    def available(self, now: float) -> bool:
        return self.ready and not self.draining and self.open_until <= now

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.last_ok = time.monotonic()

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = now + BREAKER_OPEN_S


@dataclass
class ServedModel:
    """A deployed model: its stable and canary versions and how it is served."""

    name: str
    task: str
    settings: ServingSettings
    stable: str | None
    canary: str | None = None
    canary_weight: float = 0.0
    shadow_share: float = 0.0
    specs: dict[str, ModelSpec] = field(default_factory=dict)  # served and previous
    backends: dict[str, str] = field(default_factory=dict)  # version -> selected backend
    # Make-before-break: the stable version being replaced, still running and routed while
    # ``stable`` has no ready engine (a reload or a rollback to a stopped version). It is not
    # one of versions(): readiness waits for the new stable all the same.
    previous: str | None = None

    def versions(self) -> list[str]:
        return [v for v in (self.stable, self.canary) if v is not None]

    def pick_version(self, routing_key: str | None) -> str | None:
        """Stable or canary by the canary weight; the same routing key always gets the same."""
        if self.canary is None or self.canary_weight <= 0.0:
            return self.stable or self.canary
        if self.stable is None or self.canary_weight >= 1.0:
            return self.canary
        if routing_key:
            digest = hashlib.blake2b(f"{self.name}\0{routing_key}".encode(), digest_size=8)
            share = int.from_bytes(digest.digest(), "big") / 2**64
        else:
            share = random.random()
        return self.canary if share < self.canary_weight else self.stable


class ResultCache:
    """A small LRU of responses keyed by (version, input bytes hash)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class VersionWindow:
    """The newest requests one version served, for the canary's guardrails (kiln.rollout.guardrails).

    Prometheus histograms answer "how is it going" with bucket-wide percentiles; a promote or
    rollback decision wants exact figures over exactly the step it judges, so each request also
    leaves a (wall time, latency, ok) sample here, and shadow comparisons leave (time, rows
    compared, rows that disagreed). Bounded, O(1) per request.
    """

    def __init__(self, size: int = WINDOW_SAMPLES) -> None:
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=size)
        self.shadow: deque[tuple[float, int, int]] = deque(maxlen=size)

    def record(self, latency_ms: float, ok: bool) -> None:
        self.samples.append((time.time(), latency_ms, ok))

    def record_shadow(self, compared: int, disagreed: int) -> None:
        self.shadow.append((time.time(), compared, disagreed))

    def summary(self, since: float = 0.0, over_ms: float | None = None) -> dict[str, Any]:
        """Requests, 5xx errors, p50/p99 (of answered requests) and rate since ``since``;
        with ``over_ms``, also how many answered requests took longer (``over``)."""
        now = time.time()
        latencies, errors, first = [], 0, now
        for at, latency_ms, ok in reversed(self.samples):
            if at < since:
                break
            first = at
            if ok:
                latencies.append(latency_ms)
            else:
                errors += 1
        n = len(latencies) + errors
        compared = disagreed = 0
        for at, rows, bad in reversed(self.shadow):
            if at < since:
                break
            compared += rows
            disagreed += bad
        span = now - (since if since > 0 else first)
        doc: dict[str, Any] = {
            "requests": n,
            "errors": errors,
            "error_rate": errors / n if n else None,
            "p50_ms": None,
            "p99_ms": None,
            "rps": round(n / span, 3) if n and span > 0 else None,
            "shadow_compared": compared,
            "shadow_disagreed": disagreed,
        }
        if latencies:
            ordered = sorted(latencies)
            doc["p50_ms"] = round(_quantile(ordered, 0.50), 3)
            doc["p99_ms"] = round(_quantile(ordered, 0.99), 3)
        if over_ms is not None:
            doc["over"] = sum(1 for latency in latencies if latency > over_ms)
        return doc


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class RoutingState:
    """The gateway's whole view; the supervisor replaces ``models`` and edits ``replicas``."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    replicas: dict[tuple[str, str], list[Replica]] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)  # admitted requests per model
    caches: dict[str, ResultCache] = field(default_factory=dict)
    windows: dict[tuple[str, str], VersionWindow] = field(default_factory=dict)
    loaded_at: float = 0.0  # monotonic time of the last registry snapshot

    def window(self, model: str, version: str) -> VersionWindow:
        found = self.windows.get((model, version))
        if found is None:
            found = self.windows[(model, version)] = VersionWindow()
        return found

    def pick_replica(self, model: str, version: str, exclude: set[int]) -> Replica | None:
        """Least outstanding requests among available replicas (ties: random)."""
        now = time.monotonic()
        best: list[Replica] = []
        low = None
        for replica in self.replicas.get((model, version), ()):
            if id(replica) in exclude or not replica.available(now):
                continue
            if low is None or replica.outstanding < low:
                best, low = [replica], replica.outstanding
            elif replica.outstanding == low:
                best.append(replica)
        if not best:
            return None
        return best[0] if len(best) == 1 else random.choice(best)

    def ready(self, model: str, version: str) -> bool:
        return any(r.ready and not r.draining for r in self.replicas.get((model, version), ()))

    def all_ready(self) -> tuple[bool, list[str]]:
        """Whether every served version has a ready engine (and which do not)."""
        missing = [
            f"{m.name}@{v}"
            for m in self.models.values()
            for v in m.versions()
            if not self.ready(m.name, v)
        ]
        return not missing, missing

    def cache_for(self, model: ServedModel) -> ResultCache | None:
        if model.settings.result_cache <= 0:
            return None
        cache = self.caches.get(model.name)
        if cache is None or cache.size != model.settings.result_cache:
            cache = self.caches[model.name] = ResultCache(model.settings.result_cache)
        return cache
