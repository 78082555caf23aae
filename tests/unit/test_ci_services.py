"""Under CI a service a test needs (PostgreSQL, Redis) being down fails the test; elsewhere it
skips with the reason (tests/conftest.py's ``require_service``)."""

from __future__ import annotations

import pytest

from tests.conftest import pg_available, require_service

pytestmark = pytest.mark.unit


def test_down_service_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="does not answer"):
        require_service("PostgreSQL at 127.0.0.1:5432 does not answer")


def test_down_service_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="CI needs it running"):
        require_service("Redis at 127.0.0.1:6379 does not answer")


def test_running_service_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_REQUIRE_SERVICES", "1")
    require_service(None)
    require_service(pg_available())  # PostgreSQL runs on this machine and in CI
