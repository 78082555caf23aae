"""Serving settings: one record per model (``Model.settings["serving"]``), one for the gateway.

Every default is written here once; the engine, the supervisor and the gateway read the same
record, so a model's batching, replicas, deadline and fallback are set in one place.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from pydantic import BaseModel, Field, model_validator

CPU_CORES_PER_REPLICA = 4


@functools.cache
def gpu_count() -> int:
    """GPUs visible through NVML (0 without pynvml, a driver or a GPU); read once."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


class ServingSettings(BaseModel):
    """How one model is served (engine batching, replicas, gateway limits)."""

    # engine (LitServe): dynamic batching; batch_timeout 0 means a batch never waits for more
    # requests when the queue is empty (it takes what is queued, up to max_batch_size).
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    batch_timeout: float = Field(default=0.0, ge=0.0, le=1.0)
    workers_per_device: int = Field(default=1, ge=1, le=16)
    # supervisor: replicas per served version, scaled by outstanding requests per replica.
    # max_replicas None: what the host can use (see replica_limit)
    min_replicas: int = Field(default=1, ge=1, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)
    target_outstanding: float = Field(default=8.0, gt=0)  # per replica, before scaling up
    # gateway
    max_request_batch: int = Field(default=1024, ge=1)  # rows one request may carry
    deadline_ms: float = Field(default=10_000, gt=0)  # default per-request deadline
    max_queue: int = Field(default=256, ge=1)  # admitted and outstanding per model; then 503
    fallback_model: str | None = None  # served (marked in a header) when every engine is down
    result_cache: int = Field(default=0, ge=0)  # entries in the per-model result cache; 0 off
    # engine model cache: memory budget for the versions one engine process holds (LRU)
    cache_budget_mb: int = Field(default=2048, ge=16)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> ServingSettings:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def replica_limit(self) -> int:
        """The most replicas the autoscaler may run: ``max_replicas``, or by default two per
        GPU, or on a CPU-only host one per CPU_CORES_PER_REPLICA cores. Engines on the CPU
        use every core they are given, so a second replica on a small host competes for the
        same cores: it adds queueing, not throughput (bench: 2 replicas on 2 cores had 3.5x
        the p99 of one)."""
        if self.max_replicas is not None:
            return self.max_replicas
        gpus = gpu_count()
        auto = 2 * gpus if gpus else (os.cpu_count() or 1) // CPU_CORES_PER_REPLICA
        return max(self.min_replicas, auto, 1)

    @classmethod
    def for_model(cls, model_settings: dict[str, Any]) -> ServingSettings:
        return cls.model_validate(model_settings.get("serving", {}))


class AlertSettings(BaseModel):
    """When the gateway's alert monitor opens an alert on one model (``Model.settings["alerts"]``).

    Latency and errors are judged over the last ``window_s`` of requests, and only once that
    window holds ``min_requests`` (one slow request is not an alert). An engine is down when a
    served version has had no ready replica for ``down_after_s`` (a restart that comes back
    sooner is not an alert). GPU utilization is judged only where NVML reports a GPU.
    """

    p99_ms: float | None = Field(default=None, gt=0)  # None: half the model's deadline
    error_rate: float = Field(default=0.05, ge=0.0, le=1.0)  # 5xx share of requests
    gpu_util_min: float | None = Field(default=0.1, ge=0.0, le=1.0)  # None: no GPU alert
    window_s: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=20, ge=1)
    down_after_s: float = Field(default=10.0, ge=0)

    def p99_threshold(self, serving: ServingSettings) -> float:
        """The p99 limit: set, or half the model's default deadline (a p99 that uses half of
        every request's time budget leaves little for queueing before 504s start)."""
        return self.p99_ms if self.p99_ms is not None else serving.deadline_ms / 2

    @classmethod
    def for_model(cls, model_settings: dict[str, Any]) -> AlertSettings:
        return cls.model_validate(model_settings.get("alerts", {}))
