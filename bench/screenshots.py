"""`make screenshots`: what a user sees, captured by headless Chromium into bench/.

1. ``prefect-deploy-run.png``: the Prefect UI's page of a ``deploy-model`` flow run, started
   the way the UI's Run button starts one (``POST /deployments/{id}/create_flow_run``) on the
   stack `make up` runs (``flows.up.Stack``: Prefect server + UI, process worker, gateway).
2. ``drift-report.png``: the Evidently drift report ``kiln drift digits`` saved after the
   gateway logged real test digits, half of them inverted (a shift the report should show).

Everything runs on 127.0.0.1 in a temporary KILN_HOME, on free ports, and is stopped at the
end. Chromium is Debian's (``make screenshots`` installs it like `make bench` installs wrk),
started with the flags that keep it off the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.up import Stack, UpSettings
from kiln.settings import PRIVACY_ENV
from serving.supervisor import free_port

UI_RUN_STATE = {
    "type": "SCHEDULED",
    "message": "Run from the Prefect UI",
    "state_details": {"deferred": False, "untrackable_result": False, "pause_reschedule": False},
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: `make screenshots` installs Debian's chromium")


def screenshot(url: str, out: Path, *, size: str = "1440,1000", budget_ms: int = 15000) -> None:
    """Load ``url`` (JavaScript runs for ``budget_ms`` of virtual time) and save a PNG."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium could not capture {url}: {proc.stderr[-1500:]}")
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes) from {url}")


def kiln(env: dict[str, str], *args: str, timeout: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kiln"), *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def run_deploy_model(stack: Stack) -> str:
    """Start deploy-model for digits as the UI's Run button does; wait for it; its id."""
    api = stack.api_url
    dep = httpx.get(f"{api}/deployments/name/deploy-model/deploy-model", timeout=10).json()
    created = httpx.post(
        f"{api}/deployments/{dep['id']}/create_flow_run",
        timeout=10,
        json={
            "state": UI_RUN_STATE,
            "parameters": {"model": "digits"},
            "enforce_parameter_schema": True,
        },
    )
    created.raise_for_status()
    run_id = str(created.json()["id"])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if run["state_type"] in TERMINAL:
            print(f"deploy-model run {run['name']} ({run_id}): {run['state_type']}")
            return run_id
        time.sleep(1.0)
    raise SystemExit(f"deploy-model run {run_id} did not finish within 600 s")


def send_traffic(stack: Stack, x: np.ndarray, *, invert: bool) -> None:
    """Every row as its own request (logged at a 100 % sample); inverted pixels if asked."""
    auth = {"Authorization": f"Bearer {stack.admin_key}"}
    deadline = time.monotonic() + 120
    while (
        httpx.get(
            f"{stack.gateway_url}/v2/models/digits/ready", headers=auth, timeout=10
        ).status_code
        != 200
    ):
        if time.monotonic() > deadline:
            raise SystemExit("digits never became ready on the gateway")
        time.sleep(0.5)
    rows = (16.0 - x) if invert else x
    with httpx.Client(headers=auth, timeout=30) as http:
        for row in rows:
            body = {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, *row.shape],
                        "data": row.reshape(-1).tolist(),
                    }
                ]
            }
            http.post(f"{stack.gateway_url}/v2/models/digits/infer", json=body).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    digits = ROOT / "data" / "digits"
    if not (digits / "model.pt2").exists():
        venv = Path(sys.executable).parent  # dvc.yaml's `python` is this venv's
        subprocess.run(
            [str(venv / "dvc"), "repro", "train_digits"],
            cwd=ROOT,
            check=True,
            env={
                **os.environ,
                **PRIVACY_ENV,
                "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
            },
        )
    with tempfile.TemporaryDirectory(prefix="kiln-shots-") as tmp:
        home = Path(tmp) / "kiln-home"
        env = {
            **os.environ,
            **PRIVACY_ENV,
            "KILN_HOME": str(home),
            "KILN_INFERENCE_LOG_SAMPLE": "1.0",
        }
        env.pop("KILN_DATABASE_URL", None)
        kiln(
            env, "upload", "digits", str(digits / "model.pt2"), "--dataset", str(digits / "val.npz")
        )
        up = UpSettings(prefect_port=free_port(), worker_poll_s=1.0)
        with Stack(up, home=home, gateway_port=free_port(), base_env=env) as stack:
            run_id = run_deploy_model(stack)
            screenshot(
                f"{stack.prefect_url}/runs/flow-run/{run_id}", args.out / "prefect-deploy-run.png"
            )
            test = np.load(digits / "test.npz")
            x = np.asarray(test["inputs"], dtype=np.float32)
            half = len(x) // 2
            send_traffic(stack, x[:half], invert=False)
            send_traffic(stack, x[half:], invert=True)
            time.sleep(2.0)  # the inference log's writer flushes every 0.1 s
            drift = kiln(stack.env, "drift", "digits")
            print(
                f"kiln drift digits: detected={drift['drift_detected']} "
                f"share={drift['drift_share']} samples={drift['samples']}"
            )
            if drift.get("report"):
                report = Path(drift["report"])
                screenshot(
                    report.resolve().as_uri(), args.out / "drift-report.png", size="1440,1360"
                )


if __name__ == "__main__":
    main()
