"""`kiln demo` (what `make demo` runs), end to end in a fresh KILN_HOME from the repository root.

The journey: digits 0.1.0 promoted and answering real test digits through the gateway; 0.2.0
(weights permuted) rejected by the champion/challenger gate; 0.3.0 (same answers, far slower)
rolled back by the canary on p99. The example data may already be built (`dvc repro` is then
cached). The wall time is reported as ``FIGURE demo_seconds=...``; the README promises under 5
minutes after install on a 2-core machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import REPO, kiln_env, run_kiln

DEMO_TIMEOUT_S = 900


def test_demo_journey(tmp_path: Path) -> None:
    home = tmp_path / "kiln-home"
    started = time.monotonic()
    proc = run_kiln("demo", env=kiln_env(home), cwd=REPO, timeout=DEMO_TIMEOUT_S)
    seconds = time.monotonic() - started
    print(f"FIGURE demo_seconds={seconds:.1f}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    summary = json.loads((home / "demo-summary.json").read_text())
    steps = summary["steps"]
    assert [s["version"] for s in steps] == ["0.1.0", "0.2.0", "0.3.0"]
    assert [s["outcome"] for s in steps] == ["promoted", "rejected", "rolled_back"], steps
    assert "gate" in steps[1]["reason"], steps[1]
    assert "p99" in steps[2]["reason"], steps[2]
    assert summary["accuracy"] >= 0.9
    assert summary["served_version"] == "0.1.0" and summary["stable"] == "0.1.0"
    assert "rolled_back" in proc.stdout and "rejected" in proc.stdout
