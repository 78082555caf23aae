"""Failpoints: named places where a test can make Kiln die (SIGKILL) to prove crash safety.

Set ``KILN_FAILPOINTS=name[,name]`` in a child process's environment; ``failpoint(name)`` then
kills that process on the spot, as a power cut would. Unset, a failpoint is a dictionary lookup.
(TiKV's ``fail-rs`` and FoundationDB's buggify are the model.)
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    armed = os.environ.get("KILN_FAILPOINTS", "")
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
