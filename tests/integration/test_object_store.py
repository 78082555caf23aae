"""Artifacts in an object store: the DVC remote on S3 (dvc-s3), served by a real SeaweedFS on a
loopback port with an access key it checks (tests/conftest.py ``SeaweedS3``), the registry in
PostgreSQL. Each "host" is a KILN_HOME of its own (its cache):

- host A (127.0.0.2's home) uploads and optimizes digits: every artifact is pushed when it is
  recorded, and `dvc status --cloud` (DVC's own CLI) finds that host in sync with the bucket;
- host B starts with an empty home: its `kiln serve` on 127.0.0.3 pulls exactly the artifact its
  engine serves, checks its sha256, and answers;
- a tampered object is refused with its sha256 and leaves nothing in the host's cache;
- with SeaweedFS stopped, a deploy and an upload fail with one line and change nothing, and both
  work again once it is back.

The credentials are never in a log line, the DVC config or the registry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlmodel import select

from kiln.errors import IntegrityError
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import Artifact, Dataset, DeploymentEvent, ModelVersion
from kiln.store.artifacts import ArtifactStore, ObjectRef
from tests.conftest import (
    RunningGateway,
    SeaweedS3,
    _pg_exec,
    _pg_schema_url,
    digits_rows,
    export_linear,
    infer_request,
    kiln_env,
    pg_available,
    register_variants,
    require_service,
    run_kiln,
    set_model_settings,
    upload_digits,
)

PREFIX = "artifacts"


@dataclass
class Hosts:
    db_url: str
    s3: SeaweedS3
    shared: dict[str, str]  # registry and object store: what every host's environment holds
    tmp: Path

    def env(self, host: str) -> dict[str, str]:
        return kiln_env(self.home(host), **self.shared)

    def home(self, host: str) -> Path:
        return self.tmp / host / "kiln-home"

    def store(self, host: str) -> ArtifactStore:
        return ArtifactStore(
            self.home(host), self.shared["KILN_DVC_REMOTE"], endpoint_url=self.s3.endpoint
        )

    def artifacts(self, version: str | None = None) -> list[ObjectRef]:
        with session_scope(self.db_url) as session:
            if version is None:
                rows: list[Artifact | Dataset] = [
                    *session.exec(select(Artifact)).all(),
                    *session.exec(select(Dataset)).all(),
                ]
                return [ObjectRef.of(r) for r in rows]
            row = crud.require_version(session=session, name="digits", version=version)
            return [ObjectRef.of(a) for a in crud.list_artifacts(session=session, version=row)]

    def selected(self, version: str) -> ObjectRef:
        with session_scope(self.db_url) as session:
            row = crud.require_version(session=session, name="digits", version=version)
            (chosen,) = [a for a in crud.list_artifacts(session=session, version=row) if a.selected]
            return ObjectRef.of(chosen)

    def key(self, ref: ObjectRef) -> str:
        md5 = ref.dvc_hash
        return f"{SeaweedS3.BUCKET}/{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"


@pytest.fixture(scope="module")
def hosts(
    tmp_path_factory: pytest.TempPathFactory, examples: Path, seaweed: SeaweedS3
) -> Iterator[Hosts]:
    require_service(pg_available())
    schema = f"kiln_{uuid.uuid4().hex[:10]}"
    _pg_exec(f"CREATE SCHEMA {schema}")
    db_url = _pg_schema_url(schema)
    shared = {"KILN_DATABASE_URL": db_url, **seaweed.env(PREFIX)}
    hosts = Hosts(db_url, seaweed, shared, tmp_path_factory.mktemp("object-store"))
    env = hosts.env("host-a")
    upload_digits(examples / "digits", env=env)
    optimize = {"optimize": {"backends": ["onnxruntime"], "precisions": {"onnxruntime": ["fp32"]}}}
    set_model_settings(hosts.home("host-a"), "digits", optimize, env=env)
    opt = run_kiln("optimize", "digits", "--json", env=env, timeout=900)
    assert opt.returncode == 0, opt.stderr[-3000:]
    assert register_variants(hosts.home("host-a"), [{"bias": 0.01}], env=env) == ["0.1.1"]
    try:
        yield hosts
    finally:
        _pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _secret_free(hosts: Hosts, *texts: str) -> None:
    for value in texts:
        assert hosts.s3.secret not in value and hosts.s3.key not in value


def _registry_text(db_url: str) -> str:
    """Every row of every table of the registry, as text."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            names = inspect(conn).get_table_names()
            return "\n".join(
                str(row) for name in names for row in conn.execute(text(f'SELECT * FROM "{name}"'))
            )
    finally:
        engine.dispose()


def test_every_artifact_is_pushed_when_recorded(hosts: Hosts) -> None:
    refs = hosts.artifacts()
    assert len(refs) >= 4  # the upload, its dataset, the ONNX export, the variant
    fs = hosts.s3.fs()
    for ref in refs:
        assert fs.exists(hosts.key(ref)), ref  # type: ignore[attr-defined]
        assert fs.info(hosts.key(ref))["size"] == ref.size  # type: ignore[attr-defined]
    # DVC's own CLI in host A's home: its cache and the bucket agree
    status = run_kiln_dvc(hosts, "host-a", "status", "--cloud")
    assert status.returncode == 0, status.stderr
    assert "in sync" in status.stdout, status.stdout
    config = (hosts.home("host-a") / ".dvc" / "config").read_text()
    assert f"s3://{SeaweedS3.BUCKET}/{PREFIX}" in config and hosts.s3.endpoint in config
    _secret_free(hosts, config, _registry_text(hosts.db_url), status.stdout, status.stderr)
    # the access key is really checked: another one cannot read the bucket
    with pytest.raises(PermissionError):
        hosts.s3.fs(key="someone-else", secret="x" * 32).ls(SeaweedS3.BUCKET)  # type: ignore[attr-defined]


def run_kiln_dvc(hosts: Hosts, host: str, *args: str) -> object:
    """DVC's CLI (the venv's) in ``host``'s home, with that host's environment."""
    import subprocess
    import sys

    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(dvc), *args],
        cwd=hosts.home(host),
        env=hosts.env(host),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_engine_on_a_host_with_an_empty_cache_serves_after_pulling(
    hosts: Hosts, examples: Path
) -> None:
    home = hosts.home("host-b")
    home.mkdir(parents=True)
    env = hosts.env("host-b")
    served = hosts.selected("0.1.0")
    deployed = run_kiln("deploy", "digits@0.1.0", "--strategy", "direct", "--json", env=env)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    x, labels = digits_rows(examples, 64)
    with RunningGateway(home, env=hosts.shared, host="127.0.0.3") as gateway:
        resp = httpx.post(
            f"{gateway.url}/v2/models/digits/infer",
            json=infer_request("x", x),
            headers=gateway.headers,
            timeout=60,
        )
        log = gateway.log_path.read_text()
    assert resp.status_code == 200, resp.text
    assert resp.headers["kiln-model-version"] == "0.1.0"
    (output,) = resp.json()["outputs"]
    predicted = np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1)
    assert (predicted == labels).mean() >= 0.9
    # exactly the one object the engine serves came over (no source, no dataset), intact
    pulled = sorted(
        p.relative_to(home).as_posix() for p in (home / "objects").rglob("*") if p.is_file()
    )
    assert pulled == [served.path, f"{served.path}.dvc"]
    assert hosts.store("host-b").verified_path(served.path, served.sha256).is_file()
    logs = [p.read_text() for p in (home / "logs").rglob("*.log")]
    _secret_free(hosts, log, deployed.stderr, *logs)


def test_a_tampered_object_is_refused_with_its_sha256(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, hosts.shared[name])
    ref = hosts.selected("0.1.1")
    fs = hosts.s3.fs()
    good = fs.cat(hosts.key(ref))  # type: ignore[attr-defined]
    fs.pipe(hosts.key(ref), good[:-64] + b"\0" * 64)  # type: ignore[attr-defined]
    home = hosts.home("host-c")
    home.mkdir(parents=True)
    try:
        with pytest.raises(IntegrityError) as refused:
            hosts.store("host-c").fetch(ref)
    finally:
        fs.pipe(hosts.key(ref), good)  # type: ignore[attr-defined]
    message = str(refused.value)
    assert f"sha256 {ref.sha256}" in message and "refused and removed" in message, message
    assert [p for p in (home / "objects").rglob("*") if p.is_file()] == []
    cache = home / ".dvc" / "cache" / "files" / "md5" / ref.dvc_hash[:2]
    assert not cache.exists()
    assert hosts.store("host-c").fetch(ref).is_file()  # the repaired object is taken


def test_the_object_store_down_changes_nothing(hosts: Hosts) -> None:
    env = hosts.env("host-b")
    before = run_kiln("status", "--json", env=env)
    assert before.returncode == 0, before.stderr
    objects_before = sorted((hosts.home("host-a") / "objects").rglob("*"))
    with session_scope(hosts.db_url) as session:
        events_before = len(session.exec(select(DeploymentEvent)).all())
    fresh = export_linear(hosts.tmp / "fresh.pt2", seed=7)  # bytes no host has stored yet
    hosts.s3.stop()
    try:
        deploy = run_kiln("deploy", "digits@0.1.1", "--strategy", "direct", "--json", env=env)
        upload = run_kiln("upload", "other", str(fresh), env=hosts.env("host-a"))
        after = run_kiln("status", "--json", env=env)
    finally:
        hosts.s3.start()
    assert deploy.returncode == 6, deploy.stderr
    (line,) = deploy.stderr.strip().splitlines()[-1:]
    assert "does not answer" in line and "nothing was changed" in line, deploy.stderr
    assert upload.returncode == 6, upload.stderr
    assert "could not track" in upload.stderr, upload.stderr
    assert json.loads(after.stdout)["models"] == json.loads(before.stdout)["models"]
    with session_scope(hosts.db_url) as session:
        assert len(session.exec(select(DeploymentEvent)).all()) == events_before
        assert crud.get_model(session=session, name="other") is None
        statuses = {v.version: str(v.status) for v in session.exec(select(ModelVersion)).all()}
    assert statuses["0.1.1"] == "validated", statuses
    assert sorted((hosts.home("host-a") / "objects").rglob("*")) == objects_before
    _secret_free(hosts, deploy.stderr, upload.stderr)
    # back: the same deploy goes through
    again = run_kiln("deploy", "digits@0.1.1", "--strategy", "direct", "--json", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["version"] == "0.1.1"
