"""Child processes that run in a process group of their own: start, wait until ready, stop.

A server Kiln starts (an engine, ``kiln serve``, a Prefect server or worker, a benchmark's
server) is the leader of a new session, so its process group id is its pid and one signal
reaches everything it forked. That matters: LitServe leaves its worker processes behind when
its main process gets SIGTERM, and uvicorn and Prefect fork helpers of their own; stopping only
the leader would leave them holding ports and memory.

- :func:`start_group` starts a command as such a leader, its output appended to a log file;
- :func:`wait_ready` polls a probe (:func:`http_ok` for a URL) until it succeeds, raising
  :class:`ExitedEarly` when the child exits first and :class:`ReadyTimeout` at the deadline;
- :func:`stop_group` / :func:`stop_groups` send SIGTERM to the group, wait for the leader and
  every member to exit, then SIGKILL whatever is left and reap the leader;
- :func:`signal_group` and :func:`group_members` are the two primitives under them.

Standard library only: ``bench/gpu_serve.py`` runs this under the GPU machine's bare ``python3``
(no psutil there), so :func:`group_members` reads ``/proc`` itself where there is one.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PROC = Path("/proc")  # Linux's process table; elsewhere psutil lists the processes
KILL_WAIT_S = 10.0  # for a SIGKILLed group to empty (only a process stuck in the kernel lasts)


# ------------------------------------------------------------------------------- start
def start_group(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session (its process group id is its pid).

    With ``log_path`` its stdout and stderr are appended to that file (created with its
    folder) and its stdin is ``/dev/null``; without, it inherits ours. ``env`` replaces the
    environment (``None``: inherit it).
    """
    if log_path is None:
        return subprocess.Popen(list(command), env=env, cwd=cwd, start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child holds its own descriptor once started
        return subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


# ------------------------------------------------------------------------------- ready
class NotReady(Exception):
    """A child did not become ready: :class:`ExitedEarly` or :class:`ReadyTimeout`."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


class ExitedEarly(NotReady):
    """The child exited before its probe succeeded."""

    def __init__(self, what: str, returncode: int) -> None:
        super().__init__(what, f"{what} exited with code {returncode} before it was ready")
        self.returncode = returncode


class ReadyTimeout(NotReady):
    """The deadline passed while the child was still running and its probe still failing."""

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(what, f"{what} was not ready within {timeout_s:.0f} s")
        self.timeout_s = timeout_s


def wait_ready(
    proc: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    *,
    timeout_s: float,
    interval_s: float = 0.25,
    what: str = "the child",
) -> None:
    """Call ``probe`` every ``interval_s`` until it returns True.

    Before each call, a child that has exited raises :class:`ExitedEarly` (a dead server's
    port may be answered by something else); once ``timeout_s`` has passed, a failed probe
    raises :class:`ReadyTimeout`. ``what`` names the child in both messages. An exception
    from ``probe`` propagates: a probe returns False for "not yet", and raises for "never".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        returncode = proc.poll()
        if returncode is not None:
            raise ExitedEarly(what, returncode)
        if probe():
            return
        if time.monotonic() >= deadline:
            raise ReadyTimeout(what, timeout_s)
        time.sleep(interval_s)


def http_ok(
    url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 2.0
) -> Callable[[], bool]:
    """A probe for :func:`wait_ready`: whether ``GET url`` answers 200 within ``timeout_s``.

    A refused, reset or timed-out connection (the server is not listening yet) is False. The
    connection is direct: a readiness URL is a local server's, never one for a proxy.
    """
    parts = urlsplit(url)
    connection = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    sent = dict(headers or {})

    def probe() -> bool:
        conn = connection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
        try:
            conn.request("GET", target, headers=sent)
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return probe


# -------------------------------------------------------------------------------- stop
@dataclass(frozen=True)
class Stopped:
    """How a process group stopped: the leader's exit code (``None``: still not reaped after
    SIGKILL, stuck in the kernel), and whether SIGKILL was needed."""

    returncode: int | None
    killed: bool


def stop_group(proc: subprocess.Popen[bytes], *, timeout_s: float) -> Stopped:
    """Stop the process group ``proc`` leads (see :func:`stop_groups`)."""
    return stop_groups([proc], timeout_s=timeout_s)[0]


def stop_groups(procs: Sequence[subprocess.Popen[bytes]], *, timeout_s: float) -> list[Stopped]:
    """Stop the process groups these leaders lead (started by :func:`start_group`), together.

    SIGTERM goes to every group at once, even one whose leader already exited (its workers
    may not have); then the leaders and every member of their groups get ``timeout_s`` in all
    to exit. A group with anything left (or a leader still running) is SIGKILLed, and waited
    for until it is empty and its leader reaped. Processes already gone are no error; calling
    this twice is harmless. Returns one :class:`Stopped` per leader, in order.
    """
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
    _wait_gone(procs, deadline)
    killed = [proc.poll() is None or bool(group_members(proc.pid)) for proc in procs]
    doomed = [proc for proc, kill in zip(procs, killed, strict=True) if kill]
    for proc in doomed:
        signal_group(proc.pid, signal.SIGKILL)
    _wait_gone(doomed, time.monotonic() + KILL_WAIT_S)  # SIGKILL is delivered, not instant
    return [
        Stopped(returncode=proc.poll(), killed=kill)
        for proc, kill in zip(procs, killed, strict=True)
    ]


def _wait_gone(procs: Sequence[subprocess.Popen[bytes]], deadline: float) -> None:
    """Until each leader is reaped and its group has no live member, or ``deadline``."""
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    waiting = [proc.pid for proc in procs]
    while waiting and time.monotonic() < deadline:
        waiting = [pgid for pgid in waiting if group_members(pgid)]
        if waiting:
            time.sleep(0.05)


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to process group ``pgid``; False when no process of it is left (or none
    may be signalled by us), which is no error when stopping it."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``.

    ``os.killpg(pgid, 0)`` would count zombies too, and one whose parent never reaps it (a
    container whose init does not) would look like a member that never stops.
    """
    if PROC.is_dir():
        return _proc_members(pgid)
    import psutil  # no /proc (macOS): psutil, a Kiln dependency, asks the kernel

    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _proc_members(pgid: int) -> list[int]:
    """:func:`group_members` from ``/proc/PID/stat`` (``pid (comm) state ppid pgrp ...``; comm
    may hold spaces and parentheses, hence the split at the last ``)``)."""
    members = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:  # it exited since the listing
            continue
        state, _ppid, group = stat[stat.rfind(b")") + 2 :].split()[:3]
        if int(group) == pgid and state not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members
