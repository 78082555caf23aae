"""`kiln drift digits --json` end to end: the monitor-drift flow (Prefect's ephemeral API, as
the CLI runs flows) over InferenceRecords written as the gateway's inference log writes them,
against digits' registered dataset (the validation split); the logged rows come from the test
split, so traffic and reference never share rows.

One timeline, three windows (``--hours``): 60 rows five hours ago (not enough data), 150
inverted rows three hours ago (drift: the alert opens), 150 unshifted rows now, beside two
malformed ones (no drift: the alert resolves; Great Expectations reports the malformed rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import copy_home, digits_rows, kiln_env, run_kiln


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """One Prefect API for this module's `kiln drift` runs: without it each run starts its
    own temporary server (about 10 s each)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


def _log(home: Path, batches: list[np.ndarray], ago: timedelta) -> None:
    """InferenceRecords for ``batches`` sent to digits' version, as the gateway logs them."""
    from kiln.registry import crud
    from kiln.registry.db import dispose_engines, session_scope
    from kiln.registry.records import encode
    from kiln.registry.tables import InferenceRecord, utcnow

    url = f"sqlite:///{home / 'registry.db'}"
    when = utcnow() - ago
    with session_scope(url) as session:
        version = crud.require_version(session=session, name="digits").version
        crud.add_inference_records(
            session=session,
            records=[
                InferenceRecord(
                    model_name="digits",
                    version=version,
                    input=encode({"x": batch}),
                    output={},
                    latency_ms=1.0,
                    status=200,
                    batch_id=f"b{i}",
                    timestamp=when,
                )
                for i, batch in enumerate(batches)
            ],
        )
    dispose_engines()


def _drift(home: Path, api: str, *args: str, code: int = 0) -> dict:
    proc = run_kiln(
        "drift", "digits", *args, "--json", timeout=300, env=kiln_env(home, PREFECT_API_URL=api)
    )
    assert proc.returncode == code, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # exactly one JSON document on stdout


def _db(home: Path) -> tuple[list, list]:
    from sqlmodel import select

    from kiln.registry import crud
    from kiln.registry.db import dispose_engines, session_scope
    from kiln.registry.tables import DriftReport

    with session_scope(f"sqlite:///{home / 'registry.db'}") as session:
        reports = [
            r.model_dump() for r in session.exec(select(DriftReport).order_by(DriftReport.id)).all()
        ]
        alerts = [
            {"kind": a.kind, "state": str(a.state), "value": a.value}
            for a in crud.list_alerts(session=session, model="digits")
        ]
    dispose_engines()
    return reports, alerts


def _assert_dvc_tracked(home: Path, report: str) -> None:
    from dvc.config import Config as DvcConfig

    path = Path(report)
    assert path.is_file() and path.is_relative_to(home / "objects")
    assert "<html" in path.read_text(errors="replace")[:2000].lower()
    pointer = yaml.safe_load(Path(f"{path}.dvc").read_text())
    md5 = pointer["outs"][0]["md5"]
    assert (home / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    # pushed to the home's DVC remote (a copied home keeps its original's remote URL)
    remote = Path(DvcConfig(str(home / ".dvc"))["remote"]["kiln"]["url"])
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_drift_flow_end_to_end(
    validated_home: Path, examples: Path, tmp_path: Path, prefect_api: str
) -> None:
    home = copy_home(validated_home, tmp_path)
    x, _ = digits_rows(examples, 270)  # the whole test split
    rng = np.random.default_rng(11)

    def draw(n: int) -> np.ndarray:
        return x[rng.choice(len(x), n, replace=False)]

    # 1. 60 rows: not enough data (null), nothing stored as a report, no alert
    _log(home, np.split(draw(60), 15), timedelta(hours=5))
    few = _drift(home, prefect_api, "--hours", "6", "--exit-code")  # not drift: exit 0
    assert few["model"] == "digits" and few["drift_detected"] is None
    assert few["drift_share"] is None and few["samples"] == 60 and few["report"] is None
    assert few["alert"] == "unchanged"

    # 2. 150 inverted rows: drift, the report is stored and DVC-tracked, the alert opens
    _log(home, np.split((1.0 - draw(150)).astype(np.float32), 30), timedelta(hours=3))
    shifted = _drift(home, prefect_api, "--hours", "4", "--exit-code", code=10)
    assert shifted["drift_detected"] is True, shifted["reason"]
    assert shifted["samples"] == 150 and shifted["drift_share"] >= shifted["threshold"]
    assert shifted["alert"] == "opened" and shifted["checks"]["success"]
    _assert_dvc_tracked(home, shifted["report"])

    # 3. 150 unshifted rows, plus a NaN row and a wrong-shape row that clients sent: GX reports
    #    them, they are left out, and the verdict is no drift, which resolves the alert
    nan = draw(1)
    nan[0, 0, 4, 4] = np.nan
    _log(home, [*np.split(draw(150), 30), nan, np.zeros((1, 1, 4, 4), np.float32)], timedelta(0))
    calm = _drift(home, prefect_api, "--hours", "1", "--exit-code")
    assert calm["drift_detected"] is False, calm["reason"]
    assert calm["samples"] == 150 and calm["drift_share"] < calm["threshold"]
    assert calm["checks"]["rows"] == 152 and calm["checks"]["valid_rows"] == 150
    failures = "\n".join(calm["checks"]["failures"])
    assert "nonfinite" in failures and "shape" in failures
    assert calm["alert"] == "resolved"
    _assert_dvc_tracked(home, calm["report"])
    print("drift shares: inverted", shifted["drift_share"], "unshifted", calm["drift_share"])

    reports, alerts = _db(home)
    assert [r["drift_detected"] for r in reports] == [None, True, False]
    assert [r["samples"] for r in reports] == [60, 150, 150]
    assert reports[1]["drift_share"] == shifted["drift_share"]
    assert reports[1]["report_path"] == shifted["report_path"]
    assert all(r["flow_run_id"] for r in reports)
    assert all(r["method"] == "evidently-data-drift-image-features" for r in reports)
    (alert,) = [a for a in alerts if a["kind"] == "drift"]
    assert alert["state"] == "resolved" and alert["value"] == shifted["drift_share"]


def test_drift_refuses_bad_input_in_one_line(validated_home: Path, tmp_path: Path) -> None:
    env = kiln_env(copy_home(validated_home, tmp_path))
    for args, code in (
        (("nosuch",), 3),
        (("digits", "--min-samples", "0"), 2),
        (("digits", "--hours", "-1"), 2),
        (("digits", "--version", "9.9.9"), 3),
    ):
        proc = run_kiln("drift", *args, "--json", env=env)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
