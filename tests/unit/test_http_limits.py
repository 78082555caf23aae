"""The gateway's HTTP protocol (serving/http.py) at uvicorn's connection limit: the refusal says
when to retry, and the connections under the limit are served as before."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from serving.http import HttpLimits, guarded_protocol

pytestmark = pytest.mark.unit

LIMIT = 3


async def _ok(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _ok,
        http=guarded_protocol(HttpLimits()),
        lifespan="off",
        log_level="error",
        limit_concurrency=LIMIT,
        ws="none",
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)
    sock.close()


def _get(conn: socket.socket) -> bytes:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_over_the_connection_limit_is_503_with_retry_after(server: int) -> None:
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(LIMIT - 1)]
    try:
        for conn in held:
            assert _get(conn).startswith(b"HTTP/1.1 200")  # kept alive: still open
        held.append(socket.create_connection(("127.0.0.1", server)))
        time.sleep(0.1)
        over = _get(held[-1])  # the LIMIT-th open connection: the limit is reached
        head = over.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 503"), over
        assert b"\r\nretry-after: 1" in head, over
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", server)) as again:  # the limit freed: served
        assert _get(again).startswith(b"HTTP/1.1 200")
