"""The rollout's HTTP client of the local gateway: where it listens, waiting until it serves a
model or a version, and the per-version figures (``/kiln/models/NAME/stats``) a canary is judged
on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from kiln.errors import ExternalToolError
from kiln.settings import Settings

log = logging.getLogger(__name__)


def gateway_url(settings: Settings) -> str:
    return f"http://{settings.gateway_host}:{settings.gateway_port}"


def wait_until_served(
    settings: Settings, *, timeout_s: float, model: str | None = None, version: str | None = None
) -> str:
    """Wait until the local gateway serves ``model@version`` from a ready engine (or, without
    a model, until it reports every deployed version ready).

    Readiness of the whole gateway is not enough after a registry write: until the supervisor
    has read the new rows, the old ones are what is ready. So a version is waited for by name
    (``/v2/models/M/versions/V/ready``: 404 until the gateway routes it, 503 until its engine
    has warmed up), with Kiln's service key.

    Returns ``"ready"``, or ``"no-gateway"`` when nothing answers on the gateway's address (the
    desired state is recorded; ``kiln serve`` will start it). Raises ExternalToolError when a
    gateway answers but does not get ready in time.
    """
    base = gateway_url(settings)
    headers = {}
    if model is not None and version is not None:
        from kiln.rollout.service import service_key

        url = f"{base}/v2/models/{model}/versions/{version}/ready"
        headers = {"Authorization": f"Bearer {service_key(settings)}"}
    else:
        url = base + "/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    detail = ""
    seen_gateway = False
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=2.0, headers=headers)
            seen_gateway = True
            if resp.status_code == 200:
                return "ready"
            detail = resp.text[:300]
        except httpx.TransportError:
            if not seen_gateway:
                return "no-gateway"
        time.sleep(0.25)
    raise ExternalToolError(
        f"the gateway at {base} did not get ready within "
        f"{timeout_s:.0f} s ({detail}); see {settings.home / 'logs'}"
    )


class GatewayClient:
    """The rollout's view of the local gateway: per-version figures, and replayed requests."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = httpx.Client(timeout=10.0, headers=self.headers)

    def close(self) -> None:
        self.client.close()

    def stats(
        self, model: str, since: float = 0.0, *, over_ms: float | None = None, attempts: int = 5
    ) -> dict[str, Any]:
        """The gateway's per-version figures since ``since`` (retried while it restarts);
        ``over_ms``: also count the requests slower than that."""
        params = {"since": f"{since:.3f}"}
        if over_ms is not None:
            params["over_ms"] = f"{over_ms:.3f}"
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(initial=0.2, max=2.0),
            retry=retry_if_exception_type(httpx.TransportError),
            reraise=True,
        )
        resp = retrying(self.client.get, f"{self.url}/kiln/models/{model}/stats", params=params)
        if resp.status_code != 200:
            raise ExternalToolError(
                f"the gateway refused the stats of {model} ({resp.status_code}: {resp.text[:200]})"
            )
        return resp.json()  # type: ignore[no-any-return]

    def infer(self, model: str, body: bytes, routing_key: str) -> int:
        resp = self.client.post(
            f"{self.url}/v2/models/{model}/infer",
            content=body,
            headers={"Content-Type": "application/json", "X-Kiln-Routing-Key": routing_key},
        )
        return resp.status_code


def wait_version_ready(
    gateway: GatewayClient, *, model: str, version: str, timeout_s: float
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.stats(model).get("ready", {}).get(version):
            return True
        time.sleep(0.5)
    return False
