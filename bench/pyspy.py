"""py-spy for the serve benchmark's ``profile`` section (``bench/serve_bench.py``): find it,
record a process for as long as a block runs, and summarise the collapsed stacks it writes.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;...;leaf
COUNT``, outermost first, each frame ``name (file:line)`` (Python) or ``name (library)``
(``--native``: C frames of the interpreter and extensions); with ``--subprocesses`` each stack
starts with the chain of processes that leads to its own, ``process PID:"COMMAND"`` frames
(whose command may hold a ``;`` itself).

Recordings here use ``--idle`` (the samples of threads that are waiting are kept: a share is of
thread time, not of CPU) and ``--native``, so a waiting thread's innermost frame is the libc
call it waits in (``epoll_wait``, ``read``, ``clock_nanosleep``, a futex wait...), whichever
Python code called it: :func:`is_idle` marks a sample idle when a frame below its innermost
Python frame is one of :data:`IDLE_NATIVE` (a libc wait, or the interpreter's own lock and GIL
waits, whose libc frames may have no symbol), or, where py-spy could not unwind the C stack,
when its innermost Python frame is one of the waits of :data:`IDLE_FRAMES` (what py-spy's own
heuristic looks for where it cannot ask the OS). Nothing in py-spy's output says which samples
it saw idle, hence these lists.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: innermost C frames that mean "waiting": the blocking calls of libc (and glibc's internal
#: names for them) a thread sleeps in: event loops, selectors, pipes, sockets, sleeps, locks
IDLE_NATIVE = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "select",
        "pselect",
        "pselect6",
        "poll",
        "ppoll",
        "__poll",
        "read",
        "__libc_read",
        "recv",
        "recvfrom",
        "recvmsg",
        "__libc_recv",
        "accept",
        "accept4",
        "wait4",
        "waitpid",
        "waitid",
        "sleep",
        "nanosleep",
        "clock_nanosleep",
        "__clock_nanosleep",
        "pause",
        "sigwait",
        "sigtimedwait",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "pthread_cond_clockwait",
        "___pthread_cond_wait",
        "___pthread_cond_timedwait",
        "__pthread_cond_wait",
        "__pthread_clockjoin_ex",
        "pthread_join",
        "sem_wait",
        "sem_timedwait",
        "sem_clockwait",
        "__new_sem_wait_slow",
        "do_futex_wait",
        "futex_wait",
        "futex_abstimed_wait_cancelable",
        "__futex_abstimed_wait_common",
        "__futex_abstimed_wait_common64",
        "__futex_abstimed_wait_cancelable64",
        "__lll_lock_wait",
        "__lll_lock_wait_private",
        "syscall",  # futex(2) through syscall(): thread pools' waits (OpenMP, ORT)
        # the interpreter's waits, above libc frames that may have no symbol
        "PyThread_acquire_lock_timed",  # a lock, condition, queue or join, GIL released
        "take_gil",  # waiting for the GIL: contention, not CPU
        "time_sleep",
    }
)
#: innermost Python frames that mean "waiting", as (function, end of the file's path), for
#: stacks without C frames; a method matches by its own name (py-spy writes ``Class.method``)
IDLE_FRAMES = (
    ("select", "selectors.py"),  # an asyncio loop's epoll/select
    ("poll", "selectors.py"),
    ("_run_once", "asyncio/base_events.py"),
    ("run_forever", "asyncio/base_events.py"),
    ("run", "asyncio/runners.py"),  # uvloop's loop is C: its epoll wait shows as this frame
    ("wait", "threading.py"),  # a condition, event or join
    ("_wait_for_tstate_lock", "threading.py"),
    ("get", "queue.py"),
    ("_worker", "concurrent/futures/thread.py"),  # an idle pool thread
    ("wait", "multiprocessing/connection.py"),  # a pipe's poll
    ("_poll", "multiprocessing/connection.py"),
    ("poll", "multiprocessing/connection.py"),
    ("_recv", "multiprocessing/connection.py"),
    ("accept", "socket.py"),
)
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'process \d+:".*?"(?:;|$)')
Stacks = list[tuple[list[str], int]]  # (frames outermost first, samples)


class PySpyError(RuntimeError):
    """py-spy is missing, or did not record (the message says why)."""


def find() -> str:
    """The py-spy beside this Python (``make bench-deps`` installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise PySpyError(
            "py-spy is not installed: run `make bench-deps` (or pip install -e .[bench])"
        )
    return found


def version(spy: str) -> str:
    out = subprocess.run([spy, "--version"], capture_output=True, text=True).stdout.split()
    return out[-1] if out else "?"


@contextmanager
def record(
    spy: str,
    pid: int,
    output: Path,
    fmt: str,
    *,
    rate: int,
    subprocesses: bool,
    log: Path,
    native: bool = True,
) -> Iterator[dict[str, int]]:
    """``py-spy record --idle [--native]`` of ``pid`` into ``output`` (``fmt``: flamegraph or
    raw), from once it samples until the block ends (then SIGINT: py-spy writes its file and
    exits). Yields a dict that then holds py-spy's own count of ``samples`` and ``errors``."""
    command = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--idle"]
    command += ["--format", fmt, "--output", str(output)]
    if native:
        command.append("--native")
    if subprocesses:
        command.append("--subprocesses")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "Sampling process" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise PySpyError(f"py-spy did not start sampling pid {pid}: {_tail(log)}")
        time.sleep(0.1)
    counts: dict[str, int] = {}
    try:
        yield counts
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not output.exists():
        raise PySpyError(f"py-spy record of pid {pid} failed ({proc.returncode}): {_tail(log)}")
    if m := re.search(r"Samples: (\d+) Errors: (\d+)", log.read_text(errors="replace")):
        counts.update(samples=int(m[1]), errors=int(m[2]))


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in lines[-3:]) or "(no output)"


# ------------------------------------------------------------------------------ reading
def frame_key(frame: str) -> str:
    """A frame without its line number: ``name (file)``."""
    m = _FRAME.match(frame)
    return f"{m['name']} ({m['file']})" if m else frame


def is_python(key: str) -> bool:
    """Whether ``key`` is a Python frame (``name (file.py)``), not a C one (``name (lib.so)``)."""
    m = _FRAME.match(key)
    return m is not None and (m["file"].endswith(".py") or m["file"].startswith("<"))


def is_address(key: str) -> bool:
    """A C frame py-spy found no symbol for (``0x7f... (libc.so.6)``): shown in no table."""
    return key.startswith("0x")


def is_idle(frames: list[str]) -> bool:
    """Whether a sample (frames outermost first) is a thread waiting: see the module doc."""
    python = [i for i, key in enumerate(frames) if is_python(key)]
    below = frames[python[-1] + 1 :] if python else frames
    if below:
        return any(_name(key) in IDLE_NATIVE for key in below)
    m = _FRAME.match(frames[-1]) if frames else None
    if m is None:
        return False
    method = m["name"].rsplit(".", 1)[-1]  # py-spy writes Class.method
    return any(method == name and m["file"].endswith(file) for name, file in IDLE_FRAMES)


def _name(key: str) -> str:
    m = _FRAME.match(key)
    return m["name"] if m else key


def read_collapsed(path: Path, label: str) -> dict[str, Stacks]:
    """The stacks of a raw recording by process: the last ``process PID:"COMMAND"`` frame of
    each (``--subprocesses``), else ``label``; frames as :func:`frame_key`."""
    stacks: dict[str, Stacks] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        owner = label
        while m := _PROCESS.match(stack):  # the chain of processes: the last one is its own
            owner, stack = m[0].removesuffix(";"), stack[m.end() :]
        frames = [frame_key(f) for f in stack.split(";")] if stack else []
        stacks.setdefault(owner, []).append((frames, int(count)))
    return stacks


@dataclass
class Top:
    """One process's samples, summed by function."""

    total: int = 0
    idle: int = 0
    # a function counted once per sample however deep it recurses; of those samples, idle
    inclusive: Counter[str] = field(default_factory=Counter)
    idle_inclusive: Counter[str] = field(default_factory=Counter)
    # the innermost frame (a C one where py-spy unwound C), idle or not, and the innermost
    # Python frame of its samples
    own: Counter[str] = field(default_factory=Counter)
    idle_own: Counter[str] = field(default_factory=Counter)
    callers: dict[str, Counter[str]] = field(default_factory=dict)


def top_functions(stacks: Stacks) -> Top:
    """Inclusive and self counts of ``stacks``, idle samples (:func:`is_idle`) apart; frames
    without a symbol are skipped (the innermost frame is then the nearest one with one)."""
    top = Top()
    for frames, count in stacks:
        top.total += count
        named = [key for key in frames if not is_address(key)]
        if not named:
            continue
        waiting = is_idle(frames)
        top.idle += count if waiting else 0
        for key in set(named):
            top.inclusive[key] += count
            if waiting:
                top.idle_inclusive[key] += count
        leaf = named[-1]
        top.own[leaf] += count
        if waiting:
            top.idle_own[leaf] += count
        if not is_python(leaf):
            caller = next((key for key in reversed(named) if is_python(key)), "")
            top.callers.setdefault(leaf, Counter())[caller] += count
    return top


def summary_tables(path: Path, label: str, n: int = 15) -> list[str]:
    """Markdown for one raw recording: per process (most samples first) its sample count and
    idle share, then its top ``n`` functions by inclusive share of all samples (idle waits
    dominate those: marked), by inclusive share of the busy samples, and by self share, idle
    waits marked (no tables for a process with under 2% of the recording's samples, or none
    busy)."""

    by_process = read_collapsed(path, label)
    everything = sum(c for stacks in by_process.values() for _, c in stacks)
    lines: list[str] = []
    for owner, stacks in sorted(by_process.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        top = top_functions(stacks)
        busy = top.total - top.idle
        lines += [
            "",
            f"### {owner[:160]}",
            "",
            f"{top.total} samples ({pct(top.total, everything)}% of the recording's), "
            f"{pct(top.idle, top.total)}% of them idle.",
        ]
        if top.total < 0.02 * everything or busy == 0:
            continue  # a helper that did next to nothing
        lines += [
            "",
            "| inclusive: function | % of samples | of them idle |",
            "|---|---|---|",
        ]
        for key, count in top.inclusive.most_common(n):
            waiting = top.idle_inclusive[key]
            lines.append(f"| `{key}` | {pct(count, top.total)} | {_idle_mark(waiting, count)} |")
        working = top.inclusive - top.idle_inclusive  # drops the functions with no busy sample
        lines += ["", "| inclusive, busy samples only: function | % of busy samples |", "|---|---|"]
        for key, count in working.most_common(n):
            lines.append(f"| `{key}` | {pct(count, busy)} |")
        lines += [
            "",
            "| self: function | % of samples | % of busy samples | idle | called from (Python) |",
            "|---|---|---|---|---|",
        ]
        for key, count in top.own.most_common(n):
            waiting = top.idle_own[key]
            callers = top.callers.get(key)
            caller = callers.most_common(1)[0][0] if callers else ""
            mark = _idle_mark(waiting, count)
            lines.append(
                f"| `{key}` | {pct(count, top.total)} | {pct(count - waiting, busy)} | "
                f"{mark} | {f'`{caller}`' if caller else ''} |"
            )
    return lines


def _idle_mark(waiting: int, count: int) -> str:
    """**idle** when every sample of a function waited, else the waiting share (if any)."""
    if waiting == count:
        return "**idle**"
    return f"{pct(waiting, count)}%" if waiting else ""


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"
