"""Model code runs in a child process with a timeout, never in Kiln's own process.

Uploaded models are untrusted (torch.load and pickles run code): their factories and exported
programs are loaded by ``python -m kiln.intake.probe`` (upload) and ``python -m
kiln.optimize.isolated`` (graph extraction), each in its own process group that a timeout kills
whole. This module is the child runner both use; of Kiln's it imports only
:mod:`kiln.processes`, which needs nothing but the standard library.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from kiln.processes import signal_group


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: str
    stderr: str

    def last_error_line(self) -> str:
        lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:500] if lines else f"exit code {self.returncode}"


class ChildTimeout(Exception):
    """The child ran past its timeout and was killed with its whole process group."""


def run_child(
    args: list[str], *, timeout_s: float, env: dict[str, str] | None = None
) -> ChildResult:
    """Run ``python -m <args>`` in a new process group; kill the group on timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGKILL at once, no SIGTERM grace: untrusted code past its time may ignore SIGTERM.
        signal_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ChildTimeout from None
    return ChildResult(proc.returncode, out, err)
