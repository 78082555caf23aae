"""The DVC-backed artifact store: content addresses, integrity, restore, sweep."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import IntegrityError, InvalidInput, NotFound
from kiln.store.artifacts import ArtifactStore, ObjectRef


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "home", str(tmp_path / "remote")).ensure()


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(50_000))
    return path


def test_put_is_content_addressed_tracked_and_pushed(store: ArtifactStore, blob: Path) -> None:
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    stored = store.put(blob, suffix=".bin")
    assert stored.path == f"objects/{sha[:2]}/{sha}.bin" and stored.sha256 == sha
    assert (store.home / stored.path).read_bytes() == blob.read_bytes()
    assert (store.home / f"{stored.path}.dvc").is_file()
    md5 = stored.dvc_hash
    assert (Path(store.remote_url) / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert store.put(blob, suffix=".bin").created is False  # same content: stored once


def test_corrupt_files_are_refused(store: ArtifactStore, blob: Path) -> None:
    stored = store.put(blob, suffix=".bin")
    path = store.home / stored.path
    assert store.verified_path(stored.path, stored.sha256) == path
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        store.verified_path(stored.path, stored.sha256)
    path.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(IntegrityError, match="corrupt"):
        store.verified_path(stored.path, stored.sha256)
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.verified_path(stored.path, stored.sha256)


@pytest.mark.parametrize(
    "rel",
    [
        "../registry.db",
        "objects/../../etc/passwd",
        "/etc/passwd",
        "//proc/self/root",
        "objects/%2e%2e/x",
        "objects",
    ],
)
def test_paths_outside_the_store_are_not_found(store: ArtifactStore, rel: str) -> None:
    with pytest.raises((NotFound, IntegrityError)):
        store.verified_path(rel, "0" * 64)


def test_object_paths_are_server_generated(store: ArtifactStore) -> None:
    with pytest.raises(InvalidInput):
        store.object_path("../../x", ".pt2")
    with pytest.raises(InvalidInput):
        store.object_path("a" * 64, "/../x")


def test_restore_onto_an_empty_cache(store: ArtifactStore, blob: Path) -> None:
    stored = store.put(blob, suffix=".bin")
    shutil.rmtree(store.home / ".dvc" / "cache")
    (store.home / stored.path).unlink()
    [restored] = store.restore([(stored.path, stored.sha256)])
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == stored.sha256


def test_restore_refuses_a_corrupt_remote_copy(store: ArtifactStore, blob: Path) -> None:
    stored = store.put(blob, suffix=".bin")
    shutil.rmtree(store.home / ".dvc" / "cache")
    (store.home / stored.path).unlink()
    with pytest.raises(IntegrityError):
        store.restore([(stored.path, "f" * 64)])  # the registry expects other content


def test_sweep_removes_orphans_and_dead_staging(store: ArtifactStore, blob: Path) -> None:
    kept = store.put(blob, suffix=".bin")
    other = blob.with_name("other.bin")
    other.write_bytes(b"orphan")
    orphan = store.put(other, suffix=".bin")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (store.home / "tmp" / f"op-{dead}-abc").mkdir()
    with store.staging() as mine:
        removed = store.sweep({kept.path})
        assert mine.is_dir()  # a live operation's staging survives
    assert orphan.path in removed and not (store.home / orphan.path).exists()
    assert not Path(f"{store.home / orphan.path}.dvc").exists()
    assert (store.home / kept.path).is_file()
    assert not (store.home / "tmp" / f"op-{dead}-abc").exists()


def test_sweep_waits_for_a_running_operation(store: ArtifactStore, blob: Path) -> None:
    other = blob.with_name("other.bin")
    other.write_bytes(b"not yet referenced")
    with store.locked():
        stored = store.put(other, suffix=".bin")
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from kiln.store.artifacts import ArtifactStore; "
                "print(ArtifactStore(Path(sys.argv[1]), sys.argv[2]).sweep(set()))",
                str(store.home),
                store.remote_url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == "[]"
        assert (store.home / stored.path).is_file()


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_another_host_fetches_exactly_the_one_object_it_needs(
    store: ArtifactStore, blob: Path, tmp_path: Path
) -> None:
    """Two homes sharing one remote: the second, empty, pulls one artifact by the registry's
    record (path, sha256, size, md5) and nothing else."""
    wanted = ObjectRef.of(store.put(blob, suffix=".bin"))
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(10_000))
    store.put(other, suffix=".bin")
    host_b = ArtifactStore(tmp_path / "host-b", store.remote_url)
    path = host_b.fetch(wanted)
    assert path.read_bytes() == blob.read_bytes()
    assert [p for p in _tree(host_b.home / "objects") if not p.endswith(".dvc")] == [
        wanted.path[8:]
    ]
    assert host_b.fetch(wanted) == path  # present now: no second pull


def test_a_damaged_remote_object_is_refused_and_leaves_nothing(
    store: ArtifactStore, blob: Path, tmp_path: Path
) -> None:
    wanted = ObjectRef.of(store.put(blob, suffix=".bin"))
    md5 = wanted.dvc_hash
    (Path(store.remote_url) / "files" / "md5" / md5[:2] / md5[2:]).write_bytes(b"tampered")
    host_b = ArtifactStore(tmp_path / "host-b", store.remote_url)
    with pytest.raises(IntegrityError, match=f"sha256 {wanted.sha256}") as caught:
        host_b.fetch(wanted)
    assert "refused and removed" in str(caught.value)
    assert _tree(host_b.home / "objects") == []  # no file, no pointer
    assert not (host_b.home / ".dvc" / "cache" / "files" / "md5" / md5[:2]).exists()
    (Path(store.remote_url) / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    with pytest.raises(NotFound, match=f"holds no copy of .*sha256 {wanted.sha256}"):
        host_b.fetch(wanted)
    assert _tree(host_b.home / "objects") == []
    assert host_b.missing_remotely([wanted]) == [wanted]


def test_the_remote_is_what_the_settings_say(tmp_path: Path) -> None:
    """A home initialised with one remote follows a changed KILN_DVC_REMOTE and endpoint."""
    home = tmp_path / "home"
    ArtifactStore(home, str(tmp_path / "r1")).ensure()
    ArtifactStore(home, "s3://bucket/kiln", endpoint_url="http://127.0.0.1:9").ensure()
    config = (home / ".dvc" / "config").read_text()
    assert "s3://bucket/kiln" in config and "endpointurl = http://127.0.0.1:9" in config
    assert "r1" not in config
