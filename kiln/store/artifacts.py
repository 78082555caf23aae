"""The artifact store: content-addressed files in ``KILN_HOME``, tracked and pushed with DVC.

Lifecycle of a file: ``put`` hashes it (sha256), writes it atomically (temp file, fsync, rename)
to ``objects/<sha[:2]>/<sha><suffix>`` (a path only the store generates), ``dvc add``s it and
pushes it to the remote. ``verified_path`` re-hashes before anything is served, ``fetch`` pulls
one artifact the registry knows onto a host whose cache lacks it (another machine of a
cluster: the registry row holds DVC's md5, so the pointer is rebuilt from it), ``restore``
pulls files back from the remote onto an empty cache, ``sweep`` removes what a killed upload
left behind. ``KILN_HOME`` is its own DVC repository (``dvc init --no-scm``) and the cache of
this host; the remote (a folder, or ``s3://`` with an endpoint) is what the hosts share.
Credentials for S3 come from the AWS variables or files boto reads; the store never writes
them anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from filelock import FileLock, Timeout

from kiln.errors import ExternalToolError, IntegrityError, InvalidInput, NotFound
from kiln.faults import failpoint

if TYPE_CHECKING:
    from kiln.settings import Settings

OBJECTS = "objects"
STAGING = "tmp"
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ObjectRef:
    """A registry row's record of a stored file, kept past its session (``Recorded``)."""

    path: str
    sha256: str
    size: int
    dvc_hash: str

    @classmethod
    def of(cls, row: Recorded) -> ObjectRef:
        return cls(row.path, row.sha256, row.size, row.dvc_hash)


class Recorded(Protocol):
    """What the registry records of an artifact (an ``Artifact`` row, serving's ``ArtifactRef``)."""

    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def dvc_hash(self) -> str: ...


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to KILN_HOME
    sha256: str
    size: int
    dvc_hash: str
    created: bool  # False when the same content was already stored


class ArtifactStore:
    """Kiln's artifact store in ``home`` with the DVC remote at ``remote_url``."""

    def __init__(self, home: Path, remote_url: str, *, endpoint_url: str | None = None) -> None:
        self.home = home
        self.remote_url = remote_url
        self.endpoint_url = endpoint_url
        self._lock = FileLock(str(home / "store.lock"))

    @classmethod
    def of(cls, settings: Settings) -> ArtifactStore:
        """The store ``settings`` describe: ``KILN_HOME``, ``KILN_DVC_REMOTE``, its endpoint."""
        return cls(settings.home, settings.remote_url, endpoint_url=settings.s3_endpoint_url)

    # ------------------------------------------------------------------ setup
    def ensure(self) -> ArtifactStore:
        """Create the DVC repository and its default remote (idempotent)."""
        (self.home / OBJECTS).mkdir(parents=True, exist_ok=True)
        (self.home / STAGING).mkdir(parents=True, exist_ok=True)
        if not (self.home / ".dvc").is_dir():
            with self._lock:
                if not (self.home / ".dvc").is_dir():
                    self._dvc_init()
        elif self._remote_config() != self._configured():
            with self._lock:
                self._set_remote()
        return self

    def _remote_config(self) -> dict[str, str]:
        """The DVC remote this home's repository pushes to and pulls from."""
        return {"url": self.remote_url} | (
            {"endpointurl": self.endpoint_url} if self.endpoint_url else {}
        )

    def _configured(self) -> dict[str, str]:
        import configobj  # DVC's own config parser

        conf = configobj.ConfigObj(str(self.home / ".dvc" / "config"))
        return dict(conf.get('remote "kiln"', {}))

    def _set_remote(self) -> None:
        """Point the repository at this store's remote (the settings changed since init)."""
        with self._repo().config.edit() as conf:
            conf["remote"]["kiln"] = self._remote_config()
            conf["core"]["remote"] = "kiln"

    def _dvc_init(self) -> None:
        Repo = _dvc_repo_class()
        with redirect_stdout(sys.stderr):  # DVC prints; Kiln's stdout is for --json
            repo = Repo.init(str(self.home), no_scm=True, force=True)
        with repo.config.edit() as conf:
            conf["remote"]["kiln"] = self._remote_config()
            conf["core"]["remote"] = "kiln"
        # The registry, staging and lock files are not artifacts.
        (self.home / ".dvcignore").write_text(
            "/registry.db*\n/tmp/\n/store.lock\n/prefect/\n/dvc-remote/\n"
        )
        if "://" not in self.remote_url:
            Path(self.remote_url).mkdir(parents=True, exist_ok=True)

    def _repo(self) -> Any:
        return _dvc_repo_class()(str(self.home))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the store across processes (uploads, sweeps, restores)."""
        with self._lock:
            yield

    # ---------------------------------------------------------------- staging
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder for one operation's temporary files; removed on exit."""
        path = self.home / STAGING / f"op-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- writes
    def object_path(self, sha256: str, suffix: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidInput("sha256 must be 64 lowercase hex digits")
        if suffix and not (suffix.startswith(".") and suffix[1:].isalnum()):
            raise InvalidInput(f"bad artifact suffix {suffix!r}")
        return f"{OBJECTS}/{sha256[:2]}/{sha256}{suffix}"

    def put(self, src: Path, *, suffix: str) -> StoredFile:
        """Store ``src`` under its content address, track it with DVC and push it.

        Callers hold ``locked()`` so that a sweep never sees a file before its registry row.
        """
        sha = sha256_file(src)
        rel = self.object_path(sha, suffix)
        final = self.home / rel
        if final.is_file() and sha256_file(final) == sha and Path(f"{final}.dvc").is_file():
            return StoredFile(rel, sha, final.stat().st_size, self._dvc_hash(final), False)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        with src.open("rb") as fin, tmp.open("wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        if sha256_file(tmp) != sha:  # the source changed while we copied it
            tmp.unlink()
            raise InvalidInput(f"{src.name} changed while it was being stored; try again")
        failpoint("store.before_rename")
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        failpoint("store.after_rename")
        try:
            with redirect_stdout(sys.stderr):
                repo = self._repo()
                stages = repo.add([str(final)])
                dvc_hash = stages[0].outs[0].hash_info.value
                repo.push(targets=[f"{final}.dvc"])
        except Exception as exc:
            self.discard(rel)
            raise ExternalToolError(f"DVC could not track {rel}: {exc}") from exc
        return StoredFile(rel, sha, final.stat().st_size, dvc_hash, True)

    def _dvc_hash(self, final: Path) -> str:
        import yaml

        meta = yaml.safe_load(Path(f"{final}.dvc").read_text())
        return str(meta["outs"][0]["md5"])

    def discard(self, rel: str) -> None:
        """Remove a stored file and its .dvc pointer (the DVC cache is left to `dvc gc`)."""
        final = self.resolve(rel)
        for path in (final, Path(f"{final}.dvc"), final.parent / ".gitignore"):
            path.unlink(missing_ok=True)
        _remove_empty(final.parent, stop=self.home / OBJECTS)

    def purge(self, rels: Iterable[str]) -> list[str]:
        """Remove stored files completely: the file, its .dvc pointer, its DVC cache entry and,
        when the remote is this home's own local folder, its copy there. Content that another
        pointer still tracks keeps its cache and remote entries. For undoing what nothing
        references any more (a deleted, never-deployed version); callers hold ``locked()``
        and pass only paths no registry row references. Returns the paths removed."""
        removed: list[str] = []
        md5s: set[str] = set()
        for rel in rels:
            final = self.resolve(rel)
            pointer = Path(f"{final}.dvc")
            if pointer.is_file():
                try:
                    md5s.add(self._dvc_hash(final))
                except Exception:  # an unreadable pointer: the file still goes
                    pass
            if final.exists() or pointer.exists():
                removed.append(rel)
            self.discard(rel)
            _remove_empty(final.parent, stop=self.home / OBJECTS)
        if md5s:
            kept = set()
            for other in (self.home / OBJECTS).glob("*/*.dvc"):
                try:
                    kept.add(self._dvc_hash(Path(str(other).removesuffix(".dvc"))))
                except Exception:
                    continue
            roots = [self.home / ".dvc" / "cache"]
            remote = Path(self.remote_url) if "://" not in self.remote_url else None
            if remote is not None and remote.resolve().is_relative_to(self.home.resolve()):
                roots.append(remote)
            for md5 in md5s - kept:
                for root in roots:
                    entry = root / "files" / "md5" / md5[:2] / md5[2:]
                    entry.unlink(missing_ok=True)
                    _remove_empty(entry.parent, stop=root / "files" / "md5")
        return removed

    # ------------------------------------------------------------------ reads
    def resolve(self, rel: str) -> Path:
        """The absolute path of ``rel``, refusing anything outside ``objects/`` (RELIABILITY 18)."""
        root = (self.home / OBJECTS).resolve()
        target = (self.home / rel).resolve()
        if not target.is_relative_to(root) or target == root:
            raise NotFound(f"no artifact at {rel!r}")
        return target

    def verified_path(self, rel: str, sha256: str) -> Path:
        """``rel``'s path after checking its sha256; a mismatch is refused, never served."""
        path = self.resolve(rel)
        if not path.is_file():
            raise IntegrityError(
                f"artifact {rel} is missing: restore it with `kiln restore` or a DVC pull"
            )
        actual = sha256_file(path)
        if actual != sha256:
            raise IntegrityError(
                f"artifact {rel} is corrupt (sha256 {actual[:12]}..., registry says "
                f"{sha256[:12]}...): restore it from the DVC remote"
            )
        return path

    def fetch(self, artifact: Recorded) -> Path:
        """``artifact``'s path on this host after checking its sha256, pulled from the remote
        first when this host's cache lacks it: exactly that one object, rebuilt from the md5 the
        registry recorded. A copy that does not match the sha256, or a pull that fails, leaves
        nothing behind (no file, no pointer, no DVC cache entry) and raises IntegrityError or
        ExternalToolError naming the artifact and its sha256."""
        path = self.resolve(artifact.path)
        if path.is_file() or not artifact.dvc_hash:
            return self.verified_path(artifact.path, artifact.sha256)
        self.ensure()
        with self._lock:
            if not path.is_file():  # another process may have pulled it meanwhile
                self._pull_one(artifact, path)
        return self.verified_path(artifact.path, artifact.sha256)

    def _pull_one(self, artifact: Recorded, path: Path) -> None:
        pointer = Path(f"{path}.dvc")
        wrote_pointer = not pointer.is_file()
        if wrote_pointer:
            import yaml

            path.parent.mkdir(parents=True, exist_ok=True)
            out = {"md5": artifact.dvc_hash, "size": artifact.size, "hash": "md5"}
            pointer.write_text(yaml.safe_dump({"outs": [out | {"path": path.name}]}))
        what = f"artifact {artifact.path} (sha256 {artifact.sha256})"
        try:
            failpoint("store.before_pull")
            with redirect_stdout(sys.stderr):
                self._repo().pull(targets=[str(pointer)])
        except Exception as exc:
            from dvc.exceptions import CheckoutError

            self._forget(path, pointer if wrote_pointer else None, artifact.dvc_hash)
            if isinstance(exc, CheckoutError):  # the download found nothing to fetch
                raise NotFound(
                    f"the DVC remote {self.remote_url} holds no copy of {what}: push it "
                    "from a host that has it (`dvc push` in that host's KILN_HOME)"
                ) from None
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ExternalToolError(
                f"could not pull {what} from the DVC remote {self.remote_url} ({reason}): "
                "check that the remote answers and this host's credentials for it"
            ) from None
        actual = sha256_file(path) if path.is_file() else "nothing"
        if actual != artifact.sha256:
            self._forget(path, pointer if wrote_pointer else None, artifact.dvc_hash)
            raise IntegrityError(
                f"{what}: the copy pulled from the DVC remote {self.remote_url} has sha256 "
                f"{actual}; refused and removed, the remote's object is damaged: push it "
                "again from a host whose copy checks out"
            )

    def _forget(self, path: Path, pointer: Path | None, md5: str) -> None:
        """Undo a failed pull: the checked-out file, the pointer it wrote, the cache entry."""
        path.unlink(missing_ok=True)
        if pointer is not None:
            pointer.unlink(missing_ok=True)
        cache = self.home / ".dvc" / "cache" / "files" / "md5"
        (cache / md5[:2] / md5[2:]).unlink(missing_ok=True)
        _remove_empty(cache / md5[:2], stop=cache)
        _remove_empty(path.parent, stop=self.home / OBJECTS)

    def missing_remotely(self, artifacts: Iterable[Recorded]) -> list[Recorded]:
        """Those of ``artifacts`` the remote does not hold (by their recorded md5; a row without
        one, from before md5s were recorded, cannot be asked about and is left out); raises
        ExternalToolError when the remote does not answer. What a deploy checks before it
        changes anything: every host that will serve a version must be able to pull it."""
        artifacts = list(artifacts)
        self.ensure()
        try:
            with redirect_stdout(sys.stderr):
                odb = self._repo().cloud.get_remote_odb(command="status")
                return [a for a in artifacts if a.dvc_hash and not _holds(odb, a.dvc_hash)]
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ExternalToolError(
                f"the DVC remote {self.remote_url} does not answer ({reason}): nothing was "
                "changed; try again when it is back"
            ) from None

    def restore(self, items: Iterable[tuple[str, str]]) -> list[Path]:
        """Pull ``(path, sha256)`` files from the DVC remote, then check every hash."""
        items = list(items)
        targets = [f"{self.resolve(rel)}.dvc" for rel, _ in items]
        missing = [t for t in targets if not Path(t).is_file()]
        if missing:
            raise NotFound(f"no DVC pointer for {len(missing)} artifact(s); restore a backup")
        try:
            with self._lock, redirect_stdout(sys.stderr):
                self._repo().pull(targets=targets, force=True)
        except Exception as exc:
            raise ExternalToolError(f"DVC pull from {self.remote_url} failed: {exc}") from exc
        return [self.verified_path(rel, sha) for rel, sha in items]

    # ---------------------------------------------------------------- cleanup
    def sweep(self, referenced: set[str]) -> list[str]:
        """Remove staging folders of dead processes and objects no registry row references.

        Skipped (returns []) while another process holds the store.
        """
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return []
        removed: list[str] = []
        try:
            for entry in (self.home / STAGING).glob("op-*"):
                owner = entry.name.split("-")[1]
                if not owner.isdigit():
                    continue  # not a staging() folder (e.g. a flow's own temporary dir)
                if not _alive(int(owner)):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.relative_to(self.home).as_posix())
            for path in sorted((self.home / OBJECTS).glob("*/*")):
                if path.name == ".gitignore" or path.suffix == ".dvc":
                    continue
                rel = path.relative_to(self.home).as_posix()
                if path.name.endswith(".tmp"):
                    path.unlink()
                elif rel not in referenced:
                    self.discard(rel)
                else:
                    continue
                removed.append(rel)
            for pointer in (self.home / OBJECTS).glob("*/*.dvc"):
                rel = pointer.relative_to(self.home).as_posix().removesuffix(".dvc")
                if rel not in referenced:
                    self.discard(rel)
        finally:
            self._lock.release()
        return removed


def _holds(odb: Any, md5: str) -> bool:
    """Whether DVC's object database ``odb`` has ``md5``: False when it answers that it has
    not, an error when it does not answer (``exists`` would say False to both)."""
    try:
        odb.fs.info(odb.oid_to_path(md5))
    except FileNotFoundError:
        return False
    return True


def _dvc_repo_class() -> Any:
    """DVC's Repo, with DVC's info logging (which it sends to stdout) turned down."""
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)
    return Repo


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_empty(folder: Path, *, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) ``stop``."""
    stop = stop.resolve()
    folder = folder.resolve()
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            return
        folder = folder.parent
