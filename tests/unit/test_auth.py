"""API keys, authorization and per-key rate limits (serving/auth.py; docs/reliability.md scenarios 11, 13, 14).

Keys live in a real SQLite registry (``kiln_home``); rate limits run on the in-process storage
and on the real Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import Forbidden
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.settings import Settings
from serving.auth import (
    KeyStore,
    Principal,
    RateLimiter,
    authorize,
    bearer_token,
    limits_for,
)
from tests.conftest import require_service

REDIS_URI = "redis://127.0.0.1:6379/0"


def make_key(
    settings: Settings,
    scopes: list[str],
    *,
    models: list[str] | None = None,
    rate: float | None = None,
) -> tuple[str, str]:
    """A new key in the registry: (plaintext key, prefix)."""
    with session_scope(settings.db_url) as session:
        issued = crud.create_api_key(
            session=session, scopes=scopes, models=models, rate_per_second=rate
        )
        return issued.key, issued.row.prefix


def revoke(settings: Settings, prefix: str) -> None:
    with session_scope(settings.db_url) as session:
        crud.revoke_api_key(session=session, prefix=prefix)


@pytest.fixture
def settings(kiln_home: Path) -> Settings:
    return Settings(auth_cache_s=0.3)


def principal(
    prefix: str,
    scopes: tuple[str, ...] = ("infer",),
    *,
    models: tuple[str, ...] | None = None,
    rate: float | None = None,
) -> Principal:
    return Principal(
        prefix=prefix,
        scopes=frozenset(scopes),
        models=None if models is None else frozenset(models),
        rate_per_second=rate,
    )


# --- bearer parsing
@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc.def", "abc.def"),
        ("BEARER abc.def", "abc.def"),
        ("  Bearer   abc.def  ", "abc.def"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc.def", None),
        ("abc.def", None),
        ("Bearer abc def", None),
        ("Bearer " + "x" * 257, None),
        ("Bearer ab\x00c", None),
        ("Bearer abcé", None),
    ],
)
def test_bearer_token_variants(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_authenticate_live_key_any_scheme_case(settings: Settings) -> None:
    key, prefix = make_key(settings, ["infer"], models=["digits"], rate=5)
    store = KeyStore(settings)

    async def run() -> list[Principal | None]:
        return [
            await store.authenticate(h)
            for h in (f"Bearer {key}", f"bearer {key}", f"BeArEr  {key} ", key, f"Basic {key}")
        ]

    found = asyncio.run(run())
    expected = principal(prefix, models=("digits",), rate=5.0)
    assert found == [expected, expected, expected, None, None]


def test_unknown_and_revoked_keys_are_identical(settings: Settings) -> None:
    key, prefix = make_key(settings, ["admin"])
    revoke(settings, prefix)
    unknown = key[:-4] + "AAAA"
    store = KeyStore(settings)

    async def run() -> tuple[Principal | None, Principal | None, Principal | None]:
        return (
            await store.authenticate(f"Bearer {key}"),
            await store.authenticate(f"Bearer {unknown}"),
            await store.authenticate("Bearer kiln_00000000.nothing"),
        )

    assert asyncio.run(run()) == (None, None, None)


def test_revocation_takes_effect_within_the_cache_ttl(settings: Settings) -> None:
    key, prefix = make_key(settings, ["infer"])
    store = KeyStore(settings)
    header = f"Bearer {key}"

    async def run() -> None:
        assert await store.authenticate(header) is not None
        revoke(settings, prefix)
        await asyncio.sleep(settings.auth_cache_s + 0.1)
        assert await store.authenticate(header) is None

    asyncio.run(run())


def test_hits_are_cached_and_concurrent_misses_share_one_lookup(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = make_key(settings, ["infer"])
    store = KeyStore(settings)
    calls: list[str] = []
    find = store._find

    def counting_find(token: str) -> Principal | None:
        calls.append(token)
        time.sleep(0.05)  # a slow registry: the 50 concurrent requests overlap it
        return find(token)

    monkeypatch.setattr(store, "_find", counting_find)

    async def run() -> list[Principal | None]:
        first = await asyncio.gather(*(store.authenticate(f"Bearer {key}") for _ in range(50)))
        again = [await store.authenticate(f"Bearer {key}") for _ in range(100)]
        misses = await asyncio.gather(*(store.authenticate("Bearer junk.key") for _ in range(50)))
        return [*first, *again, *misses]

    results = asyncio.run(run())
    assert all(r is not None for r in results[:150]) and all(r is None for r in results[150:])
    assert len(calls) == 2  # one lookup for the live key, one for the unknown one


def test_caches_are_bounded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    key, _ = make_key(settings, ["infer"])
    store = KeyStore(settings, max_entries=8)
    lookups: list[str] = []
    find = store._find

    def counting_find(token: str) -> Principal | None:
        lookups.append(token)
        return find(token)

    monkeypatch.setattr(store, "_find", counting_find)

    async def run() -> None:
        assert await store.authenticate(f"Bearer {key}") is not None
        for i in range(100):  # a flood of random keys
            assert await store.authenticate(f"Bearer random.{i}") is None
        # the live key was not evicted by the flood: no new lookup for it
        assert await store.authenticate(f"Bearer {key}") is not None

    asyncio.run(run())
    assert len(store._unknown) <= 8 and len(store._known) <= 8
    assert lookups.count(key) == 1 and len(lookups) == 101


def test_registry_down_keys_looked_up_before_get_its_last_answer(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale-if-error (reliability scenario 29): once their entries expire while the registry
    does not answer, a live key stays authenticated and an unknown one stays refused, each
    re-checked once per TTL; a key never looked up gets the error (the gateway's 500). When
    the registry answers again its answers count (a revocation made then takes effect)."""
    from sqlalchemy.exc import OperationalError

    key, prefix = make_key(settings, ["infer"])
    store = KeyStore(settings)
    find = store._find
    calls: list[str] = []

    def down(token: str) -> Principal | None:
        calls.append(token)
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    async def run() -> None:
        assert await store.authenticate(f"Bearer {key}") == principal(prefix)
        assert await store.authenticate("Bearer junk.key") is None
        monkeypatch.setattr(store, "_find", down)
        await asyncio.sleep(settings.auth_cache_s + 0.1)  # both entries expired
        for _ in range(20):
            assert await store.authenticate(f"Bearer {key}") == principal(prefix)
            assert await store.authenticate("Bearer junk.key") is None
        assert calls == [key, "junk.key"]  # the stale answers are re-armed for a TTL
        with pytest.raises(OperationalError):
            await store.authenticate("Bearer never.seen")
        with pytest.raises(OperationalError):  # not cached: tried again
            await store.authenticate("Bearer never.seen")
        monkeypatch.setattr(store, "_find", find)
        revoke(settings, prefix)
        await asyncio.sleep(settings.auth_cache_s + 0.1)
        assert await store.authenticate(f"Bearer {key}") is None

    asyncio.run(run())


# --- authorization
def test_scopes_imply_and_refuse() -> None:
    infer, deploy, admin = (principal("p", (s,)) for s in ("infer", "deploy", "admin"))
    authorize(infer, "infer", "digits")
    authorize(deploy, "infer", None)
    authorize(deploy, "deploy", None)
    for scope in ("infer", "deploy", "admin"):
        authorize(admin, scope, "digits")
    with pytest.raises(Forbidden, match="lacks the 'deploy' scope"):
        authorize(infer, "deploy", None)
    with pytest.raises(Forbidden, match="lacks the 'admin' scope"):
        authorize(deploy, "admin", None)
    with pytest.raises(ValueError, match="unknown scope"):
        authorize(admin, "root", None)


def test_models_limit_the_reach() -> None:
    limited = principal("p", ("admin",), models=("digits",))
    authorize(limited, "infer", "digits")
    authorize(limited, "infer", None)  # server-wide routes name no model
    with pytest.raises(Forbidden, match="may not reach model 'minilm'") as info:
        authorize(limited, "infer", "minilm")
    assert info.value.http_status == 403 and info.value.reason == str(info.value)
    authorize(principal("p", ("infer",)), "infer", "anything")  # no list: every model


# --- rate limits
def test_limit_windows() -> None:
    assert [str(i) for i in limits_for(10, "moving-window")] == ["10 per 1 second"]
    assert [str(i) for i in limits_for(10, "sliding-window-counter")] == [
        "10 per 1 second",
        "600 per 1 minute",
    ]
    assert [str(i) for i in limits_for(0.5, "moving-window")] == [
        "1 per 1 second",
        "30 per 1 minute",
    ]
    assert [str(i) for i in limits_for(2.5, "moving-window")] == [
        "3 per 1 second",
        "150 per 1 minute",
    ]


async def burst(
    limiter: RateLimiter, a: Principal, b: Principal
) -> tuple[list[float | None], list[float | None], float]:
    """100 hits of ``a`` spread over ~0.5 s with 5 of ``b`` among them."""
    a_results: list[float | None] = []
    b_results: list[float | None] = []
    start = time.monotonic()
    for i in range(100):
        a_results.append(await limiter.hit(a))
        if i % 20 == 10:
            b_results.append(await limiter.hit(b))
        await asyncio.sleep(0.005)
    return a_results, b_results, time.monotonic() - start


def check_burst(
    a_results: list[float | None],
    b_results: list[float | None],
    elapsed: float,
    *,
    admitted_max: int,
) -> int:
    admitted = sum(r is None for r in a_results)
    refused = [r for r in a_results if r is not None]
    assert len(b_results) == 5 and all(r is None for r in b_results), b_results  # B unaffected
    assert refused and all(r >= 1 and float(r).is_integer() for r in refused), refused
    if elapsed < 1.0:  # a loaded machine may stretch the burst past one window
        assert 10 <= admitted <= admitted_max, (admitted, elapsed)
    return admitted


def test_moving_window_admits_exactly_the_rate(kiln_home: Path) -> None:
    limiter = RateLimiter(Settings())
    a, b = principal("kiln_aaaaaaaa", rate=10), principal("kiln_bbbbbbbb", rate=10)
    a_results, b_results, elapsed = asyncio.run(burst(limiter, a, b))
    # moving window: exactly 10 in any 1 s, so all ten come first, then only refusals
    check_burst(a_results, b_results, elapsed, admitted_max=10)
    if elapsed < 1.0:
        assert a_results[:10] == [None] * 10 and all(r == 1.0 for r in a_results[10:])


def test_sliding_window_counter_within_its_bound(kiln_home: Path) -> None:
    limiter = RateLimiter(Settings(rate_limit_strategy="sliding-window-counter"))
    a, b = principal("kiln_aaaaaaaa", rate=10), principal("kiln_bbbbbbbb", rate=10)
    a_results, b_results, elapsed = asyncio.run(burst(limiter, a, b))
    # the counter weighs the previous window by its remaining share: a burst straddling a
    # window edge may admit up to 10 + 10 x (the part of the burst after the edge, in s)
    check_burst(a_results, b_results, elapsed, admitted_max=10 + math.ceil(10 * elapsed))


def test_default_rate_and_unlimited(kiln_home: Path) -> None:
    async def count(limiter: RateLimiter, p: Principal) -> int:
        return sum([await limiter.hit(p) is None for _ in range(50)])

    assert asyncio.run(count(RateLimiter(Settings()), principal("kiln_cccccccc"))) == 50
    limited = RateLimiter(Settings(default_rate_per_second=3))
    assert asyncio.run(count(limited, principal("kiln_cccccccc"))) == 3
    assert asyncio.run(count(limited, principal("kiln_dddddddd", rate=20))) == 20


def test_fractional_rate_bounds_the_minute(kiln_home: Path) -> None:
    limiter = RateLimiter(Settings())
    p = principal("kiln_eeeeeeee", rate=2 / 60)  # 2 a minute, at most 1 a second

    async def run() -> list[float | None]:
        results = []
        for i in range(3):
            if i:
                await asyncio.sleep(1.05)
            results.append(await limiter.hit(p))
            results.append(await limiter.hit(p))
        return results

    results = asyncio.run(run())
    assert [r is None for r in results] == [True, False, True, False, False, False]
    assert results[1] == 1.0  # the second's window
    assert results[4] is not None and 55 <= results[4] <= 60  # the minute's window


def test_storage_failure_counts_on_local_limits(kiln_home: Path) -> None:
    """A shared storage that does not answer: the key's rate still holds, counted by this
    gateway alone, and the limiter says it is degraded (the gauge and the alert read that)."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = RateLimiter(Settings(rate_limit_storage=f"redis://:s3cret@127.0.0.1:{port}/0"))
    assert limiter.shared and limiter.counting_shared

    async def run() -> tuple[list[float | None], bool]:
        key = principal("kiln_ffffffff", rate=1)
        return [await limiter.hit(key) for _ in range(3)], await limiter.check()

    hits, answers = asyncio.run(run())
    assert hits[0] is None and hits[1] == 1.0 and hits[2] == 1.0  # one per second, locally
    assert not answers and not limiter.counting_shared and limiter.degraded_since is not None
    assert "s3cret" not in limiter.last_error and limiter.last_error


def test_settings_refuse_unknown_storage(kiln_home: Path) -> None:
    with pytest.raises(ValueError, match="rate_limit_storage"):
        Settings(rate_limit_storage="http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="rate_limit_strategy"):
        Settings(rate_limit_strategy="fixed-window")  # type: ignore[arg-type]


@pytest.fixture
def redis_limiter(kiln_home: Path) -> Iterator[tuple[RateLimiter, str]]:
    """A limiter on the real Redis under a namespace of its own, deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URI, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        require_service(f"Redis at 127.0.0.1:6379 does not answer: {exc}")
    namespace = f"kiln-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RateLimiter(Settings(rate_limit_storage=REDIS_URI), namespace=namespace), namespace
    finally:
        keys = list(client.scan_iter(match=f"*{namespace}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_redis_moving_window_shared_by_two_gateways(redis_limiter: tuple[RateLimiter, str]) -> None:
    limiter, namespace = redis_limiter
    other = RateLimiter(Settings(rate_limit_storage=REDIS_URI), namespace=namespace)
    a, b = principal("kiln_aaaaaaaa", rate=10), principal("kiln_bbbbbbbb", rate=10)

    async def run() -> tuple[list[float | None], list[float | None], float]:
        a_results: list[float | None] = []
        b_results: list[float | None] = []
        start = time.monotonic()
        for i in range(100):  # alternate between two gateway replicas: one shared bucket
            a_results.append(await (limiter if i % 2 else other).hit(a))
            if i % 20 == 10:
                b_results.append(await limiter.hit(b))
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - start
        await limiter.clear(a)
        await limiter.clear(b)
        return a_results, b_results, elapsed

    a_results, b_results, elapsed = asyncio.run(run())
    check_burst(a_results, b_results, elapsed, admitted_max=10)


def test_redis_sliding_window_counter(redis_limiter: tuple[RateLimiter, str]) -> None:
    _, namespace = redis_limiter
    limiter = RateLimiter(
        Settings(rate_limit_storage=REDIS_URI, rate_limit_strategy="sliding-window-counter"),
        namespace=namespace,
    )
    a, b = principal("kiln_aaaaaaaa", rate=10), principal("kiln_bbbbbbbb", rate=10)
    a_results, b_results, elapsed = asyncio.run(burst(limiter, a, b))
    check_burst(a_results, b_results, elapsed, admitted_max=10 + math.ceil(10 * elapsed))
