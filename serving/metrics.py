"""The gateway's Prometheus metrics, in a registry of their own (one per gateway).

Latency is recorded per model, version and stage: ``gateway`` (the whole request as the gateway
served it), ``engine`` (the model call, as the engine timed it) and ``queue`` (the rest of the
engine round trip: transport, the engine's queue and batching wait). Engines' memory and the
GPU (through NVML, when a GPU and ``pynvml`` are present) are read at scrape time. Open alerts
(``kiln_alerts_open``) are set by the alert monitor (:mod:`serving.alerts`) each evaluation.
deploy/prometheus and deploy/grafana name these metrics (a unit test keeps them in step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _GpuCollector(Collector):
    """GPU utilization and memory through NVML; yields nothing where there is no GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no pynvml, no driver, no GPU: nothing to report
            self._nvml = None

    def utilization(self) -> list[float] | None:
        """Each GPU's busy share now, or None where NVML reports no GPU (the alert monitor)."""
        if self._nvml is None:
            return None
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        if not count:
            return None
        return [
            nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i)).gpu / 100
            for i in range(count)
        ]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        util = GaugeMetricFamily(
            "kiln_gpu_utilization_ratio", "GPU busy share (NVML)", labels=["gpu"]
        )
        mem = GaugeMetricFamily(
            "kiln_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"]
        )
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            util.add_metric([str(index)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            mem.add_metric([str(index)], nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return [util, mem]


class _EngineCollector(Collector):
    """Engine replicas' state and resident memory, read from the supervisor at scrape time."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "kiln_engine_up",
            "1 when the engine replica is ready",
            labels=["model", "version", "replica"],
        )
        rss = GaugeMetricFamily(
            "kiln_engine_resident_memory_bytes",
            "resident memory of the engine replica's process group",
            labels=["model", "version", "replica"],
        )
        outstanding = GaugeMetricFamily(
            "kiln_engine_outstanding_requests",
            "requests sent to the replica and not yet answered",
            labels=["model", "version", "replica"],
        )
        for row in self._source():
            labels = [row["model"], row["version"], str(row["replica"])]
            up.add_metric(labels, 1.0 if row["ready"] else 0.0)
            rss.add_metric(labels, float(row["rss_bytes"]))
            outstanding.add_metric(labels, float(row["outstanding"]))
        return [up, rss, outstanding]


class GatewayMetrics:
    """Every metric the gateway exports (docs/interfaces.md: ``/metrics``, Prometheus text)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "request latency by model, version and stage",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "kiln_requests_total",
            "inference requests by final status",
            ["model", "version", "code"],
            registry=r,
        )
        self.inflight = Gauge(
            "kiln_inflight_requests", "admitted requests not yet answered", ["model"], registry=r
        )
        self.batch = Histogram(
            "kiln_batch_size",
            "rows in the model call that served a request",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "kiln_result_cache_hits_total", "responses from the cache", ["model"], registry=r
        )
        self.retries = Counter(
            "kiln_retries_total",
            "engine calls retried on another replica",
            ["model", "version"],
            registry=r,
        )
        self.fallbacks = Counter(
            "kiln_fallbacks_total", "requests served by a fallback", ["model", "reason"], registry=r
        )
        self.rejected = Counter(
            "kiln_rejected_total",
            "requests refused before an engine ran them",
            ["model", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "kiln_auth_failures_total", "401 and 403 answers", ["code"], registry=r
        )
        self.rate_limited = Counter("kiln_rate_limited_total", "429 answers", registry=r)
        self.rate_limit_local = Gauge(
            "kiln_rate_limit_local_fallback",
            "1 while this gateway counts per-key limits alone because their shared storage "
            "(Redis) does not answer; 0 otherwise",
            registry=r,
        )
        self.engine_restarts = Counter(
            "kiln_engine_restarts_total",
            "engine replicas restarted after dying or failing health",
            ["model", "version"],
            registry=r,
        )
        self.alerts_open = Gauge(
            "kiln_alerts_open",
            "open alerts (registry) by model and kind",
            ["model", "kind"],
            registry=r,
        )
        # the inference log (serving/inference_log.py); its writer thread counts what it wrote
        self.log_records = Counter(
            "kiln_inference_log_records_total",
            "sampled requests written to the inference log",
            ["model"],
            registry=r,
        )
        self.log_dropped = Counter(
            "kiln_inference_log_dropped_total",
            "sampled requests not logged (queue_full, write_error, shutdown)",
            ["reason"],
            registry=r,
        )
        self.log_queue = Gauge(
            "kiln_inference_log_queue_depth",
            "sampled requests waiting for the inference log's writer",
            registry=r,
        )
        ProcessCollector(registry=r)  # the gateway's own CPU and resident memory
        self.gpu = _GpuCollector()
        r.register(self.gpu)

    def watch_engines(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(_EngineCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
