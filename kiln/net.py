"""Addresses and URLs, with the standard library only: the engine imports this on machines
without pydantic (the GPU image), so it must stay free of Kiln's heavier dependencies."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: other machines may resolve it
        return False


def redact_url(url: str) -> str:
    """``url`` with the password of its user part (``scheme://user:PASSWORD@host``) replaced by
    ``***``: what a log line or a message may show of a database or Redis URL."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
