"""uvicorn's httptools protocol with the limits a public endpoint needs.

uvicorn has no request-receive timeout (one slow client holds a connection for minutes: the
slowloris lesson of RELIABILITY.md), no cap on header count or size, and reads a body of any
length into memory before the app can refuse it. This protocol adds, per connection:

- a receive deadline: from the first byte of a request (or the connection's opening) until its
  body is complete; a client that dawdles past it is disconnected;
- caps on the request line, the header count and the header bytes (431 / 414);
- a cap on the body (by ``Content-Length`` before a byte of it is read, and by count while a
  chunked body streams in) and on the number of body chunks (413, then close).

The rejection is written directly on the transport, so no app code runs for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


@dataclass(frozen=True)
class HttpLimits:
    receive_timeout_s: float = 5.0  # request line + headers + body must arrive within this
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_body_chunks: int = 16 * 1024


class _Reject(Exception):
    """Raised inside a parser callback after the refusal was written, to stop parsing."""


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with receive deadlines and size caps (see the module docstring)."""

    limits: HttpLimits = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard: asyncio.TimerHandle | None = None
        self._rejected = False
        self._header_bytes = self._header_count = self._body_bytes = self._body_chunks = 0
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
        if self.cycle is not None and not self.cycle.more_body:
            return  # the request arrived whole; the app is answering it
        if not self.transport.is_closing():
            self._reply(408, "request not received in time")

    # --- refusals
    def _reply(self, status: int, message: str) -> None:
        self._rejected = True
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, _REASONS[status], len(body), body))
        self.transport.close()
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def _reject(self, status: int, message: str) -> None:
        self._reply(status, message)
        raise _Reject(message)

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:  # a parser error after our own refusal needs no second answer
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        super().data_received(data)

    # --- parser callbacks
    def on_message_begin(self) -> None:
        self._header_bytes = self._header_count = self._body_bytes = self._body_chunks = 0
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
        length = self.parser.get_content_length() if hasattr(self.parser, "get_content_length") \
            else None
        if length is None:
            for name, value in self.headers:
                if name == b"content-length" and value.isdigit():
                    length = int(value)
        if length is not None and length > self.limits.max_body_bytes:
            self._reject(413, f"body of {length} bytes is over the "
                              f"{self.limits.max_body_bytes}-byte limit")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_chunks += 1
        if self._body_bytes > self.limits.max_body_bytes:
            self._reject(413, f"body over the {self.limits.max_body_bytes}-byte limit")
        if self._body_chunks > self.limits.max_body_chunks:
            self._reject(413, f"body in more than {self.limits.max_body_chunks} chunks")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def guarded_protocol(limits: HttpLimits) -> type[GuardedProtocol]:
    """A protocol class bound to ``limits`` (uvicorn's ``http=`` takes a class)."""
    attrs: dict[str, Any] = {"limits": limits}
    return type("KilnHttpProtocol", (GuardedProtocol,), attrs)
