"""The LitServe internals serving/engine.py builds on, checked against the installed release.

The engine subclasses three private pieces of LitServe: its batched loop
(``DrainingBatchLoop(BatchedLoop)``, which reads LitServe's request tuples itself), its server's
queue setup (``KilnLitServer._init_manager``, which swaps in pipe-backed queues) and its
shutdown (``_perform_graceful_shutdown``). pyproject.toml pins ``litserve`` to the release these
were written against. A LitServe upgrade that moves any of them fails here, naming what to
recheck in serving/engine.py, instead of failing later as a hung or silent engine.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RECHECK = "recheck serving/engine.py (DrainingBatchLoop, KilnLitServer) against this LitServe"


def _pinned() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if Requirement(d).name == "litserve"]
    return spec


def test_installed_litserve_is_the_pinned_release() -> None:
    spec = _pinned()
    installed = version("litserve")
    assert spec.specifier, "pyproject.toml must pin litserve to the tested range"
    assert spec.specifier.contains(installed), (
        f"litserve {installed} is installed but pyproject.toml pins {spec}: {RECHECK}, "
        "then widen the pin"
    )


def _params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def test_batched_loop_hooks_keep_their_signatures() -> None:
    from litserve.loops.simple_loops import BatchedLoop

    assert _params(BatchedLoop.get_batch_requests) == [
        "self",
        "lit_api",
        "request_queue",
        "transport",
    ], f"BatchedLoop.get_batch_requests changed: {RECHECK}"
    assert _params(BatchedLoop.put_response) == [
        "self",
        "transport",
        "response_queue_id",
        "uid",
        "response_data",
        "status",
        "response_type",
    ], f"BatchedLoop.put_response changed: {RECHECK}"
    source = inspect.getsource(BatchedLoop)
    assert "self.get_batch_requests(" in source, (
        f"BatchedLoop no longer collects through get_batch_requests: {RECHECK}"
    )


def test_loop_markers_the_engine_uses_exist() -> None:
    from litserve.loops import base
    from litserve.utils import LitAPIStatus, LoopResponseType

    assert hasattr(base, "_SENTINEL_VALUE"), (
        f"litserve.loops.base._SENTINEL_VALUE is gone: {RECHECK}"
    )
    assert issubclass(base._StopLoopError, Exception), f"_StopLoopError changed: {RECHECK}"
    assert LitAPIStatus.START and LoopResponseType.REGULAR


def test_request_queue_items_are_the_four_tuple_the_loop_unpacks() -> None:
    """DrainingBatchLoop unpacks ``(response_queue_id, uid, submitted, payload)``."""
    from litserve import server

    source = inspect.getsource(server)
    assert re.search(
        r"request_queue\.put\(\(response_queue_id, uid, time\.monotonic\(\), \w+\)\)", source
    ), (
        f"LitServer's request-queue item is no longer (response_queue_id, uid, time, payload): {RECHECK}"
    )


def test_server_queue_setup_and_shutdown_hooks_exist() -> None:
    import litserve as ls
    from litserve.transport.process_transport import MPQueueTransport

    assert _params(ls.LitServer._init_manager) == ["self", "num_api_servers"], (
        f"LitServer._init_manager changed: {RECHECK}"
    )
    assert _params(ls.LitServer._perform_graceful_shutdown)[:3] == [
        "self",
        "manager",
        "uvicorn_workers",
    ], f"LitServer._perform_graceful_shutdown changed: {RECHECK}"
    init_source = inspect.getsource(ls.LitServer._init_manager)
    assert "self.litapi_request_queues[" in init_source and "self._transport" in init_source, (
        f"LitServer._init_manager no longer sets litapi_request_queues and _transport: {RECHECK}"
    )
    assert _params(MPQueueTransport.__init__) == ["self", "manager", "queues"], (
        f"MPQueueTransport's constructor changed: {RECHECK}"
    )
