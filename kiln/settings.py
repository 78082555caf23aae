"""Kiln's configuration, from ``KILN_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Everything Kiln drives stays off the network: no telemetry, no hub downloads.
PRIVACY_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "EVIDENTLY_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LITSERVE_DISABLE_TELEMETRY": "1",
    "LIGHTNING_DISABLE_TELEMETRY": "1",
}


def apply_privacy_env() -> None:
    """Turn off the telemetry of every tool Kiln drives (user-set values win)."""
    for key, value in PRIVACY_ENV.items():
        os.environ.setdefault(key, value)


class Settings(BaseSettings):
    """Kiln settings; every default is written here once."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    home: Path = Field(default=Path(".kiln"), description="Kiln's data: registry, artifacts, DVC")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in home")
    dvc_remote: str | None = Field(default=None, description="DVC remote URL; home/dvc-remote")
    max_upload_bytes: int = Field(default=4 * 1024**3, gt=0, description="largest accepted file")
    load_timeout_s: float = Field(default=300.0, gt=0, description="model load + sample run")
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    inference_log_sample: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().absolute()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def remote_url(self) -> str:
        return self.dvc_remote or str(self.home / "dvc-remote")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (cached; tests call ``get_settings.cache_clear()``)."""
    apply_privacy_env()
    return Settings()
