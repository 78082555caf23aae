"""The optimize flow's variant builds on a real Ray cluster of two nodes (prefect-ray's
RayTaskRunner), each node standing for a machine: its own loopback address, its own KILN_HOME,
one CPU, a custom resource; the registry in PostgreSQL, a DVC remote folder all share, and a
real Prefect server the tasks report to. Each variant's artifact row records the node that
built it. Ray processes are started in their own process groups and stopped by the test
(never `ray stop`, which would stop every Ray process on the machine).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from kiln.processes import http_ok, start_group, stop_group, wait_ready
from kiln.registry.db import session_scope
from kiln.registry.tables import Artifact, ArtifactKind
from serving.supervisor import free_port
from tests.conftest import (
    _pg_exec,
    _pg_schema_url,
    kiln_env,
    pg_available,
    require_service,
    run_kiln,
    set_model_settings,
    upload_digits,
)

BIN = Path(sys.executable).parent


def _ray_node(tmp: Path, env: dict[str, str], ip: str, resource: str, head: str | None) -> object:
    low = free_port()  # a worker-port range of this node's own, away from Ray's defaults
    args = [
        str(BIN / "ray"),
        "start",
        f"--node-ip-address={ip}",
        "--num-cpus=1",
        f"--resources={json.dumps({resource: 1})}",
        "--disable-usage-stats",
        "--object-store-memory=100000000",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 20}",
        "--block",
    ]
    args += [f"--address={head}"] if head else ["--head", f"--port={head_port(env)}"]
    if head is None:
        args.append("--include-dashboard=false")
    return start_group(args, env=env, log_path=tmp / f"ray-{resource}.log")


def head_port(env: dict[str, str]) -> str:
    return env["TEST_RAY_PORT"]


@pytest.fixture
def ray_env(tmp_path: Path) -> Iterator[dict[str, object]]:
    """PostgreSQL schema, a Prefect server, and the environment both Ray nodes share."""
    require_service(pg_available())
    schema = f"kiln_{uuid.uuid4().hex[:10]}"
    _pg_exec(f"CREATE SCHEMA {schema}")
    prefect_port = free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    shared = {
        "KILN_DATABASE_URL": _pg_schema_url(schema),
        "KILN_DVC_REMOTE": str(tmp_path / "remote"),
        "PREFECT_API_URL": api,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    prefect_env = kiln_env(
        tmp_path / "prefect-host",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    server = start_group(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        env=prefect_env,
        log_path=tmp_path / "prefect-server.log",
    )
    try:
        wait_ready(server, http_ok(api + "/health"), timeout_s=120, what="the Prefect server")
        yield {"shared": shared, "tmp": tmp_path}
    finally:
        stop_group(server, timeout_s=20)
        _pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_each_variant_is_built_on_a_ray_node_and_says_which(
    ray_env: dict[str, object], examples: Path
) -> None:
    shared = ray_env["shared"]
    tmp = ray_env["tmp"]
    assert isinstance(shared, dict) and isinstance(tmp, Path)
    port = str(free_port())
    node_env = {
        name: kiln_env(tmp / name / "kiln-home", **shared, TEST_RAY_PORT=port)
        for name in ("node-a", "node-b")
    }
    procs = [_ray_node(tmp, node_env["node-a"], "127.0.0.1", "host_a", None)]
    address = f"127.0.0.1:{port}"
    try:
        time.sleep(3)  # the head's GCS up before the second node joins
        procs.append(_ray_node(tmp, node_env["node-b"], "127.0.0.2", "host_b", address))
        flow_home = tmp / "flow-host" / "kiln-home"
        env = kiln_env(flow_home, **shared)
        upload_digits(examples / "digits", env=env)
        variants = {"onnxruntime": ["fp32", "int8-dynamic"]}
        settings = {"optimize": {"backends": ["onnxruntime"], "precisions": variants}}
        set_model_settings(flow_home, "digits", settings, env=env)
        _wait_nodes(address, env, 2)
        started = time.monotonic()
        opt = run_kiln(
            "optimize", "digits", "--json", env={**env, "KILN_RAY_ADDRESS": address}, timeout=900
        )
        took = time.monotonic() - started
        assert opt.returncode == 0, opt.stderr[-4000:]
        doc = json.loads(opt.stdout)
        with session_scope(str(shared["KILN_DATABASE_URL"])) as session:
            rows = session.exec(
                select(Artifact).where(
                    Artifact.kind.in_([ArtifactKind.onnx, ArtifactKind.quantized])  # type: ignore[attr-defined]
                )
            ).all()
            built = {f"{r.backend}/{r.precision}": r.built_on for r in rows}
        print(f"FIGURE ray variants: {built} in {took:.1f} s; selected {doc['selected']}")
        assert set(built) == {"onnxruntime/fp32", "onnxruntime/int8-dynamic"}, built
        assert all(b.startswith("ray:") for b in built.values()), built
        # one CPU per node: the two builds ran at once, one on each node
        assert len(set(built.values())) == 2, built
        assert any(b.endswith(" 127.0.0.2") for b in built.values()), built
        # both nodes' pushes reached the shared remote: the flow host can fetch each
        for row in rows:
            md5 = row.dvc_hash
            assert (
                Path(str(shared["KILN_DVC_REMOTE"])) / "files" / "md5" / md5[:2] / md5[2:]
            ).is_file()
    finally:
        for proc in reversed(procs):
            stop_group(proc, timeout_s=20)  # type: ignore[arg-type]


def _wait_nodes(address: str, env: dict[str, str], count: int) -> None:
    """Until Ray reports ``count`` live nodes (asked from a child: this process stays Ray-free)."""
    import subprocess

    probe = (
        "import ray, sys; ray.init(sys.argv[1], log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe, address],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        seen = out.stdout.strip() or out.stderr[-500:]
        if seen == str(count):
            return
        time.sleep(1)
    raise AssertionError(f"Ray did not report {count} nodes: {seen}")


def test_a_gpu_backend_is_planned_only_where_ray_reports_a_gpu() -> None:
    """No GPU here: TensorRT is skipped, unless the Ray cluster reports one (then its
    variants are planned with ``gpu``, which makes their Ray tasks ask for one)."""
    from kiln.optimize.pipeline import OptimizeSettings, plan

    class Prepared:
        def __init__(self) -> None:
            self.settings = OptimizeSettings.model_validate(
                {"backends": ["tensorrt"], "precisions": {"tensorrt": ["fp16"]}}
            )
            self.calibration = None
            self.skipped: list[str] = []

    local = Prepared()
    assert plan(local) == []  # type: ignore[arg-type]
    assert local.skipped and local.skipped[0].startswith("tensorrt skipped")
    (planned,) = plan(Prepared(), cluster_gpus=1.0)  # type: ignore[arg-type]
    assert (planned.backend, planned.precision, planned.gpu) == ("tensorrt", "fp16", True)
