"""DVC stage `optimize_digits`: run Kiln's optimize flow on the digits CNN; write metrics + plots.

Uses a private, temporary KILN_HOME, so the stage's outputs depend only on its inputs.
`dvc metrics show` reads metrics.json; `dvc plots show` draws variants.csv (latency vs accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--out", type=Path, default=Path("data/digits/optimize"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-dvc-optimize-") as home:
        os.environ["KILN_HOME"] = home
        from flows.optimize import optimize_model
        from kiln.settings import get_settings
        from kiln.upload import upload

        upload(settings=get_settings(), name="digits", source=str(args.data / "model.pt2"),
               dataset=str(args.data / "val.npz"))
        doc = optimize_model(name="digits")
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
                writer.writerow([f"{v['backend']}/{v['precision']}",
                                 v["latency_ms"]["32"]["p50"], v["metric"], v["passed"]])


if __name__ == "__main__":
    main()
