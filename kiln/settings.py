"""Kiln's configuration, from ``KILN_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.net import is_loopback

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


# Rate-limit storages the gateway accepts (`limits` async schemes, without "async+").
RATE_LIMIT_SCHEMES = frozenset({"memory", "redis", "rediss", "redis+unix"})

# Defaults of per-model and per-run settings that the CLI's options show as well: written here,
# once, so that `kiln --help` loads neither the record that owns each (numpy and all) nor a copy.
CANARY_STEP_SECONDS = 30.0  # kiln.rollout.canary.RolloutSettings.step_seconds
READY_TIMEOUT_S = 180.0  # RolloutSettings.ready_timeout_s; `kiln deploy --strategy direct --wait`
DRIFT_WINDOW_HOURS = 24.0  # logged requests a drift run judges (flows/monitor.py, `kiln drift`)
DRIFT_MIN_SAMPLES = 100  # kiln.monitor.drift.DriftSettings.min_samples


class ServeRole(StrEnum):
    """What one ``kiln serve`` does (serving/supervisor.py)."""

    all = "all"  # route, and contend for the reconciler lease (one machine: today's behaviour)
    gateway = "gateway"  # route only, by the acting reconciler's routing table
    reconciler = "reconciler"  # contend for the lease and run engines; route nothing


def apply_privacy_env() -> None:
    """Turn off the telemetry of every tool Kiln drives (user-set values win)."""
    for key, value in PRIVACY_ENV.items():
        os.environ.setdefault(key, value)


class Settings(BaseSettings):
    """Kiln settings; every default is written here once."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    home: Path = Field(default=Path(".kiln"), description="Kiln's data: registry, artifacts, DVC")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in home")
    dvc_remote: str | None = Field(
        default=None,
        description="DVC remote: a folder, or s3://BUCKET/PREFIX (credentials from the AWS_* "
        "variables or ~/.aws, never from here); default home/dvc-remote",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="an S3-compatible server for an s3:// dvc_remote (SeaweedFS...)"
    )
    max_upload_bytes: int = Field(default=4 * 1024**3, gt=0, description="largest accepted file")
    load_timeout_s: float = Field(default=300.0, gt=0, description="model load + sample run")
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024**2, gt=0, description="gateway request cap")
    gateway_max_connections: int = Field(default=1000, ge=1, description="open connections")
    engine_start_timeout_s: float = Field(default=120.0, gt=0, description="engine warm-up")
    # where the engines a reconciler starts listen, and what gateways on other hosts reach them
    # by; an address other machines reach needs engine_secret (serving/channel.py)
    engine_host: str = Field(default="127.0.0.1", description="engines' bind and address")
    engine_secret: SecretStr | None = Field(
        default=None, description="shared by every gateway and engine: proves channel clients"
    )
    reconcile_interval_s: float = Field(default=0.5, gt=0, description="supervisor period")
    health_interval_s: float = Field(default=1.0, gt=0, description="engine health checks")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="wait for in-flight work")
    # the reconciler lease (kiln/registry/lease.py): how long one term lasts without a renewal;
    # a successor takes over at most this long after its holder died
    lease_ttl_s: float = Field(default=5.0, ge=1.0, le=300.0, description="reconciler lease term")
    ray_address: str | None = Field(
        default=None,
        description="a Ray cluster (HOST:PORT) the optimize flow builds its variants on, one "
        "Ray task each (prefect-ray); unset: in the flow's own process",
    )
    inference_log_sample: float = Field(default=0.1, ge=0.0, le=1.0)
    # the gateway's inference log (serving/inference_log.py): a bounded queue, a writer thread
    inference_log_queue: int = Field(
        default=10000,
        ge=1,
        description="sampled requests waiting for the log's writer; more are dropped (and counted)",
    )
    inference_log_retention_days: float = Field(
        default=7.0, gt=0, description="logged requests older than this are purged"
    )
    # API keys and per-key rate limits (serving/auth.py)
    auth_cache_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60.0,
        description="key lookup cache TTL: a "
        "created or revoked key takes effect within it (0: no cache)",
    )
    rate_limit_storage: str = Field(
        default="memory://",
        description="`limits` storage URI; redis://host:port/db shares limits between gateways",
    )
    rate_limit_strategy: Literal["moving-window", "sliding-window-counter"] = "moving-window"
    default_rate_per_second: float | None = Field(
        default=None, gt=0, description="rate of keys created without one (None: unlimited)"
    )
    # the gateway's alert monitor (serving/alerts.py); per-model thresholds: serving.config
    alert_interval_s: float = Field(default=5.0, gt=0, description="alert evaluation period")
    alert_clear_ticks: int = Field(
        default=3,
        ge=1,
        description="clear evaluations in a row before an open alert resolves (no flapping)",
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _known_storage(cls, uri: str) -> str:
        scheme = uri.partition("://")[0].removeprefix("async+")
        if "://" not in uri or scheme not in RATE_LIMIT_SCHEMES:
            # the scheme only: a redis URI may carry a password
            raise ValueError(
                f"rate_limit_storage scheme {scheme!r} is not supported: use "
                "memory:// or redis://HOST:PORT/DB (also rediss://, redis+unix://)"
            )
        return uri

    @field_validator("dvc_remote")
    @classmethod
    def _known_remote(cls, url: str | None) -> str | None:
        if url is None or "://" not in url:
            return url
        scheme, _, rest = url.partition("://")
        if scheme != "s3" or not rest.split("/", 1)[0]:
            raise ValueError(
                f"dvc_remote scheme {scheme!r} is not supported: use a folder or "
                "s3://BUCKET/PREFIX (with KILN_S3_ENDPOINT_URL for an S3-compatible server)"
            )
        if "@" in rest.split("/", 1)[0]:
            raise ValueError(
                "dvc_remote must not carry credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY instead"
            )
        return url

    @model_validator(mode="after")
    def _engines_reachable_only_with_a_secret(self) -> Settings:
        if not is_loopback(self.engine_host) and self.engine_secret is None:
            raise ValueError(
                f"engine_host {self.engine_host} is reachable from other machines: set "
                "KILN_ENGINE_SECRET (the same secret on every gateway and reconciler host)"
            )
        return self

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
