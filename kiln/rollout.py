"""Deploy decisions written as desired state: which version is stable, which is the canary.

Flows and the CLI change Deployment rows here; ``kiln serve``'s supervisor reconciles engines to
them and the gateway routes by them (DESIGN.md, control plane). Nothing here starts a process.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from kiln import crud
from kiln.db import session_scope
from kiln.errors import ExternalToolError
from kiln.settings import Settings


def deploy_direct(settings: Settings, *, name: str, version: str | None) -> dict[str, Any]:
    """Make ``name@version`` (default: newest) the stable version now, without a canary."""
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        dep = crud.deploy_direct(session=session, version=row)
        return {"model": name, "version": row.version, "outcome": "promoted",
                "strategy": "direct", "reason": "direct deploy: stable at once",
                "deployment_state": dep.state}


def gateway_url(settings: Settings) -> str:
    return f"http://{settings.gateway_host}:{settings.gateway_port}"


def wait_until_served(settings: Settings, *, timeout_s: float) -> str:
    """Wait until the local gateway reports every deployed version ready.

    Returns ``"ready"``, or ``"no-gateway"`` when nothing answers on the gateway's address (the
    desired state is recorded; ``kiln serve`` will start it). Raises ExternalToolError when a
    gateway answers but does not get ready in time.
    """
    url = gateway_url(settings) + "/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    detail = ""
    seen_gateway = False
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=2.0)
            seen_gateway = True
            if resp.status_code == 200:
                return "ready"
            detail = resp.text[:300]
        except httpx.TransportError:
            if not seen_gateway:
                return "no-gateway"
        time.sleep(0.25)
    raise ExternalToolError(f"the gateway at {gateway_url(settings)} did not get ready within "
                            f"{timeout_s:.0f} s ({detail}); see {settings.home / 'logs'}")
