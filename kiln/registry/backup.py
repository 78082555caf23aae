"""Backup and restore of Kiln's critical data: the registry and the artifacts it references.

A backup folder holds a consistent registry snapshot (SQLite online backup, or ``pg_dump`` of
Kiln's schema), the DVC pointer of every referenced artifact, and ``manifest.json`` listing their
sha256 hashes and the DVC remote that holds their bytes (the manifest is written last: a folder
without one is an unfinished backup). Artifact bytes are not copied: the DVC remote is their
backup, and the manifest is taken from the same snapshot as the registry, so every artifact the
restored registry names is in it.

``restore`` brings an empty registry and ``KILN_HOME`` back to that state. It checks first that
the remote still holds every artifact, pulls them and checks each sha256, and only then installs
the registry, so a failed restore leaves the registry as empty as it found it and can be run again
(with ``KILN_DVC_REMOTE`` pointing at another copy of the remote, for instance).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, cast

import yaml
from sqlalchemy import Engine, exists, inspect, select, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel

from kiln.errors import Conflict, ExternalToolError, IntegrityError, InvalidInput, KilnError
from kiln.registry import crud
from kiln.registry.db import dispose_engines, engine_for, make_engine
from kiln.registry.tables import Artifact, Dataset
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore, _dvc_repo_class

MANIFEST = "manifest.json"
FORMAT = 1  # manifest["kiln_backup"]; bump when a backup's layout changes
SQLITE_SNAPSHOT = "registry.db"
PG_SNAPSHOT = "registry.pgdump"
POINTERS = "pointers"
# Top-level keys a DVC pointer may carry; anything else (wdir, deps, cmd) could aim DVC elsewhere.
POINTER_KEYS = {"outs", "md5", "meta", "desc"}


# ---------------------------------------------------------------------------------- backup
def backup(settings: Settings, dest: Path) -> dict[str, Any]:
    """Write a snapshot of the registry and its artifact manifest into the empty folder ``dest``."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"backup folder {dest} is not empty: pass a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore.of(settings).ensure()
    url = settings.db_url
    engine = engine_for(url)  # migrated before the snapshot
    with store.locked():  # no upload stores files while the snapshot is taken
        if _is_sqlite(url):
            snapshot, schema = dest / SQLITE_SNAPSHOT, None
            items = _sqlite_snapshot(_sqlite_path(url), snapshot)
        else:
            snapshot = dest / PG_SNAPSHOT
            schema, items = _pg_snapshot(engine, url, snapshot)
        for item in items:
            pointer = dest / POINTERS / f"{item['path']}.dvc"
            pointer.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f"{store.resolve(item['path'])}.dvc", pointer)
    manifest = {
        "kiln_backup": FORMAT,
        "database": "sqlite" if schema is None else "postgresql",
        "schema": schema,
        "snapshot": snapshot.name,
        "remote": store.remote_url,
        "artifacts": items,
    }
    tmp = dest / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, dest / MANIFEST)
    return manifest


def _referenced(session: Session) -> list[dict[str, Any]]:
    rows: list[Artifact | Dataset] = [
        *crud.all_artifacts(session=session),
        *crud.all_datasets(session=session),
    ]
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(row.path, {"path": row.path, "sha256": row.sha256, "size": row.size})
    return sorted(seen.values(), key=lambda r: r["path"])


def _sqlite_snapshot(db: Path, snapshot: Path) -> list[dict[str, Any]]:
    """Copy the live database with SQLite's online backup; the manifest is read from the copy."""
    src, dst = sqlite3.connect(db), sqlite3.connect(snapshot)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    engine = make_engine(f"sqlite:///{snapshot}")
    try:
        with Session(engine) as session:
            return _referenced(session)
    finally:
        engine.dispose()
        for leftover in (Path(f"{snapshot}-wal"), Path(f"{snapshot}-shm")):
            leftover.unlink(missing_ok=True)


def _pg_snapshot(engine: Engine, url: str, snapshot: Path) -> tuple[str, list[dict[str, Any]]]:
    """``pg_dump`` Kiln's schema and read the manifest from one and the same MVCC snapshot."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            snapshot_id = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            with Session(bind=conn) as session:
                items = _referenced(session)
            # The exported snapshot lives as long as this transaction: dump inside it.
            _run(
                [
                    "pg_dump",
                    "--format=custom",
                    "--no-owner",
                    "--no-privileges",
                    f"--snapshot={snapshot_id}",
                    f"--schema={_quote(schema)}",
                    f"--file={snapshot}",
                    *_pg_conn(url),
                ],
                env=_pg_env(url),
            )
    return schema, items


# --------------------------------------------------------------------------------- restore
def restore(settings: Settings, src: Path) -> dict[str, Any]:
    """Bring an empty registry and ``KILN_HOME`` back to the backup in ``src``."""
    manifest = _read_manifest(src)
    url = settings.db_url
    kind = manifest["database"]
    if kind == "sqlite" and not _is_sqlite(url):
        raise InvalidInput("this backup is of a SQLite registry: unset KILN_DATABASE_URL")
    if kind == "postgresql" and _is_sqlite(url):
        raise InvalidInput("this backup is of a PostgreSQL registry: set KILN_DATABASE_URL")
    remote = settings.dvc_remote or manifest["remote"]
    store = ArtifactStore(settings.home, remote, endpoint_url=settings.s3_endpoint_url).ensure()
    items = [(item["path"], item["sha256"]) for item in manifest["artifacts"]]
    with store.locked():  # no upload into this home while it is being restored
        if not _registry_empty(url):
            raise Conflict(
                "the registry is not empty: restore into an empty one (a new "
                "KILN_HOME, or an empty schema in KILN_DATABASE_URL)"
            )
        if kind == "postgresql":
            _check_pg_target(url, manifest["schema"])
        _use_remote(store, remote)
        try:
            for rel, _ in items:
                _install_pointer(store, src, rel)
            _check_remote(store, remote, [rel for rel, _ in items])
            try:
                store.restore(items)  # pulls, then checks every sha256
            except KilnError as exc:
                raise type(exc)(_one_line(str(exc))) from None
            if kind == "sqlite":
                _install_sqlite(src / SQLITE_SNAPSHOT, _sqlite_path(url))
            else:
                _install_pg(src / PG_SNAPSHOT, url)
        except BaseException:
            for rel, _ in items:  # nothing references them: leave the home as it was
                store.discard(rel)
            raise
        finally:
            dispose_engines()  # this process may hold engines on the replaced database
    engine_for(url)  # upgrades an older snapshot to this Kiln's schema
    return {"restored": len(items), "database": kind, "remote": remote}


def _read_manifest(src: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError):
        raise InvalidInput(
            f"{src} is not a Kiln backup (no readable {MANIFEST}): pass the "
            "folder `kiln backup` wrote"
        ) from None
    try:
        if manifest["kiln_backup"] != FORMAT:
            raise InvalidInput(
                f"{src} is a backup of format {manifest['kiln_backup']}; this "
                f"Kiln reads format {FORMAT}: restore it with a matching Kiln"
            )
        if manifest["database"] not in ("sqlite", "postgresql") or not all(
            isinstance(i["path"], str) and isinstance(i["sha256"], str)
            for i in manifest["artifacts"]
        ):
            raise ValueError
        if manifest["database"] == "postgresql" and not isinstance(manifest["schema"], str):
            raise ValueError
        return cast(dict[str, Any], manifest)
    except (KeyError, TypeError, ValueError):
        raise InvalidInput(f"{src}/{MANIFEST} is malformed: pass an unmodified backup") from None


def _registry_empty(url: str) -> bool:
    """True when no Kiln table holds a row (a fresh or merely migrated database)."""
    if _is_sqlite(url) and not _sqlite_path(url).exists():
        return True
    engine = make_engine(url)  # no migration: the target may be an empty database
    try:
        present = set(inspect(engine).get_table_names())
        tables = [t for t in SQLModel.metadata.sorted_tables if t.name in present]
        with engine.connect() as conn:
            return not any(conn.execute(select(exists().select_from(t))).scalar() for t in tables)
    finally:
        engine.dispose()


def _install_pointer(store: ArtifactStore, src: Path, rel: str) -> None:
    """Copy ``rel``'s DVC pointer from the backup after checking it names only that file."""
    target = store.resolve(rel)  # refuses anything outside objects/ (RELIABILITY 18)
    pointer = src / POINTERS / f"{rel}.dvc"
    try:
        meta = yaml.safe_load(pointer.read_text())
        outs = meta["outs"]
        ok = (
            set(meta) <= POINTER_KEYS
            and len(outs) == 1
            and outs[0]["path"] == target.name
            and isinstance(outs[0]["md5"], str)
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise InvalidInput(
            f"the backup's DVC pointer for {rel} is missing or malformed: pass an unmodified backup"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pointer, f"{target}.dvc")


def _use_remote(store: ArtifactStore, remote: str) -> None:
    """Point the home's DVC repository at ``remote`` (it may have been set up with another)."""
    with (
        redirect_stdout(sys.stderr),
        _dvc_repo_class()(str(store.home)) as repo,
        repo.config.edit() as conf,
    ):
        conf["remote"]["kiln"] = {"url": remote}
        conf["core"]["remote"] = "kiln"


def _check_remote(store: ArtifactStore, remote: str, rels: list[str]) -> None:
    """Refuse, before anything is installed, when the remote lost artifacts the backup needs."""
    if not rels:
        return
    targets = [f"{store.resolve(rel)}.dvc" for rel in rels]
    try:
        with redirect_stdout(sys.stderr), _dvc_repo_class()(str(store.home)) as repo:
            status = repo.status(targets=targets, cloud=True)
    except Exception as exc:
        raise ExternalToolError(_one_line(f"cannot read the DVC remote {remote}: {exc}")) from None
    lost = sorted(rel for rel, state in status.items() if state == "missing")
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise IntegrityError(
            f"the DVC remote {remote} has lost {len(lost)} of the backup's {len(rels)} artifacts "
            f"({lost[0]}{more}); nothing was restored: point KILN_DVC_REMOTE at a copy of the "
            "remote that holds them"
        )


def _install_sqlite(snapshot: Path, target: Path) -> None:
    """Put the snapshot in place atomically (temp file, fsync, rename)."""
    dispose_engines()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore.tmp")
    shutil.copyfile(snapshot, tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    for leftover in (Path(f"{target}-wal"), Path(f"{target}-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------ PostgreSQL
def _check_pg_target(url: str, schema: str) -> None:
    """The URL's schema must exist and be the one dumped: a dump names its schema in every
    statement, so it cannot land in another one."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            current = conn.execute(text("SELECT current_schema()")).scalar()
    finally:
        engine.dispose()
    if current is None:
        raise InvalidInput(
            "KILN_DATABASE_URL's search_path names no existing schema: create "
            f"the backup's (CREATE SCHEMA {schema}) and point search_path at it"
        )
    if current != schema:
        raise InvalidInput(
            f"this backup holds schema {schema!r} but KILN_DATABASE_URL uses "
            f"{current!r}: restore with options=-csearch_path={schema}"
        )


def _install_pg(dump: Path, url: str) -> None:
    """``pg_restore`` the dump into the existing, empty schema, in one transaction.

    The dump starts with ``CREATE SCHEMA``, which fails on the existing schema; rather than drop
    the schema (and the owner, grants and defaults its administrator gave it), the schema's own
    entries are left out of the restore list. Kiln's tables there are empty (checked), possibly
    created by a migration: they are dropped so the dump can create them.
    """
    listing = _run(["pg_restore", "--list", str(dump)])
    keep = [line for line in listing.splitlines() if not _is_schema_entry(line)]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            SQLModel.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()
    # The backup folder may be read-only: the list goes to a temp file.
    fd, name = tempfile.mkstemp(prefix="kiln-restore-", suffix=".list")
    toc_path = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(keep) + "\n")
        _run(
            [
                "pg_restore",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                f"--use-list={toc_path}",
                *_pg_conn(url),
                str(dump),
            ],
            env=_pg_env(url),
        )
    finally:
        toc_path.unlink(missing_ok=True)


def _is_schema_entry(line: str) -> bool:
    """A ``pg_restore --list`` line for the schema itself (``SCHEMA``, or a comment or ACL on
    it), as in ``6; 2615 17451 SCHEMA - kiln owner``."""
    if line.startswith(";") or ";" not in line:
        return False
    words = line.split(";", 1)[1].split()
    return len(words) >= 5 and (
        words[2] == "SCHEMA" or (words[2] in ("COMMENT", "ACL") and words[4] == "SCHEMA")
    )


def _pg_conn(url: str) -> list[str]:
    """libpq connection arguments for a SQLAlchemy URL (the password goes in PGPASSWORD)."""
    parsed = make_url(url).set(drivername="postgresql", password=None)
    return ["--dbname", parsed.render_as_string(hide_password=False)]


def _pg_env(url: str) -> dict[str, str]:
    password = make_url(url).password
    return {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}


def _quote(identifier: str) -> str:
    """An exact-match pg_dump pattern for ``identifier`` (no case folding, no wildcards)."""
    return '"' + identifier.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------- helpers
def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise InvalidInput(
            "an in-memory SQLite registry cannot be backed up or restored: set "
            "KILN_HOME or a file-backed KILN_DATABASE_URL"
        )
    return Path(database)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env=env, check=False
        )
    except FileNotFoundError:
        raise ExternalToolError(
            f"{cmd[0]} is not installed: install the PostgreSQL client "
            "tools (pg_dump, pg_restore) of the server's major version"
        ) from None
    except subprocess.TimeoutExpired:
        raise ExternalToolError(f"{cmd[0]} ran for over 600 s: check the database") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        reason = next(
            (line for line in lines if "error" in line.lower()),
            lines[-1] if lines else f"exit status {proc.returncode}",
        )
        raise ExternalToolError(_one_line(f"{cmd[0]} failed: {reason}"))
    return proc.stdout
