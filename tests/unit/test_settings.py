"""Settings, specs and the package layout."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from kiln.net import redact_url
from kiln.settings import PRIVACY_ENV, Settings, get_settings
from kiln.spec import ModelSpec, TensorSpec
from tests.conftest import kiln_env, run_kiln

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_HOME", raising=False)
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    settings = Settings()
    assert settings.home == tmp_path / ".kiln"
    assert settings.db_url == f"sqlite:///{tmp_path / '.kiln' / 'registry.db'}"
    assert settings.remote_url == str(tmp_path / ".kiln" / "dvc-remote")
    assert settings.gateway_host == "127.0.0.1"
    monkeypatch.setenv("KILN_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1/db")
    monkeypatch.setenv("KILN_MAX_UPLOAD_BYTES", "1234")
    settings = Settings()
    assert settings.db_url.startswith("postgresql") and settings.max_upload_bytes == 1234


def test_invalid_values_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_INFERENCE_LOG_SAMPLE", "1.5")
    with pytest.raises(ValueError, match="inference_log_sample"):
        Settings()


def test_engines_other_machines_reach_need_the_channel_secret() -> None:
    for host in ("127.0.0.4", "::1", "localhost"):
        assert Settings(engine_host=host).engine_secret is None
    with pytest.raises(ValueError, match="engine_host 10.0.0.5 is reachable.*KILN_ENGINE_SECRET"):
        Settings(engine_host="10.0.0.5")
    settings = Settings(engine_host="10.0.0.5", engine_secret="s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


def test_urls_lose_their_password_in_messages() -> None:
    assert (
        redact_url("postgresql+psycopg://kiln:pa:ss@db.internal:5432/kiln")
        == "postgresql+psycopg://kiln:***@db.internal:5432/kiln"
    )
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    for plain in ("sqlite:////tmp/k/registry.db", "redis://127.0.0.1:6379/0"):
        assert redact_url(plain) == plain


def test_get_settings_is_cached_and_turns_telemetry_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in PRIVACY_ENV:
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    for key in (
        "DO_NOT_TRACK",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "DVC_NO_ANALYTICS",
        "GX_ANALYTICS_ENABLED",
        "HF_HUB_OFFLINE",
    ):
        assert os.environ[key] == PRIVACY_ENV[key]
    get_settings.cache_clear()


def test_tensor_spec() -> None:
    spec = TensorSpec(name="x", datatype="float32", shape=[4, 1, 8, 8])
    assert spec.datatype == "FP32" and spec.shape == [-1, 1, 8, 8]  # batch is always dynamic
    assert spec.matches((7, 1, 8, 8)) and not spec.matches((7, 8, 8))
    assert spec.sample_shape(batch=3) == (3, 1, 8, 8)
    with pytest.raises(ValueError):
        TensorSpec(name="x", datatype="FP32", shape=[-1, 0])
    text = ModelSpec(inputs=[spec], outputs=[spec], preprocess={"kind": "tokenizer"})
    assert text.served_inputs()[0].datatype == "BYTES"


@pytest.mark.parametrize("package", ["kiln", "tasks", "flows", "serving"])
def test_packages_resolve_to_this_repo(package: str) -> None:
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == REPO / package


def test_defaults_shared_with_the_cli_are_the_records_own() -> None:
    """kiln.settings writes the defaults the CLI's options show once; the records that own
    them (and the HTTP limits the gateway applies) read the same values."""
    from kiln.monitor.drift import DriftSettings
    from kiln.rollout.canary import RolloutSettings
    from kiln.settings import (
        CANARY_STEP_SECONDS,
        DRIFT_MIN_SAMPLES,
        READY_TIMEOUT_S,
    )
    from serving.http import HttpLimits

    rollout = RolloutSettings()
    assert (rollout.step_seconds, rollout.ready_timeout_s) == (CANARY_STEP_SECONDS, READY_TIMEOUT_S)
    assert DriftSettings().min_samples == DRIFT_MIN_SAMPLES == 100
    assert HttpLimits().max_body_bytes == Settings.model_fields["max_body_bytes"].default


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KILN_DVC_REMOTE", "ftp://kiln:hunter2@files.internal/kiln"),
        ("KILN_DVC_REMOTE", "s3://kiln:hunter2@bucket/kiln"),
        ("KILN_RATE_LIMIT_STORAGE", "memcached://:hunter2@cache.internal:11211"),
    ],
)
def test_a_bad_setting_is_named_without_its_value(tmp_path: Path, name: str, value: str) -> None:
    """pydantic's own message repeats the input; the CLI's names the variable only."""
    proc = run_kiln("status", env=kiln_env(tmp_path / "home", **{name: value}))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {name}: ") and "hunter2" not in proc.stderr + proc.stdout
