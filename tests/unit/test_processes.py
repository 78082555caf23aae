"""kiln.processes with real processes: a leader and the grandchildren it forks share one
process group, and stopping the group leaves none of them alive, SIGTERM first and SIGKILL
when they ignore it; readiness waits fail clearly when the child exits or the deadline passes.

Every process a test starts is SIGKILLed with its group and reaped at teardown, whatever the
test did to it.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from kiln import processes
from kiln.processes import (
    ExitedEarly,
    NotReady,
    ReadyTimeout,
    Stopped,
    group_members,
    http_ok,
    signal_group,
    start_group,
    stop_group,
    stop_groups,
    wait_ready,
)

# A shell that backgrounds a grandchild and waits on a child: three processes, one group.
FAMILY = ["sh", "-c", "sleep 300 & sleep 300"]
# The same family with SIGTERM ignored by all three (an ignored signal survives fork and exec).
DEAF_FAMILY = [
    sys.executable,
    "-c",
    "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "os.execvp('sh', ['sh', '-c', 'sleep 300 & sleep 300'])",
]
# The leader dies on SIGTERM, its background worker ignores it (LitServe's workers outliving
# their main process, in miniature).
DEAF_WORKER = ["sh", "-c", "(trap '' TERM; exec sleep 300) & exec sleep 300"]

Start = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def start() -> Iterator[Start]:
    """:func:`start_group`, with every leader it started killed (group and all) and reaped at
    teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def run(
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = start_group(command, env=env, cwd=cwd, log_path=log_path)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(group_members(p.pid) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p.pid for p in started if group_members(p.pid)], "a test leaked processes"


def members_at_least(pgid: int, count: int, timeout_s: float = 10.0) -> list[int]:
    """The group's members once there are ``count`` of them (the shell forks its children
    after it starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        members = group_members(pgid)
        if len(members) >= count:
            return members
        time.sleep(0.02)
    raise AssertionError(f"group {pgid} has {group_members(pgid)}, wanted {count} processes")


def ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` ignores SIGTERM now (its ``SigIgn`` mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & 1 << (signal.SIGTERM - 1))


def gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` is alive (zombies count as gone)."""
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except FileNotFoundError:
            continue
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X"):
            return False
    return True


# -------------------------------------------------------------------------------- start
def test_the_leader_heads_its_own_group_and_appends_to_its_log(
    start: Start, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "child.log"
    log.parent.mkdir()
    log.write_bytes(b"before\n")
    proc = start(
        ["sh", "-c", "echo out; echo err >&2; cat; echo env=$KILN_TEST_VALUE; pwd"],
        env={**os.environ, "KILN_TEST_VALUE": "42"},
        cwd=tmp_path,
        log_path=log,
    )
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    assert os.getsid(proc.pid) == proc.pid
    assert proc.wait(timeout=10) == 0  # `cat` read /dev/null, not our stdin
    assert log.read_text().splitlines() == ["before", "out", "err", "env=42", str(tmp_path)]


def test_the_log_folder_is_created(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "new" / "folder" / "child.log"
    assert start(["sh", "-c", "echo hi"], log_path=log).wait(timeout=10) == 0
    assert log.read_text() == "hi\n"


# --------------------------------------------------------------------------------- stop
def test_stop_group_stops_the_leader_and_its_grandchildren(start: Start) -> None:
    proc = start(FAMILY)
    members = members_at_least(proc.pid, 3)
    t0 = time.monotonic()
    stopped = stop_group(proc, timeout_s=10)
    assert time.monotonic() - t0 < 5  # SIGTERM was enough: no waiting out the timeout
    assert stopped == Stopped(returncode=-signal.SIGTERM, killed=False)
    assert group_members(proc.pid) == []
    assert gone(members)


def test_stop_group_escalates_to_sigkill_when_sigterm_is_ignored(start: Start) -> None:
    proc = start(DEAF_FAMILY)
    members = members_at_least(proc.pid, 3)
    t0 = time.monotonic()
    stopped = stop_group(proc, timeout_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 5
    assert stopped == Stopped(returncode=-signal.SIGKILL, killed=True)
    assert group_members(proc.pid) == []
    assert gone(members)


def test_workers_that_outlive_their_leader_are_killed(start: Start) -> None:
    """The leader exits on SIGTERM at once; its worker ignores it and is SIGKILLed with the
    group once the timeout passes, though the leader had already exited."""
    proc = start(DEAF_WORKER)
    members = members_at_least(proc.pid, 2)
    deadline = time.monotonic() + 10  # until the worker's subshell has run its trap
    while not any(ignores_sigterm(pid) for pid in members) and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped = stop_group(proc, timeout_s=0.5)
    assert stopped == Stopped(returncode=-signal.SIGTERM, killed=True)
    assert group_members(proc.pid) == []
    assert gone(members)


def test_stop_groups_shares_one_timeout(start: Start) -> None:
    procs = [start(DEAF_FAMILY) for _ in range(3)]
    for proc in procs:
        members_at_least(proc.pid, 3)
    t0 = time.monotonic()
    stopped = stop_groups(procs, timeout_s=1.0)
    assert time.monotonic() - t0 < 2.5  # not three timeouts one after the other
    assert stopped == [Stopped(returncode=-signal.SIGKILL, killed=True)] * 3
    assert not [p.pid for p in procs if group_members(p.pid)]


def test_stop_group_on_an_exited_process_returns_its_code(start: Start) -> None:
    reaped = start(["sh", "-c", "exit 3"])
    assert reaped.wait(timeout=10) == 3
    assert stop_group(reaped, timeout_s=5) == Stopped(returncode=3, killed=False)

    unreaped = start(["sh", "-c", "exit 4"])  # a zombie nobody has waited for yet
    deadline = time.monotonic() + 10
    while group_members(unreaped.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stop_group(unreaped, timeout_s=5) == Stopped(returncode=4, killed=False)
    # twice is harmless
    assert stop_group(unreaped, timeout_s=5) == Stopped(returncode=4, killed=False)


def test_signal_group_tolerates_a_group_that_is_gone(start: Start) -> None:
    proc = start(["sh", "-c", "exit 0"])
    proc.wait(timeout=10)
    assert signal_group(proc.pid, signal.SIGTERM) is False


def test_group_members_needs_no_psutil(start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reads /proc (bench/gpu_serve.py runs where psutil is not installed); without
    /proc psutil gives the same answer."""
    proc = start(FAMILY)
    members = sorted(members_at_least(proc.pid, 3))
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    assert sorted(group_members(proc.pid)) == members
    monkeypatch.delitem(sys.modules, "psutil")
    monkeypatch.setattr(processes, "PROC", Path("/nonexistent/proc"))
    assert sorted(group_members(proc.pid)) == members
    assert proc.pid in members and os.getpid() not in members


# -------------------------------------------------------------------------------- ready
def test_wait_ready_returns_once_the_probe_succeeds(start: Start) -> None:
    proc = start(FAMILY)
    calls: list[float] = []

    def probe() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 3

    wait_ready(proc, probe, timeout_s=10, interval_s=0.01, what="the family")
    assert len(calls) == 3


def test_wait_ready_raises_when_the_child_exits_first(start: Start) -> None:
    proc = start(["sh", "-c", "exit 7"])
    with pytest.raises(ExitedEarly) as info:
        wait_ready(proc, lambda: False, timeout_s=30, interval_s=0.01, what="the server")
    assert info.value.returncode == 7
    assert info.value.what == "the server"
    assert str(info.value) == "the server exited with code 7 before it was ready"


def test_wait_ready_raises_at_the_deadline(start: Start) -> None:
    proc = start(FAMILY)
    t0 = time.monotonic()
    with pytest.raises(ReadyTimeout) as info:
        wait_ready(proc, lambda: False, timeout_s=0.6, interval_s=0.05, what="the server")
    assert 0.6 <= time.monotonic() - t0 < 3
    assert isinstance(info.value, NotReady) and info.value.timeout_s == 0.6
    assert str(info.value) == "the server was not ready within 1 s"
    assert proc.poll() is None  # waiting never stops the child


def test_a_probe_that_raises_ends_the_wait(start: Start) -> None:
    proc = start(FAMILY)

    def probe() -> bool:
        raise ValueError("the answer was not JSON")

    with pytest.raises(ValueError, match="not JSON"):
        wait_ready(proc, probe, timeout_s=10)


# ------------------------------------------------------------------------------ http_ok
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        authorized = self.headers.get("Authorization") == "Bearer k"
        status = 200 if self.path == "/ok?x=1" or (self.path == "/key" and authorized) else 503
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_http_ok_is_true_only_for_a_200(server: str) -> None:
    assert http_ok(server + "/ok?x=1")() is True
    assert http_ok(server + "/other")() is False  # 503
    assert http_ok(server + "/key")() is False
    assert http_ok(server + "/key", headers={"Authorization": "Bearer k"})() is True


def test_http_ok_is_false_while_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert http_ok(f"http://127.0.0.1:{port}/health", timeout_s=1)() is False
