"""Kiln as a service: prefect.yaml's deployments on a real Prefect server, run by a process
worker, with `kiln serve` serving what the flow deployed.

The stack is the one `make up` starts (``flows.up.Stack``), on free ports, with its own
PREFECT_HOME inside a private KILN_HOME; the deploy-model run is created exactly as the UI's
Run button creates it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from flows.up import (
    CLUSTER_DEPLOYMENTS,
    CLUSTER_POOL,
    DEPLOYMENTS,
    WORK_POOL,
    Stack,
    UpSettings,
    still_running,
)
from serving.supervisor import free_port
from tests.conftest import (
    REPO,
    _pg_exec,
    _pg_schema_url,
    copy_home,
    digits_rows,
    infer_request,
    kiln_env,
    pg_available,
    require_service,
    run_kiln,
    set_model_settings,
    upload_digits,
)

# What the Prefect UI posts for Run > Custom run (ui-v2 QuickRunParametersDialog).
UI_RUN_STATE = {
    "type": "SCHEDULED",
    "message": "Run from the Prefect UI",
    "state_details": {"deferred": False, "untrackable_result": False, "pause_reschedule": False},
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"]}


def test_prefect_yaml_deployments_resolve_to_flows() -> None:
    from prefect.flows import Flow, load_flow_from_entrypoint

    doc = _prefect_yaml()
    # Flow code comes from this checkout: no git clone, no remote storage.
    assert doc["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}
    ]
    assert not doc.get("build") and not doc.get("push")
    deployments = _deployments()
    assert set(deployments) == {*DEPLOYMENTS, *CLUSTER_DEPLOYMENTS}
    for name, dep in deployments.items():
        pool = CLUSTER_POOL if name in CLUSTER_DEPLOYMENTS else WORK_POOL
        assert dep["work_pool"]["name"] == pool, name
        path, _, func = dep["entrypoint"].partition(":")
        assert (REPO / path).is_file(), f"{name}: {path} does not exist"
        flow = load_flow_from_entrypoint(f"{REPO / path}:{func}")
        assert isinstance(flow, Flow), name

    deploy = load_flow_from_entrypoint(str(REPO / "flows/deploy.py") + ":deploy_model")
    assert deploy.name == "deploy-model"
    assert {"model", "version", "source", "canary_steps"} <= set(deploy.parameters.properties)
    assert deploy.parameters.required == ["model"]
    assert not deployments["deploy-model"].get("schedules")  # on demand
    assert [s["cron"] for s in deployments["reoptimize"]["schedules"]] == ["0 3 * * *"]
    for name in DEPLOYMENTS:  # the cluster form runs the same flows, on the same schedules
        twin = deployments[f"{name}-cluster"]
        assert twin["entrypoint"] == deployments[name]["entrypoint"], name
        assert twin.get("schedules") == deployments[name].get("schedules"), name


def _up(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m flows.up ARGS --no-ui` on ``home``, expected to refuse before starting."""
    return subprocess.run(
        [sys.executable, "-m", "flows.up", *args, "--no-ui"],
        env=kiln_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("taken", ["prefect", "gateway"])
def test_up_refuses_a_taken_port(taken: str, tmp_path: Path) -> None:
    import socket

    home = tmp_path / "kiln-home"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        other = free_port()
        prefect_port, gateway_port = (port, other) if taken == "prefect" else (other, port)
        proc = _up(home, "--prefect-port", str(prefect_port), "--gateway-port", str(gateway_port))
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"port {port} on 127.0.0.1 is in use" in lines[0]
    assert f"--{taken}-port" in lines[0]
    assert not home.exists()  # refused before starting or writing anything


def _flow_run_logs(api: str, run_id: str) -> str:
    resp = httpx.post(
        f"{api}/logs/filter",
        timeout=10,
        json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    return "\n".join(f"{row['level']} {row['message']}" for row in resp.json())[-6000:]


def _diagnostics(stack: Stack, run_id: str | None) -> str:
    parts = [f"--- {child.name} ({child.log_path}):\n{child.tail()}" for child in stack.children]
    if run_id:
        parts.append(f"--- flow run {run_id}:\n{_flow_run_logs(stack.api_url, run_id)}")
    return "\n".join(parts)


def _serves_digits(stack: Stack, examples: Path, run_id: str | None) -> dict[str, float]:
    """Wait until the stack's gateway has digits ready, then check its answers on 32 rows;
    the seconds each took."""
    auth = {"Authorization": f"Bearer {stack.admin_key}"}
    t_ready = time.monotonic()
    while time.monotonic() < t_ready + 120:
        ready = httpx.get(f"{stack.gateway_url}/v2/models/digits/ready", headers=auth, timeout=10)
        if ready.status_code == 200:
            break
        time.sleep(0.25)
    waited = round(time.monotonic() - t_ready, 2)
    x, labels = digits_rows(examples, 32)
    t_infer = time.monotonic()
    resp = httpx.post(
        f"{stack.gateway_url}/v2/models/digits/infer",
        timeout=60,
        headers=auth,
        json=infer_request("x", x),
    )
    took = round(time.monotonic() - t_infer, 2)
    assert resp.status_code == 200, resp.text + _diagnostics(stack, run_id)
    out = resp.json()["outputs"][0]
    logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    assert (logits.argmax(axis=1) == labels).mean() >= 0.9
    return {"engine ready after the run": waited, "first infer": took}


def test_deploy_model_from_the_run_button(
    validated_home: Path, examples: Path, tmp_path: Path, record_property: Any
) -> None:
    home = copy_home(validated_home, tmp_path)
    up = UpSettings(prefect_port=free_port(), worker_poll_s=1.0)
    stack = Stack(up, home=home, gateway_port=free_port(), base_env=kiln_env(home))
    timings: dict[str, float] = {}
    run_id: str | None = None
    t0 = time.monotonic()
    try:
        stack.start()
        timings.update({f"start {k}": v for k, v in stack.timings.items()})
        api = stack.api_url
        # The UI calls the API on this port, not on Prefect's default 4200.
        ui = httpx.get(f"{stack.prefect_url}/ui-settings", timeout=10).json()
        assert ui["api_url"] == api

        deployment = httpx.get(f"{api}/deployments/name/deploy-model/deploy-model", timeout=10)
        assert deployment.status_code == 200, deployment.text
        dep = deployment.json()
        assert dep["work_pool_name"] == WORK_POOL
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        nightly = httpx.get(f"{api}/deployments/name/reoptimize/reoptimize", timeout=10).json()
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]

        t_run = time.monotonic()
        created = httpx.post(
            f"{api}/deployments/{dep['id']}/create_flow_run",
            timeout=10,
            json={
                "state": UI_RUN_STATE,
                "parameters": {"model": "digits"},
                "enforce_parameter_schema": True,
            },
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        deadline = time.monotonic() + 420
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
            if run["state_type"] == "RUNNING" and "flow run running" not in timings:
                timings["flow run running"] = round(time.monotonic() - t_run, 2)
            if run["state_type"] in TERMINAL:
                break
            time.sleep(0.5)
        timings["flow run terminal"] = round(time.monotonic() - t_run, 2)
        assert run.get("state_type") == "COMPLETED", (
            f"flow run {run.get('state_type')}: {run.get('state', {}).get('message')}\n"
            + _diagnostics(stack, run_id)
        )
        assert run["work_pool_name"] == WORK_POOL and run["parameters"] == {"model": "digits"}

        # The flow wrote the desired state; `kiln serve`'s supervisor serves it.
        shown = run_kiln("show", "digits", "--json", env=stack.env)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["status"] == "production"
        # The flow returns once the registry says production; the supervisor may still be
        # warming the engine (it reconciles within a second), so a client waits for ready.
        timings.update(_serves_digits(stack, examples, run_id))
    except BaseException:
        print(_diagnostics(stack, run_id))
        raise
    finally:
        processes = stack.processes()
        t_stop = time.monotonic()
        stack.stop()
        timings["stop"] = round(time.monotonic() - t_stop, 2)
        timings["total"] = round(time.monotonic() - t0, 2)
        record_property("timings", json.dumps(timings))
        print("timings:", json.dumps(timings))
    assert processes, "the stack started no process"
    assert not [p for p in processes if still_running(p)], "a process outlived stop()"
    assert os.environ.get("PREFECT_API_URL") != stack.api_url  # the test process untouched


def test_the_cluster_form_refuses_sqlite(tmp_path: Path) -> None:
    """`make up CLUSTER=1` without PostgreSQL: one line naming the variable, nothing started."""
    home = tmp_path / "kiln-home"
    proc = _up(home, "--cluster")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "KILN_PREFECT_DATABASE_URL=postgresql+asyncpg://" in line
    assert not home.exists()


def _prefect_rows(url: str, run_id: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("+asyncpg", "+psycopg"))
    try:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM flow_run WHERE id = CAST(:id AS uuid)")
            return int(conn.execute(query, {"id": run_id}).scalar_one())
    finally:
        engine.dispose()


def test_the_cluster_form_on_postgresql_with_two_workers(
    examples: Path, tmp_path: Path, record_property: Any
) -> None:
    """Prefect's server on PostgreSQL, the kiln-cluster pool with a concurrency limit and two
    process workers (each standing for a machine), the registry in PostgreSQL: a run of the
    deploy-model-cluster deployment is picked up by one worker, optimizes digits (uploaded
    only) and deploys it, and `kiln serve` serves it."""
    require_service(pg_available())
    suffix = os.urandom(5).hex()
    _pg_exec(f"CREATE DATABASE prefect_{suffix}")
    _pg_exec(f"CREATE SCHEMA kiln_{suffix}")
    prefect_db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/prefect_{suffix}"
    home = tmp_path / "kiln-home"
    env = kiln_env(home, KILN_DATABASE_URL=_pg_schema_url(f"kiln_{suffix}"))
    upload_digits(examples / "digits", env=env)
    optimize = {"optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}}
    set_model_settings(home, "digits", optimize, env=env)
    up = UpSettings(
        prefect_port=free_port(),
        worker_poll_s=1.0,
        prefect_ui=False,
        cluster=True,
        prefect_database_url=prefect_db,
        workers=2,
        pool_concurrency=2,
    )
    stack = Stack(up, home=home, gateway_port=free_port(), base_env=env)
    run_id: str | None = None
    timings: dict[str, float] = {}
    try:
        stack.start()
        timings.update({f"start {k}": v for k, v in stack.timings.items()})
        api = stack.api_url
        pool = httpx.get(f"{api}/work_pools/{CLUSTER_POOL}", timeout=10).json()
        assert pool["concurrency_limit"] == 2 and pool["type"] == "process"
        workers = httpx.post(f"{api}/work_pools/{CLUSTER_POOL}/workers/filter", timeout=10)
        online = [w["name"] for w in workers.json() if w["status"] == "ONLINE"]
        assert len(online) == 2, workers.json()
        # only the cluster deployments are registered, on the cluster pool
        assert httpx.get(f"{api}/deployments/name/deploy-model/deploy-model").status_code == 404
        dep = httpx.get(f"{api}/deployments/name/deploy-model/deploy-model-cluster").json()
        assert dep["work_pool_name"] == CLUSTER_POOL
        t_run = time.monotonic()
        created = httpx.post(
            f"{api}/deployments/{dep['id']}/create_flow_run",
            timeout=10,
            json={"state": UI_RUN_STATE, "parameters": {"model": "digits"}},
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        run: dict[str, Any] = {}
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
            if run["state_type"] in TERMINAL:
                break
            time.sleep(0.5)
        timings["flow run terminal"] = round(time.monotonic() - t_run, 2)
        assert run.get("state_type") == "COMPLETED", _diagnostics(stack, run_id)
        assert run["work_pool_name"] == CLUSTER_POOL
        # Prefect's state is in PostgreSQL: the run is a row of its database
        assert _prefect_rows(prefect_db, run_id) == 1
        # exactly one of the two workers picked it up
        picked = [
            c.name
            for c in stack.children
            if c.name.startswith("prefect-worker") and run_id in c.tail(10**6)
        ]
        assert len(picked) == 1, picked
        shown = run_kiln("show", "digits", "--json", env=stack.env)
        assert json.loads(shown.stdout)["status"] == "production", shown.stderr
        timings.update(_serves_digits(stack, examples, run_id))
    except BaseException:
        print(_diagnostics(stack, run_id))
        raise
    finally:
        processes = stack.processes()
        stack.stop()
        print("FIGURE cluster-form timings:", json.dumps(timings))
        record_property("timings", json.dumps(timings))
        _pg_exec(f"DROP SCHEMA IF EXISTS kiln_{suffix} CASCADE")
        _pg_exec(f"DROP DATABASE IF EXISTS prefect_{suffix} WITH (FORCE)")
    assert not [p for p in processes if still_running(p)], "a process outlived stop()"
