"""`kiln backup` / `kiln restore` through the real CLI, on SQLite and on PostgreSQL.

A restore goes into a brand-new KILN_HOME whose only link to the old one is the DVC remote the
backup's manifest names; the old home's DVC cache and objects are deleted first, so every restored
byte provably comes from the remote. Every refusal checks the error (exit code, one line) and
that nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kiln.intake.upload import upload
from kiln.settings import get_settings
from tests.conftest import _pg_exec, export_linear, run_kiln

VERSIONS = ("0.1.0", "0.1.1")


# ---------------------------------------------------------------------------------- helpers
def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def _refused(proc: subprocess.CompletedProcess[str], *, code: int, match: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _populate(tiny_pt2: Path, tmp_path: Path) -> dict[str, str]:
    """tiny@0.1.0 and tiny@0.1.1 (other bytes), uploaded in-process; returns version -> sha."""
    other = export_linear(tmp_path / "other.pt2", seed=1)
    shas = {}
    for version, source in zip(VERSIONS, (tiny_pt2, other), strict=True):
        result = upload(
            settings=get_settings(),
            name="tiny",
            source=str(source),
            version=version,
            task="classification",
        )
        assert result.created and result.version == version
        shas[version] = result.sha256
    assert len(set(shas.values())) == 2
    return shas


def _show_all(env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return {v: _json(run_kiln("show", f"tiny@{v}", "--json", env=env)) for v in VERSIONS}


def _without_paths(doc: dict[str, Any]) -> dict[str, Any]:
    """A ``show`` document minus the absolute paths, which name the home it was run in."""
    return {
        **doc,
        "artifacts": [{k: v for k, v in a.items() if k != "path"} for a in doc["artifacts"]],
        "datasets": [{k: v for k, v in d.items() if k != "path"} for d in doc["datasets"]],
    }


def _lose_old_bytes(home: Path) -> None:
    """Delete the old home's DVC cache and stored objects: only the remote keeps the bytes."""
    shutil.rmtree(home / ".dvc" / "cache")
    shutil.rmtree(home / "objects")


def _restore_and_check(
    backup_dir: Path, database: str, old_home: Path, before_models: dict, before_shown: dict
) -> None:
    """Restore ``backup_dir`` into old_home's sibling ``new-home``; it must hold what the old
    home held, its bytes pulled into its own objects, and take a new upload (0.1.2): on
    PostgreSQL, the restored sequences carry on after the restored ids."""
    new_home = old_home.parent / "new-home"
    env = {"KILN_HOME": str(new_home)}
    restored = _json(run_kiln("restore", str(backup_dir), "--json", env=env))
    remote = str(old_home / "dvc-remote")
    assert restored == {"restored": 2, "database": database, "remote": remote}
    assert _json(run_kiln("models", "--json", env=env)) == before_models
    after_shown = _show_all(env)
    for version in VERSIONS:
        assert _without_paths(after_shown[version]) == _without_paths(before_shown[version])
        [artifact] = after_shown[version]["artifacts"]
        path = Path(artifact["path"])
        assert path.is_relative_to(new_home / "objects")
        assert path.is_file() and _sha256(path) == artifact["sha256"]
        assert artifact["sha256"] == after_shown[version]["sha256"]
    third = export_linear(old_home.parent / "third.pt2", seed=3)
    added = _json(run_kiln("upload", "tiny", str(third), "--json", env=env))
    assert added["version"] == "0.1.2" and added["created"] is True


def _sqlite_rows(home: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(home / "registry.db") as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}


def _state(home: Path) -> dict[str, Any]:
    """Everything a refused restore must leave alone: rows, objects, DVC config."""
    return {
        "rows": _sqlite_rows(home),
        "objects": _files(home / "objects"),
        "dvc_config": (home / ".dvc" / "config").read_text(),
    }


# ------------------------------------------------------------------------------ round trips
def test_sqlite_round_trip_pulls_every_artifact_from_the_remote(
    kiln_home: Path, tiny_pt2: Path, tmp_path: Path
) -> None:
    shas = _populate(tiny_pt2, tmp_path)
    before_models = _json(run_kiln("models", "--json"))
    assert [v["sha256"] for v in before_models["models"][0]["versions"]] == list(shas.values())
    before_shown = _show_all()
    backup_dir = tmp_path / "backup"

    doc = _json(run_kiln("backup", str(backup_dir), "--json"))
    assert doc == {"dir": str(backup_dir), "database": "sqlite", "artifacts": 2}
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["remote"] == str(kiln_home / "dvc-remote")
    assert sorted(a["sha256"] for a in manifest["artifacts"]) == sorted(shas.values())

    _lose_old_bytes(kiln_home)
    _restore_and_check(backup_dir, "sqlite", kiln_home, before_models, before_shown)


def test_postgresql_round_trip_restores_the_schema_from_pg_dump(
    kiln_home: Path, pg_url: str, tiny_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    schema = pg_url.rsplit("%3D", 1)[1]
    shas = _populate(tiny_pt2, tmp_path)
    assert not (kiln_home / "registry.db").exists()  # the registry really is PostgreSQL
    before_models = _json(run_kiln("models", "--json"))
    before_shown = _show_all()
    backup_dir = tmp_path / "backup"

    doc = _json(run_kiln("backup", str(backup_dir), "--json"))
    assert doc == {"dir": str(backup_dir), "database": "postgresql", "artifacts": 2}
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["schema"] == schema and manifest["snapshot"] == "registry.pgdump"
    assert sorted(a["sha256"] for a in manifest["artifacts"]) == sorted(shas.values())
    listing = subprocess.run(
        ["pg_restore", "--list", str(backup_dir / "registry.pgdump")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"TABLE {schema} model " in listing  # pg_dump --schema: Kiln's schema only
    assert not any(f"TABLE {s} " in listing for s in ("public",))

    _pg_exec(f"DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}")
    _lose_old_bytes(kiln_home)
    # A command run first migrates the empty schema: its empty tables must not block the restore.
    env = {"KILN_HOME": str(tmp_path / "new-home")}
    assert _json(run_kiln("models", "--json", env=env)) == {"models": []}
    _restore_and_check(backup_dir, "postgresql", kiln_home, before_models, before_shown)

    # Restoring again into the now-populated schema is refused.
    _refused(
        run_kiln(
            "restore", str(backup_dir), "--json", env={"KILN_HOME": str(tmp_path / "third-home")}
        ),
        code=4,
        match="not empty",
    )


# -------------------------------------------------------------------------------- refusals
def test_restore_into_a_non_empty_registry_is_refused_and_changes_nothing(
    kiln_home: Path, tiny_pt2: Path, tmp_path: Path
) -> None:
    _populate(tiny_pt2, tmp_path)
    backup_dir = tmp_path / "backup"
    _json(run_kiln("backup", str(backup_dir), "--json"))
    before = _state(kiln_home)
    _refused(run_kiln("restore", str(backup_dir), "--json"), code=4, match="not empty")
    assert _state(kiln_home) == before


def test_backup_into_a_non_empty_folder_is_refused(kiln_home: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    _refused(run_kiln("backup", str(taken), "--json"), code=2, match="not empty")
    assert _files(taken) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    _refused(run_kiln("backup", str(a_file), "--json"), code=2, match="not empty")
    assert a_file.read_text() == "mine"


def test_restore_fails_clearly_when_the_remote_lost_an_object(
    kiln_home: Path, tiny_pt2: Path, tmp_path: Path
) -> None:
    shas = _populate(tiny_pt2, tmp_path)
    backup_dir = tmp_path / "backup"
    _json(run_kiln("backup", str(backup_dir), "--json"))
    _lose_old_bytes(kiln_home)
    remote_files = sorted(p for p in (kiln_home / "dvc-remote").rglob("*") if p.is_file())
    assert len(remote_files) == 2
    lost, kept = remote_files[0], tmp_path / "kept-object"
    shutil.move(lost, kept)

    new_home = tmp_path / "new-home"
    env = {"KILN_HOME": str(new_home)}
    line = _refused(
        run_kiln("restore", str(backup_dir), "--json", env=env),
        code=5,
        match="lost 1 of the backup's 2 artifacts",
    )
    assert any(sha in line for sha in shas.values())  # it names the missing artifact
    # Nothing was installed: the registry is still empty and no artifact was left behind.
    assert _json(run_kiln("models", "--json", env=env)) == {"models": []}
    assert not [p for p in (new_home / "objects").rglob("*") if p.is_file()]

    # Once the remote has the object again, the same restore succeeds.
    shutil.move(kept, lost)
    restored = _json(run_kiln("restore", str(backup_dir), "--json", env=env))
    assert restored["restored"] == 2
    assert [
        v["sha256"] for v in _json(run_kiln("models", "--json", env=env))["models"][0]["versions"]
    ] == list(shas.values())
