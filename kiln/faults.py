"""Test hooks: failpoints that kill a process, and engine faults that slow or spoil answers.

Both are off unless a test sets an environment variable in a child process; production code
pays a dictionary lookup (failpoints) or nothing at all (engine faults are read once, at start).

**Failpoints.** Set ``KILN_FAILPOINTS=name[,name]``; ``failpoint(name)`` then kills that process
on the spot (SIGKILL), as a power cut would, to prove crash safety. (TiKV's ``fail-rs`` and
FoundationDB's buggify are the model.)

**Engine faults.** Set ``KILN_ENGINE_FAULTS`` in an engine's environment, e.g.
``delay_ms=3000,error_rate=0.1,nan_rate=0.1``:

- ``delay_ms``: sleep this long before each model call (a slow model: deadlines, queueing);
- ``error_rate``: this share of items fails with HTTP 500 (a flaky canary);
- ``nan_rate``: this share of items gets NaN outputs, which the engine's output check then turns
  into a 500 (a model that diverged);
- ``seed``: the random draws' seed (default: unseeded), for repeatable runs;
- ``versions``: only these versions misbehave, ``|``-separated (``versions=0.2.0|0.3.0``);
  default: every version (a bad canary beside a healthy stable needs this).

The engine (:mod:`serving.engine`) reads it once at start and applies it only when it is set; it
exists for the scenarios of docs/reliability.md (9, 22, 24), never for production use.

**Faults that change while an engine runs.** Set ``KILN_ENGINE_FAULTS_FILE`` to a file path
instead: the file holds the same text as ``KILN_ENGINE_FAULTS`` and the engine re-reads it at
most once a second (when its modification time changed); a missing or empty file means no
faults. A test makes an engine slow, then healthy again, without restarting it (the alert
monitor's tests: an alert must resolve when its cause goes). Off unless the variable is set.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINE_FAULTS_ENV = "KILN_ENGINE_FAULTS"
ENGINE_FAULTS_FILE_ENV = "KILN_ENGINE_FAULTS_FILE"
FAULTS_FILE_RECHECK_S = 1.0


def failpoint(name: str) -> None:
    armed = os.environ.get("KILN_FAILPOINTS", "")
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class EngineFaults:
    """Faults an engine injects (see the module docstring); all off by default."""

    delay_ms: float = 0.0
    error_rate: float = 0.0
    nan_rate: float = 0.0
    seed: int | None = None
    versions: frozenset[str] | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)
    # KILN_ENGINE_FAULTS_FILE: the file re-read while running, its last mtime, the last check
    _file: Path | None = field(default=None, init=False, repr=False, compare=False)
    _mtime: float | None = field(default=None, init=False, repr=False, compare=False)
    _checked: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"{ENGINE_FAULTS_ENV}: delay_ms must be >= 0, got {self.delay_ms}")
        for name in ("error_rate", "nan_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{ENGINE_FAULTS_ENV}: {name} is a share between 0 and 1, got {value}"
                )
        self._rng = random.Random(self.seed)

    @classmethod
    def parse(cls, text: str) -> EngineFaults:
        """``delay_ms=3000,error_rate=0.1`` -> EngineFaults; unknown keys are refused."""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in ("delay_ms", "error_rate", "nan_rate", "seed", "versions"):
                raise ValueError(
                    f"{ENGINE_FAULTS_ENV}: cannot read {part!r}; use "
                    "delay_ms=MS,error_rate=SHARE,nan_rate=SHARE,seed=N,"
                    "versions=V1|V2"
                )
            if key == "versions":
                values[key] = frozenset(v.strip() for v in raw.split("|") if v.strip())
                continue
            try:
                values[key] = int(raw) if key == "seed" else float(raw)
            except ValueError:
                raise ValueError(
                    f"{ENGINE_FAULTS_ENV}: {key} needs a number, got {raw!r}"
                ) from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineFaults | None:
        """The faults ``KILN_ENGINE_FAULTS`` asks for, or None when it is unset or empty; with
        ``KILN_ENGINE_FAULTS_FILE`` set, faults that follow that file (see the module)."""
        env = os.environ if environ is None else environ
        path = env.get(ENGINE_FAULTS_FILE_ENV, "").strip()
        if path:
            live = cls()
            live._file = Path(path)
            live.refresh(force=True)
            return live
        text = env.get(ENGINE_FAULTS_ENV, "").strip()
        return cls.parse(text) if text else None

    def refresh(self, *, force: bool = False) -> None:
        """Re-read ``KILN_ENGINE_FAULTS_FILE`` (at most once a second) when it changed; a
        file that cannot be read as faults leaves the current ones in place."""
        now = time.monotonic()
        if self._file is None or (not force and now - self._checked < FAULTS_FILE_RECHECK_S):
            return
        self._checked = now
        try:
            mtime: float | None = self._file.stat().st_mtime
            text = self._file.read_text().strip()
        except FileNotFoundError:
            mtime, text = None, ""
        if mtime == self._mtime and not force:
            return
        self._mtime = mtime
        try:
            new = EngineFaults.parse(text)
        except ValueError:
            return
        self.delay_ms, self.error_rate, self.nan_rate = new.delay_ms, new.error_rate, new.nan_rate
        self.versions = new.versions
        if new.seed is not None and new.seed != self.seed:
            self.seed, self._rng = new.seed, random.Random(new.seed)

    def applies(self, version: str) -> bool:
        self.refresh()
        return self.versions is None or version in self.versions

    def delay(self) -> None:
        """Sleep ``delay_ms`` (before a model call)."""
        if self.delay_ms > 0:
            time.sleep(self.delay_ms / 1000.0)

    def draw(self) -> str | None:
        """This item's fault: ``"error"``, ``"nan"`` or None (one draw per item)."""
        roll = self._rng.random()
        if roll < self.error_rate:
            return "error"
        if roll < self.error_rate + self.nan_rate:
            return "nan"
        return None
