"""Replayed traffic for a canary when live traffic is too thin for a verdict: OIP request bodies
built from the validation dataset or from the stable version's logged requests, sent through the
gateway at a fixed concurrency.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import numpy as np

from kiln.rollout.client import GatewayClient
from kiln.spec import ModelSpec

log = logging.getLogger(__name__)

REPLAY_LIMIT = 512  # request bodies a canary's replay is built from, at most


def replay_bodies(
    spec: ModelSpec, inputs: list[np.ndarray] | np.ndarray, limit: int = REPLAY_LIMIT
) -> list[bytes]:
    """One OIP v2 JSON request per row of the (validation) inputs, as a client would send."""
    import orjson

    from kiln.spec import numpy_of_datatype

    served = spec.served_inputs()
    columns = inputs if isinstance(inputs, list) else [inputs]
    bodies = []
    for row in range(min(limit, len(columns[0]))):
        tensors = []
        for tensor, column in zip(served, columns, strict=False):
            value = np.asarray(column[row : row + 1])
            if tensor.datatype == "BYTES":
                data: list[Any] = [str(v) for v in value.reshape(-1)]
            else:
                data = value.astype(numpy_of_datatype(tensor.datatype)).reshape(-1).tolist()
            tensors.append(
                {
                    "name": tensor.name,
                    "shape": list(value.shape),
                    "datatype": tensor.datatype,
                    "data": data,
                }
            )
        bodies.append(orjson.dumps({"inputs": tensors}))
    return bodies


def logged_bodies(
    spec: ModelSpec, inputs: list[dict[str, Any]], limit: int = REPLAY_LIMIT
) -> list[bytes]:
    """OIP v2 JSON requests from logged inputs (``InferenceRecord.input``), as they came; a
    record whose tensors are not the spec's served inputs (logged before a spec change) or
    that holds a null (a NaN: JSON has none) is skipped."""
    import orjson

    names = [t.name for t in spec.served_inputs()]
    bodies = []
    for doc in inputs:
        if sorted(doc) != sorted(names) or any(
            v is None for n in names for v in doc[n].get("data", ())
        ):
            continue
        bodies.append(
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": n,
                            "shape": doc[n]["shape"],
                            "datatype": doc[n]["datatype"],
                            "data": doc[n]["data"],
                        }
                        for n in names
                    ]
                }
            )
        )
        if len(bodies) >= limit:
            break
    return bodies


class Replayer:
    """Replayed traffic through the gateway (Flagger's load-test hook): request bodies sent
    in a loop by a few threads, each with its own routing key so weights apply, until stopped."""

    def __init__(
        self, gateway: GatewayClient, model: str, bodies: list[bytes], concurrency: int
    ) -> None:
        self.gateway, self.model, self.bodies = gateway, model, bodies
        self.concurrency = concurrency
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads or not self.bodies:
            return
        for worker in range(self.concurrency):
            thread = threading.Thread(
                target=self._run, args=(worker,), daemon=True, name=f"kiln-replay-{worker}"
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            body = self.bodies[n % len(self.bodies)]
            try:
                status = self.gateway.infer(self.model, body, f"replay-{worker}-{n}")
            except httpx.HTTPError:
                status = 0
            with self._lock:
                self.sent += 1
                self.statuses[status] = self.statuses.get(status, 0) + 1
            n += self.concurrency
            if status in (0, 429, 503):
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads = []
        self._stop = threading.Event()
