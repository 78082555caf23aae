"""CPU time used by a server's whole process tree over a run: the serve benchmark's
``cpu_ms_per_request`` and ``idle`` figures (``bench/serve_bench.py``) and the CUDA engine's
rows of ``bench/gpu_serve.py``.

A server's processes (:func:`tree`) are its root process, every descendant of it, and every
member of a process group led by one of them: ``kiln serve`` is the gateway and supervisor in
one group, each engine it starts leads a group of its own, and LitServe's worker processes live
in their engine's group. :class:`TreeCpu` reads the user + system CPU seconds of each of them
just before and just after a run, per process (pid and start time, so a reused pid is another
process), and sums the differences: a process that appeared in between counts with all its
time; one that exited in between counts with none (its times are gone with it).

psutil where it is installed; else ``/proc`` itself, standard library only, because
``bench/gpu_serve.py``'s client runs on the GPU machine's bare ``python3``, which has no psutil
(as :mod:`kiln.processes` does). Both read the same kernel counters.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    """One row of the process table: what :func:`tree` and :class:`TreeCpu` need of it."""

    pid: int
    ppid: int
    pgid: int
    started: float  # start time (seconds; only compared with itself)
    cpu_s: float  # user + system, all threads, not counting reaped children
    zombie: bool


def table() -> dict[int, Proc]:
    """Every process of this machine that may be read: pid -> :class:`Proc`."""
    try:
        import psutil
    except ImportError:
        return _proc_table()
    found: dict[int, Proc] = {}
    for p in psutil.process_iter(["ppid", "create_time", "cpu_times", "status"]):
        info = p.info
        if info["cpu_times"] is None or info["create_time"] is None:
            continue  # not ours to read
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            continue
        found[p.pid] = Proc(
            pid=p.pid,
            ppid=info["ppid"] or 0,
            pgid=pgid,
            started=info["create_time"],
            cpu_s=info["cpu_times"].user + info["cpu_times"].system,
            zombie=info["status"] == psutil.STATUS_ZOMBIE,
        )
    return found


def _proc_table() -> dict[int, Proc]:
    """:func:`table` from ``/proc/PID/stat`` (``pid (comm) state ppid pgrp session tty tpgid
    flags minflt cminflt majflt cmajflt utime stime cutime cstime priority nice threads
    itrealvalue starttime ...``; comm may hold spaces and parentheses, hence the split at the
    last ``)``)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, Proc] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:  # it exited since the listing
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid = int(entry.name)
        found[pid] = Proc(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            started=int(fields[19]) / tick,
            cpu_s=(int(fields[11]) + int(fields[12])) / tick,
            zombie=fields[0] in (b"Z", b"X"),
        )
    return found


def tree(root: int, procs: dict[int, Proc] | None = None) -> list[Proc]:
    """``root``, its descendants and the members of every process group one of them leads
    (live ones: no zombies), ``root`` first; empty when ``root`` is gone."""
    procs = table() if procs is None else procs
    children: dict[int, list[int]] = defaultdict(list)
    groups: dict[int, list[int]] = defaultdict(list)
    for proc in procs.values():
        children[proc.ppid].append(proc.pid)
        groups[proc.pgid].append(proc.pid)
    seen: dict[int, Proc] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen[pid] = procs[pid]
        todo += children[pid]
        if procs[pid].pgid == pid:  # a group leader: its whole group
            todo += groups[pid]
    return [p for p in seen.values() if not p.zombie]


@dataclass(frozen=True)
class CpuUse:
    """What :meth:`TreeCpu.stop` measured."""

    seconds: float  # CPU seconds (user + system) of the whole tree over the window
    wall_s: float  # the window's length
    processes: int  # in the tree at the end
    appeared: int  # of them, started during the window
    exited: int  # in the tree at the start, gone at the end (their last times are lost)
    by_pid: dict[int, float] = field(default_factory=dict)  # CPU seconds of each at the end
    pgid: dict[int, int] = field(default_factory=dict)  # each one's process group

    def ms_per_request(self, requests: int) -> float | None:
        """CPU milliseconds per request answered; None when none was."""
        return round(self.seconds * 1000 / requests, 3) if requests > 0 else None

    def percent_of_one_core(self) -> float:
        return round(100 * self.seconds / self.wall_s, 2) if self.wall_s > 0 else 0.0

    def by_group(self) -> dict[int, float]:
        """CPU seconds per process group (kiln: the gateway's, then each engine's)."""
        totals: dict[int, float] = defaultdict(float)
        for pid, seconds in self.by_pid.items():
            totals[self.pgid[pid]] += seconds
        return dict(totals)


class TreeCpu:
    """CPU seconds used by ``root``'s process tree between :meth:`start` and :meth:`stop`."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._before: dict[tuple[int, float], float] = {}
        self._started = 0.0

    def start(self) -> None:
        self._before = {(p.pid, p.started): p.cpu_s for p in tree(self.root)}
        self._started = time.monotonic()

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._started
        after = tree(self.root)
        by_pid = {
            p.pid: max(0.0, p.cpu_s - self._before.get((p.pid, p.started), 0.0)) for p in after
        }
        keys = {(p.pid, p.started) for p in after}
        return CpuUse(
            seconds=round(sum(by_pid.values()), 4),
            wall_s=round(wall, 3),
            processes=len(after),
            appeared=sum(1 for k in keys if k not in self._before),
            exited=sum(1 for k in self._before if k not in keys),
            by_pid=by_pid,
            pgid={p.pid: p.pgid for p in after},
        )
