"""Kiln's own credential: the key flows use to read the gateway's figures and replay traffic.

Like a Kubernetes service-account token: the registry keeps only its sha256 (an ``ApiKey`` row
like any other, scopes infer + deploy); the key itself lives in ``$KILN_HOME/secrets/
service.key``, readable by its owner only. A missing, unreadable or revoked key is replaced by
a new one (revoking it is how an operator rotates it).
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.settings import Settings

SERVICE_SCOPES = ["infer", "deploy"]


def service_key_path(settings: Settings) -> Path:
    return settings.home / "secrets" / "service.key"


def service_key(settings: Settings) -> str:
    """The live service key, created (or rotated) when needed."""
    path = service_key_path(settings)
    with session_scope(settings.db_url) as session:
        try:
            key = path.read_text().strip()
        except OSError:
            key = ""
        if key and crud.find_api_key(session=session, key=key) is not None:
            return key
        key = crud.create_api_key(session=session, scopes=SERVICE_SCOPES).key
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        os.replace(tmp, path)
        return key
