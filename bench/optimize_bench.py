"""`make bench` (optimize part): every variant of digits and MiniLM against eager fp32.

Runs the real ``optimize-model`` flow on the example models (from ``dvc repro``) in a private
KILN_HOME, then writes ``bench/results.json`` (schema in docs/interfaces.md; the ``serve`` part is kept
if present) and ``bench/results.md`` with the machine's description and its measured peak
fp32 matmul rate for reference.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits": ("data/digits/model.pt2", "data/digits/val.npz"),
    "minilm": ("data/minilm/model", "data/minilm/sentences.npz"),
}


def peak_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - start) / repeats
    return round(2 * n**3 / seconds / 1e9, 1)


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "peak_matmul_fp32_gflops": peak_matmul_gflops(),
    }


def rows(model: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in [doc["baseline"], *doc["variants"]]:
        for batch in ("1", "32"):
            lat = v["latency_ms"].get(batch)
            if lat is None:
                continue
            out.append(
                {
                    "model": model,
                    "backend": v["backend"],
                    "precision": v["precision"],
                    "batch": int(batch),
                    "p50_ms": lat["p50"],
                    "p99_ms": lat["p99"],
                    "throughput": v["throughput"][batch],
                    "metric": v["metric"],
                    "metric_min": v["metric_min"],
                    "metric_drop": v["metric_drop"],
                    "passed": v["passed"],
                }
            )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Kiln benchmark: optimize",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; measured peak fp32 matmul "
        f"{m['peak_matmul_fp32_gflops']} GFLOP/s (2048x2048, torch).",
        "",
        f"Command: `make bench` ({results['generated']}).",
        "",
        "| model | backend | precision | batch | p50 ms | p99 ms | samples/s | metric |"
        " drop | passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["optimize"]:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput']:.1f} | "
            f"{r['metric']:.4f} | {r['metric_drop']:+.4f} | "
            f"{'yes' if r['passed'] else 'no'} |"
        )
    for model, note in results.get("selected", {}).items():
        lines.append(f"\n- **{model}**: {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    out_json = ROOT / "bench" / "results.json"
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as home:
        os.environ["KILN_HOME"] = home
        from flows.optimize import optimize_model
        from kiln.intake.upload import upload
        from kiln.settings import get_settings

        results: dict[str, Any] = {
            "machine": machine(),
            "optimize": [],
            "selected": {},
            "serve": previous.get("serve", []),
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        for model, (source, dataset) in MODELS.items():
            print(f"[bench] {model}: upload + optimize", file=sys.stderr)
            upload(
                settings=get_settings(),
                name=model,
                source=str(ROOT / source),
                dataset=str(ROOT / dataset),
            )
            doc = optimize_model(name=model)
            results["optimize"] += rows(model, doc)
            sel = doc["selected"]
            results["selected"][model] = (
                f"selected {sel['backend']}/{sel['precision']}: {doc['reason']}"
            )
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "bench" / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
