"""DVC stage `optimize_digits`: `kiln upload` and `kiln optimize digits --json` on the digits CNN;
write metrics + plots.

Runs the real CLI, as a user would, in a private, temporary KILN_HOME, so the stage's outputs
depend only on its inputs. `dvc metrics show` reads metrics.json; `dvc plots show` draws
variants.csv (latency vs accuracy); optimize.json is exactly what `kiln optimize --json` printed
(the acceptance test of a clean clone reads it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def kiln(*args: str, env: dict[str, str]) -> str:
    """Run the ``kiln`` CLI of this interpreter's environment; its stdout (it must succeed)."""
    exe = shutil.which("kiln", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from kiln.cli import main; main()"]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"kiln {' '.join(args)} failed (exit {proc.returncode})")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--out", type=Path, default=Path("data/digits/optimize"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-dvc-optimize-") as home:
        env = {**os.environ, "KILN_HOME": home}
        for name in ("KILN_DATABASE_URL", "KILN_DVC_REMOTE"):
            env.pop(name, None)
        kiln(
            "upload",
            "digits",
            str(args.data / "model.pt2"),
            "--dataset",
            str(args.data / "val.npz"),
            "--json",
            env=env,
        )
        printed = kiln("optimize", "digits", "--json", env=env)
    doc = json.loads(printed)  # the whole of stdout is one JSON document
    (args.out / "optimize.json").write_text(printed)
    selected = doc["selected"]
    metrics = {
        "selected": f"{selected['backend']}/{selected['precision']}",
        "accuracy": selected["metric"],
        "accuracy_drop": selected["metric_drop"],
        "speedup_serving_batch": selected.get("speedup") or 1.0,
        "baseline_accuracy": doc["baseline"]["metric"],
        "variants_passed": sum(v["passed"] for v in doc["variants"]),
        "variants": len(doc["variants"]),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (args.out / "variants.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "p50_ms_batch32", "accuracy", "passed"])
        for v in [doc["baseline"], *doc["variants"]]:
            if "32" in v["latency_ms"]:
                writer.writerow(
                    [
                        f"{v['backend']}/{v['precision']}",
                        v["latency_ms"]["32"]["p50"],
                        v["metric"],
                        v["passed"],
                    ]
                )


if __name__ == "__main__":
    main()
