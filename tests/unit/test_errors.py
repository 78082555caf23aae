"""kiln.errors at the gateway's edge: each class becomes its declared status through the one
mapping (serving/gateway.py's ``error_response``), with ``{"error": message}`` and the error's
own headers; the ASGI app answers its refusals through it."""

from __future__ import annotations

import asyncio
import inspect
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest

from kiln import errors
from kiln.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    KilnError,
    NotFound,
    RateLimited,
    TooLarge,
    Unavailable,
)
from kiln.settings import Settings
from serving.auth import KeyStore, Principal, RateLimiter
from serving.gateway import EngineRefused, Gateway, _engine_error, error_response

pytestmark = pytest.mark.unit

CLASSES = sorted(
    (
        cls
        for cls in vars(errors).values()
        if inspect.isclass(cls) and issubclass(cls, KilnError) and cls.__module__ == errors.__name__
    ),
    key=lambda cls: cls.__name__,
)
NOT_ERRORS = {0, 9, 10}  # success, `kiln deploy`'s rollback, `kiln drift --exit-code`'s drift


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_each_class_maps_to_its_declared_status(cls: type[KilnError]) -> None:
    answer = error_response(cls("what went wrong, and how to fix it"))
    assert answer.status == cls.http_status
    assert answer.body == b'{"error":"what went wrong, and how to fix it"}'
    assert answer.headers == {}
    assert 400 <= cls.http_status < 600
    assert cls.exit_code not in NOT_ERRORS


def test_the_new_classes_keep_the_statuses_the_gateway_answered() -> None:
    statuses = {cls.__name__: cls.http_status for cls in CLASSES}
    assert statuses["Unauthorized"] == 401 and statuses["Forbidden"] == 403
    assert statuses["MethodNotAllowed"] == 405 and statuses["UnsupportedMediaType"] == 415
    assert statuses["RateLimited"] == 429 and statuses["Unavailable"] == 503
    assert statuses["InferenceFailed"] == 500 and statuses["DeadlineExceeded"] == 504
    # the exit codes follow the scheme: bad input 2, retry later 11
    assert errors.MethodNotAllowed.exit_code == errors.UnsupportedMediaType.exit_code == 2
    assert Unavailable.exit_code == RateLimited.exit_code == DeadlineExceeded.exit_code == 11


def test_headers_pass_through_the_mapping() -> None:
    answer = error_response(RateLimited("slow down", headers={"Retry-After": "7"}))
    assert (answer.status, answer.headers) == (429, {"Retry-After": "7"})
    assert orjson.loads(answer.body) == {"error": "slow down"}
    answer = error_response(Unavailable("queue full", headers={"Retry-After": "1"}))
    assert (answer.status, answer.headers) == (503, {"Retry-After": "1"})


def test_headers_belong_to_the_error_not_its_class() -> None:
    given = {"Retry-After": "1"}
    error = Unavailable("queue full", headers=given)
    given["Retry-After"] = "99"  # the raiser's dict is copied
    assert error.headers == {"Retry-After": "1"}
    assert Unavailable("another").headers == {} and KilnError.headers == {}
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Unavailable and str(copy) == "queue full"
    assert copy.headers == {"Retry-After": "1"}


@pytest.mark.parametrize(
    ("engine", "cls", "message", "answered"),
    [
        (504, DeadlineExceeded, "deadline passed while the request waited in the engine", 504),
        (500, InferenceFailed, "the model failed on this request: boom", 500),
        (507, InferenceFailed, "the model failed on this request: boom", 500),
        (400, InvalidInput, "boom", 400),
        (404, NotFound, "boom", 404),
        (413, TooLarge, "boom", 413),
        (418, EngineRefused, "boom", 418),
    ],
)
def test_an_engine_answer_becomes_its_class(
    engine: int, cls: type[KilnError], message: str, answered: int
) -> None:
    """An engine's 4xx keeps its status; any 5xx but a 504 is the model failing (a 500)."""
    error = _engine_error(engine, "boom")
    assert type(error) is cls and str(error) == message
    assert error_response(error).status == answered


# --- through the ASGI app: each refusal's status, body and headers
class _Keys(KeyStore):
    async def authenticate(self, authorization_header: str | None) -> Principal | None:
        if authorization_header != "Bearer good":
            return None
        return Principal(
            prefix="kiln_good", scopes=frozenset({"admin"}), models=None, rate_per_second=None
        )


class _Limiter(RateLimiter):
    async def hit(self, principal: Principal) -> float | None:
        return 3.0 if principal.prefix == "kiln_slow" else None


class _SlowKeys(_Keys):
    async def authenticate(self, authorization_header: str | None) -> Principal | None:
        return Principal(prefix="kiln_slow", scopes=frozenset(), models=None, rate_per_second=1)


def _call(app: Gateway, method: str, path: str, auth: str | None = "Bearer good") -> Any:
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]), orjson.loads(body["body"])


@pytest.fixture
def settings(kiln_home: Path) -> Settings:
    return Settings()


def _app(settings: Settings, keys: type[KeyStore] = _Keys) -> Gateway:
    return Gateway(settings, keys=keys(settings), limiter=_Limiter(settings), supervise=False)


def test_the_app_answers_its_refusals_through_the_mapping(settings: Settings) -> None:
    app = _app(settings)
    status, headers, body = _call(app, "GET", "/v2", auth=None)
    assert status == 401 and headers[b"www-authenticate"] == b'Bearer realm="kiln"'
    assert body == {"error": "missing or unknown API key: send 'Authorization: Bearer <key>'"}
    status, headers, body = _call(app, "POST", "/v2")
    assert status == 405 and headers[b"allow"] == b"GET"
    assert body == {"error": "method POST not allowed here: use GET"}
    status, _, body = _call(app, "GET", "/v3")
    assert (status, body) == (
        404,
        {"error": "no route /v3: see the Open Inference Protocol v2 routes"},
    )
    status, _, body = _call(app, "GET", "/v2/models/nothing")
    assert status == 404 and "is not deployed" in body["error"]
    status, headers, body = _call(_app(settings, _SlowKeys), "GET", "/v2")
    assert status == 429 and headers[b"retry-after"] == b"3"
    assert body == {"error": "rate limit of key kiln_slow exceeded; retry after 3 s"}


def test_an_unexpected_error_is_a_500_without_internals(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(settings)

    def broken(*args: object) -> None:
        raise RuntimeError("/secret/path in a traceback")

    monkeypatch.setattr(app.state, "all_ready", broken)
    status, headers, body = _call(app, "GET", "/v2/health/ready")
    assert status == 500 and b"retry-after" not in headers
    assert body == {"error": "internal error: see the gateway's log"}
