"""uvicorn's httptools protocol with the limits a public endpoint needs.

uvicorn has no request-receive timeout (one slow client holds a connection for minutes: the
slowloris lesson of docs/reliability.md), no cap on header count or size (httptools buffers a header
name or value of any length until its line ends), and reads a body of any length into memory
before the app can refuse it. This protocol adds, per connection:

- a receive deadline: from the first byte of a request (or the connection's opening, or any byte
  on an idle keep-alive connection) until its body is complete; a client that dawdles past it
  gets 408 and is disconnected. Time the server itself holds reading back (a pipelined request
  waiting its turn) does not count against the client;
- caps on the request line (414), the header count and bytes (431), and on the whole request
  head as it streams in, before httptools buffers it (431);
- a cap on the body (by ``Content-Length`` before a byte of it is read, and by count while a
  chunked body streams in) and on the number of chunks of a chunked body (413);
- uvicorn's connection limit (``limit_concurrency``) answered with ``Retry-After`` (uvicorn's
  own 503 there has none, so a client cannot tell when to come back).

The refusal is written directly on the transport, so no app code runs for it. The connection is
then half-closed and what the client still sends is read and discarded for a short while
(nginx's lingering close): closing a socket with unread input makes the kernel send a reset,
which can destroy the refusal before the client reads it. If a response on the connection is
already under way, no refusal is written (it would corrupt that response); the connection is
just closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from kiln.settings import Settings

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class HttpLimits:
    receive_timeout_s: float = 5.0  # request line + headers + body must arrive within this
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = Settings.model_fields["max_body_bytes"].default  # KILN_MAX_BODY_BYTES
    max_body_chunks: int = 16 * 1024
    linger_s: float = 2.0  # after a refusal: how long the client's leftover input is discarded
    linger_bytes: int = 4 * 1024 * 1024  # ... and how much of it, at most

    @property
    def max_head_bytes(self) -> int:
        """The whole head: request line, headers and their framing (CRLFs, ': ')."""
        return self.max_url_bytes + self.max_header_bytes + 4 * self.max_headers + 1024


class _Reject(Exception):
    """Raised inside a parser callback after the refusal was written, to stop parsing."""


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with receive deadlines and size caps (see the module docstring).

    Per request: the guard (the receive deadline) is armed at the request's first byte and
    disarmed when its body is complete; head bytes are counted until its headers are complete.
    """

    limits: HttpLimits = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._rejected = False
        self._discarded = 0
        self._previous: RequestResponseCycle | None = None  # the cycle before this request's
        self._in_head = True
        self._head_bytes = 0
        self._header_bytes = self._header_count = self._body_bytes = self._body_chunks = 0
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    # --- the receive deadline
    def _arm(self) -> None:
        if self._guard is None:
            self._guard = self.loop.call_later(self.limits.receive_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expired(self) -> None:
        self._guard = None
        if (
            self._rejected
            or self.transport.is_closing()
            or self.transport.get_protocol() is not self
        ):  # closed, or handed to another protocol
            return
        if self.flow.read_paused:  # we hold reading back (pipelining): not the client's delay
            self._arm()
            return
        self._reply(408, f"request not received within {self.limits.receive_timeout_s:g} s")

    # --- refusals
    def _idle(self) -> bool:
        """No request is being answered on this connection."""
        return self.cycle is None or self.cycle.response_complete

    def _can_answer(self) -> bool:
        """Whether a refusal may be written now without corrupting a response under way."""
        before = self._previous
        if before is not None and not before.response_complete:
            return False
        return self.cycle is None or self.cycle is before or not self.cycle.response_started

    def _reply(self, status: int, message: str, headers: bytes = b"") -> None:
        self._rejected = True
        self._disarm()
        for cycle in (self.cycle, self._previous):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's receive() sees a disconnect, send() no-ops
                cycle.message_event.set()
        if not self._can_answer():
            self.transport.close()
            return
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (status, _REASONS[status], len(body), headers, body)
        )
        self._lingering_close()

    def _lingering_close(self) -> None:
        """Half-close (the refusal, then FIN), discard input for a while, then close."""
        try:
            if not self.transport.can_write_eof():
                raise RuntimeError("no half-close on this transport")
            self.transport.write_eof()
        except Exception:
            self.transport.close()
            return
        self.flow.resume_reading()
        self._linger = self.loop.call_later(self.limits.linger_s, self._close)

    def _close(self) -> None:
        self._linger = None
        if not self.transport.is_closing():
            self.transport.close()

    def _reject(self, status: int, message: str, headers: bytes = b"") -> None:
        self._reply(status, message, headers)
        raise _Reject(message)

    def _unsupported_upgrade_warning(self) -> None:
        pass  # the gateway runs no WebSocket (``ws="none"``): an Upgrade is plain HTTP, unlogged

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:  # a parser error after our own refusal needs no second answer
            self._reply(400, msg)

    def data_received(self, data: bytes) -> None:
        if self._rejected:  # lingering: discard, within a budget
            self._discarded += len(data)
            if self._discarded > self.limits.linger_bytes:
                self._close()
            return
        if self._guard is None and self._idle():  # any byte on an idle connection starts one
            self._arm()
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if not self._rejected and self._in_head and self._head_bytes > self.limits.max_head_bytes:
            self._reply(431, f"request head over {self.limits.max_head_bytes} bytes")

    # --- parser callbacks
    def on_message_begin(self) -> None:
        self._header_bytes = self._header_count = self._body_bytes = self._body_chunks = 0
        self._previous = self.cycle
        self._arm()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._reject(414, f"request line over {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self.limits.max_headers:
            self._reject(431, f"more than {self.limits.max_headers} headers")
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject(431, f"headers over {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = None
        for name, value in self.headers:
            if name == b"content-length" and value.strip().isdigit():
                length = int(value)
        if length is not None and length > self.limits.max_body_bytes:
            self._reject(
                413, f"body of {length} bytes is over the {self.limits.max_body_bytes}-byte limit"
            )
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn's own refusal here is a bare 503; a client needs to know when to retry
            self._reject(
                503,
                f"the gateway is at its limit of {limit} open connections and "
                "requests; retry shortly",
                b"retry-after: 1\r\n",
            )
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        # httptools calls this per chunk of a chunked body (its size line is parsed); a
        # Content-Length body has none, however many reads it arrives in
        self._body_chunks += 1
        if self._body_chunks > self.limits.max_body_chunks:
            self._reject(413, f"body in more than {self.limits.max_body_chunks} chunks")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._reject(413, f"body over the {self.limits.max_body_bytes}-byte limit")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()


def guarded_protocol(limits: HttpLimits) -> type[GuardedProtocol]:
    """A protocol class bound to ``limits`` (uvicorn's ``http=`` takes a class)."""
    attrs: dict[str, Any] = {"limits": limits}
    return type("KilnHttpProtocol", (GuardedProtocol,), attrs)
