"""`kiln keys` through the real console script (docs/reliability.md scenario 12: only hashes stored)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.settings import get_settings
from tests.conftest import kiln_env, run_kiln


def keys(home: Path, *args: str) -> tuple[int, str, str]:
    proc = run_kiln("keys", *args, env=kiln_env(home), timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_registry_dump_holds_only_hashes(kiln_home: Path) -> None:
    issued = []
    for args in (
        ["--scope", "infer"],
        ["--scope", "deploy", "--rate", "10"],
        ["--scope", "admin", "--scope", "infer", "--models", "digits, minilm"],
    ):
        rc, stdout, stderr = keys(kiln_home, "create", *args, "--json")
        assert rc == 0, stderr
        issued.append(json.loads(stdout))
    doc = issued[2]
    assert {"key", "prefix", "scopes"} <= doc.keys()
    assert doc["scopes"] == ["admin", "infer"] and doc["models"] == ["digits", "minilm"]
    assert doc["key"].startswith(doc["prefix"] + ".") and "key_hash" not in doc
    assert issued[1]["rate_per_second"] == 10.0

    connection = sqlite3.connect(kiln_home / "registry.db")
    try:
        dump = "\n".join(connection.iterdump())
    finally:
        connection.close()
    assert sum(d["key"] in dump for d in issued) == 0  # plaintext keys stored: none
    for d in issued:
        assert crud.hash_key(d["key"]) in dump and d["prefix"] in dump

    rc, stdout, stderr = keys(kiln_home, "list", "--json")
    assert rc == 0, stderr
    listed = json.loads(stdout)["keys"]
    assert sorted(k["prefix"] for k in listed) == sorted(d["prefix"] for d in issued)
    assert all(d["key"] not in stdout and crud.hash_key(d["key"]) not in stdout for d in issued)
    assert {"prefix", "scopes", "models", "rate_per_second", "revoked"} <= listed[0].keys()


def test_human_create_prints_the_key_once(kiln_home: Path) -> None:
    rc, stdout, stderr = keys(kiln_home, "create", "--scope", "infer")
    assert rc == 0, stderr
    key = next(line for line in stdout.splitlines() if line.startswith("kiln_") and "." in line)
    assert "not shown again" in stderr
    with session_scope(get_settings().db_url) as session:
        assert crud.find_api_key(session=session, key=key.strip()) is not None


def test_bad_input_is_one_line(kiln_home: Path) -> None:
    for args, code in (
        (["create", "--scope", "root"], 2),
        (["create", "--scope", "infer", "--rate", "-1"], 2),
        (["revoke", "kiln_00000000"], 3),
    ):
        rc, stdout, stderr = keys(kiln_home, *args)
        assert rc == code, (args, rc, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
        assert stdout == ""
    rc, _, stderr = keys(kiln_home, "revoke", "kiln_00000000", "--json")
    assert rc == 3 and "no key with prefix 'kiln_00000000'" in stderr


def test_revoke(kiln_home: Path) -> None:
    rc, stdout, stderr = keys(kiln_home, "create", "--scope", "infer", "--json")
    assert rc == 0, stderr
    created = json.loads(stdout)
    rc, stdout, stderr = keys(kiln_home, "revoke", created["prefix"], "--json")
    assert rc == 0, stderr
    assert json.loads(stdout) == {"prefix": created["prefix"], "revoked": True}
    with session_scope(get_settings().db_url) as session:
        assert crud.find_api_key(session=session, key=created["key"]) is None
    rc, stdout, _ = keys(kiln_home, "list", "--json")
    assert rc == 0 and json.loads(stdout)["keys"][0]["revoked"] is True
