"""API keys, authorization and per-key rate limits for the gateway.

One request goes: :meth:`KeyStore.authenticate` (the ``Authorization`` header to a
:class:`Principal`, or None: 401) -> :func:`authorize` (scope and model, :class:`Forbidden`: 403)
-> :meth:`RateLimiter.hit` (None, or the ``Retry-After`` seconds: 429).

Only the sha256 of a key is stored (``kiln.registry.crud``). Unknown and revoked keys take the same path
and give the same answer (None), so a client cannot tell them apart (docs/reliability.md, status codes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TypeVar

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.aio.strategies import RateLimiter as Strategy
from limits.errors import StorageError
from limits.storage import storage_from_string
from sqlalchemy.exc import SQLAlchemyError

from kiln.errors import Forbidden
from kiln.registry.tables import ApiKey
from kiln.settings import Settings

log = logging.getLogger("kiln.auth")
V = TypeVar("V")

SCOPES = ("infer", "deploy", "admin")
# What each scope grants: admin implies every scope, deploy implies infer.
GRANTS: dict[str, frozenset[str]] = {
    "infer": frozenset({"infer"}),
    "deploy": frozenset({"deploy", "infer"}),
    "admin": frozenset(SCOPES),
}
MAX_TOKEN_CHARS = 256  # Kiln's keys are ~58 characters; longer tokens are refused unhashed
CACHE_ENTRIES = 10_000  # per cache (known keys, unknown keys)
DB_LOOKUPS = 4  # concurrent registry lookups; a flood of random keys queues behind these
STALE_LOG_S = 10.0  # one log line per this long while lookups get stale answers
# The exact strategy (default) and the cheaper approximation (settings.rate_limit_strategy).
STRATEGIES: dict[str, type[MovingWindowRateLimiter | SlidingWindowCounterRateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: a live key, by its public prefix (never the key itself)."""

    prefix: str
    scopes: frozenset[str]
    models: frozenset[str] | None  # None: every model
    rate_per_second: float | None  # None: the gateway's default_rate_per_second

    @classmethod
    def from_row(cls, row: ApiKey) -> Principal:
        return cls(
            prefix=row.prefix,
            scopes=frozenset(row.scopes),
            models=None if row.models is None else frozenset(row.models),
            rate_per_second=row.rate_per_second,
        )


def bearer_token(authorization_header: str | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), or None when malformed."""
    if not authorization_header:
        return None
    parts = authorization_header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1]
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        return None
    return token


def authorize(principal: Principal, scope: str, model: str | None) -> None:
    """Raise :class:`Forbidden` unless ``principal`` holds ``scope`` (directly or implied) and,
    when ``model`` is given, may reach it (a key limited to models reaches only those)."""
    if scope not in GRANTS:
        raise ValueError(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")
    if not any(scope in GRANTS.get(held, frozenset()) for held in principal.scopes):
        raise Forbidden(
            f"key {principal.prefix} lacks the {scope!r} scope: use a key created "
            f"with `kiln keys create --scope {scope}`"
        )
    if model is not None and principal.models is not None and model not in principal.models:
        raise Forbidden(
            f"key {principal.prefix} may not reach model {model!r}: it is limited "
            f"to {', '.join(sorted(principal.models)) or 'no models'}"
        )


class KeyStore:
    """Authenticates bearer keys against the registry, with a short-lived cache.

    Lifecycle: built once per gateway (no I/O); each :meth:`authenticate` is a dict lookup keyed
    by the key's sha256 while the entry is younger than ``settings.auth_cache_s``, else one
    registry lookup in a worker thread (one per key at a time, at most ``DB_LOOKUPS`` at once).
    Known and unknown keys are cached apart, each bounded, so a flood of random keys can neither
    evict live keys nor reach the registry more than once per key and TTL. A key created or
    revoked while the gateway runs takes effect within ``auth_cache_s``. While the registry does
    not answer (a database error on a lookup), a key looked up before gets the registry's last
    answer for it (stale-if-error: a key cannot be created or revoked in a database that is
    down), re-checked every ``auth_cache_s``; the errors of keys never looked up propagate (and
    are not cached): the gateway answers 500 rather than guess.
    """

    def __init__(
        self, settings: Settings, *, max_entries: int = CACHE_ENTRIES, max_lookups: int = DB_LOOKUPS
    ) -> None:
        self.db_url = settings.db_url
        self.ttl = settings.auth_cache_s
        self.max_entries = max_entries
        self._known: dict[str, tuple[float, Principal]] = {}
        self._unknown: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Principal | None]] = {}
        self._lookups = asyncio.Semaphore(max_lookups)
        self._last_stale_log = -math.inf

    async def authenticate(self, authorization_header: str | None) -> Principal | None:
        """The live key's :class:`Principal`; None for a missing, malformed, unknown or revoked
        key (all four alike)."""
        token = bearer_token(authorization_header)
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and known[0] > now:
            return known[1]
        unknown_until = self._unknown.get(digest)
        if unknown_until is not None and unknown_until > now:
            return None
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._lookup(token, digest))
            self._inflight[digest] = task
        # shielded: a client that goes away must not cancel the lookup others wait on
        return await asyncio.shield(task)

    async def _lookup(self, token: str, digest: str) -> Principal | None:
        try:
            async with self._lookups:
                try:
                    principal = await asyncio.to_thread(self._find, token)
                except SQLAlchemyError as exc:
                    if not self._looked_up(digest):
                        raise
                    principal = self._stale(digest, exc)
            expires = time.monotonic() + self.ttl
            if self.ttl > 0:
                if principal is None:
                    self._remember(self._unknown, digest, expires)
                    self._known.pop(digest, None)
                else:
                    self._remember(self._known, digest, (expires, principal))
                    self._unknown.pop(digest, None)
            return principal
        finally:
            self._inflight.pop(digest, None)

    def _looked_up(self, digest: str) -> bool:
        return digest in self._known or digest in self._unknown

    def _stale(self, digest: str, exc: SQLAlchemyError) -> Principal | None:
        """The registry's last answer for a key while the registry does not answer."""
        now = time.monotonic()
        if now - self._last_stale_log >= STALE_LOG_S:
            self._last_stale_log = now
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            log.warning(
                "the registry does not answer key lookups (%s: %s): keys looked up before get "
                "its last answer until it does",
                type(exc).__name__,
                (reason[0] if reason else "")[:200],
            )
        known = self._known.get(digest)
        return None if known is None else known[1]

    def _find(self, token: str) -> Principal | None:
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        with session_scope(self.db_url) as session:
            row = crud.find_api_key(session=session, key=token)
            return None if row is None else Principal.from_row(row)

    def _remember(self, cache: dict[str, V], digest: str, value: V) -> None:
        cache.pop(digest, None)  # re-inserted last: dicts keep insertion order, oldest first
        while len(cache) >= self.max_entries:
            del cache[next(iter(cache))]
        cache[digest] = value


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


def limits_for(rate_per_second: float, strategy: str) -> tuple[RateLimitItem, ...]:
    """The windows that enforce ``rate_per_second``: per second (bursts within a second) and per
    minute (the average across seconds), checked together, per-second first.

    A fractional rate rounds the per-second window up and the per-minute one to nearest (0.5/s:
    1 a second, 30 a minute). With the moving window and a whole rate the minute window is
    implied (any minute holds at most 60 one-second windows of ``rate`` each), so it is left out
    to save a storage round trip; the sliding-window counter, an approximation, keeps both.
    """
    per_second = RateLimitItemPerSecond(max(1, math.ceil(rate_per_second)))
    if strategy == "moving-window" and float(rate_per_second).is_integer():
        return (per_second,)
    return per_second, RateLimitItemPerMinute(max(1, round(60 * rate_per_second)))


class RateLimiter:
    """Per-key rate limits on the `limits` library, bucketed by the key's prefix (never the
    path, so path variants cannot escape their bucket).

    Lifecycle: built once per gateway from ``settings.rate_limit_storage`` (``memory://`` in the
    process, or ``redis://...`` shared by every gateway replica; no connection is made until the
    first hit) and ``settings.rate_limit_strategy``; :meth:`hit` per request; :meth:`check` for a
    readiness probe. If a shared storage fails, this gateway counts on local limits (each key's
    whole rate, in its own memory) until a probe every ``PROBE_S`` finds the storage answering
    again (:attr:`degraded_since`, the ``kiln_rate_limit_local_fallback`` gauge and an alert say so): a
    Redis outage must become neither a serving outage nor unlimited keys.
    """

    PROBE_S = 2.0  # while on local limits: how often the shared storage is tried again

    def __init__(self, settings: Settings, *, namespace: str = "kiln") -> None:
        uri = _async_uri(settings.rate_limit_storage)
        options: dict[str, float | str | bool] = {"wrap_exceptions": True}
        if uri.startswith(("async+redis", "async+rediss")):
            # redis-py is the client Kiln installs; a dead Redis must not stall requests
            options.update(implementation="redispy", socket_timeout=0.5, socket_connect_timeout=0.5)
        storage = storage_from_string(uri, **options)
        assert isinstance(storage, Storage)
        self.storage: Storage = storage
        self.shared = not uri.startswith("async+memory")
        self.strategy_name = settings.rate_limit_strategy
        self.strategy: Strategy = STRATEGIES[settings.rate_limit_strategy](storage)
        local = storage_from_string("async+memory://")
        assert isinstance(local, Storage)
        self.local: Strategy = STRATEGIES[settings.rate_limit_strategy](local)
        self.default_rate = settings.default_rate_per_second
        self.namespace = namespace
        self.degraded_since: float | None = None  # wall time the shared storage last failed
        self.last_error = ""
        self._items: dict[float, tuple[RateLimitItem, ...]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._last_probe = 0.0

    def rate_of(self, principal: Principal) -> float | None:
        """The key's own rate, else the default; None is unlimited."""
        return (
            principal.rate_per_second
            if principal.rate_per_second is not None
            else self.default_rate
        )

    @property
    def counting_shared(self) -> bool:
        """Whether hits are counted in the shared storage now (False: memory://, or degraded)."""
        return self.shared and self.degraded_since is None

    async def hit(self, principal: Principal) -> float | None:
        """Count one request for ``principal``: None when admitted, else the whole seconds
        (>= 1) until its window frees a slot, for ``Retry-After``."""
        rate = self.rate_of(principal)
        if rate is None:
            return None
        items = self._items.get(rate)
        if items is None:
            items = self._items[rate] = limits_for(rate, self.strategy_name)
        if self.degraded_since is not None:
            self._maybe_probe()
            return await self._hit(self.local, items, principal.prefix)
        try:
            return await self._hit(self.strategy, items, principal.prefix)
        except StorageError as exc:
            self._degrade(exc)
            return await self._hit(self.local, items, principal.prefix)

    async def _hit(
        self, strategy: Strategy, items: tuple[RateLimitItem, ...], prefix: str
    ) -> float | None:
        for item in items:
            if not await strategy.hit(item, self.namespace, prefix):
                stats = await strategy.get_window_stats(item, self.namespace, prefix)
                wait = stats.reset_time - time.time()
                return float(min(item.get_expiry(), max(1, math.ceil(wait))))
        return None

    def _degrade(self, exc: Exception) -> None:
        self.degraded_since = time.time()
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._last_probe = time.monotonic()
        # the error's text is the client's (host and port); a URL's password never reaches it
        log.error(
            "rate-limit storage failed (%s): counting each key's rate on this gateway alone "
            "until it answers again",
            self.last_error[:200],
        )

    def _maybe_probe(self) -> None:
        now = time.monotonic()
        if now - self._last_probe < self.PROBE_S or (self._probe and not self._probe.done()):
            return
        self._last_probe = now
        self._probe = asyncio.get_running_loop().create_task(self._try_shared())

    async def _try_shared(self) -> None:
        if await self.storage.check():
            log.warning("rate-limit storage answers again: shared limits resume")
            self.degraded_since = None
            self.last_error = ""

    async def clear(self, principal: Principal) -> None:
        """Reset ``principal``'s windows (tests, and an operator lifting a block)."""
        rate = self.rate_of(principal)
        if rate is not None:
            for item in limits_for(rate, self.strategy_name):
                await self.strategy.clear(item, self.namespace, principal.prefix)
                await self.local.clear(item, self.namespace, principal.prefix)

    async def check(self) -> bool:
        """Whether the storage answers (a PING for Redis; never raises)."""
        return await self.storage.check()
