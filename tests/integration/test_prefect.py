"""The upload task inside a real Prefect flow run (Prefect's ephemeral API in a temp home)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from tasks.upload import upload_model


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_upload_task_in_a_flow(prefect_api, kiln_home: Path, tiny_pt2: Path) -> None:
    @flow
    def register(source: str) -> dict:
        return upload_model("tiny", source, task_type="classification")

    state = register(str(tiny_pt2), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["version"] == "0.1.0" and result["created"] is True
    assert result["sha256"] == hashlib.sha256(tiny_pt2.read_bytes()).hexdigest()


def test_refused_upload_fails_the_flow_run(prefect_api, kiln_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(b"\x80\x04K\x01.")  # a pickle of the integer 1

    @flow
    def register(source: str) -> dict:
        return upload_model("tiny", source)

    state = register(str(source), return_state=True)
    assert state.is_failed()
    assert "pickled" in state.message or "pickled" in str(state.result(raise_on_failure=False))
    assert not (kiln_home / "objects").exists() or not any((kiln_home / "objects").iterdir())
