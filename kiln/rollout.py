"""Deploy decisions written as desired state: which version is stable, which is the canary.

Flows and the CLI change Deployment rows here; ``kiln serve``'s supervisor reconciles engines to
them and the gateway routes by them (DESIGN.md, control plane). Nothing here starts a process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from kiln import crud
from kiln.db import session_scope
from kiln.errors import ExternalToolError
from kiln.guardrails import Policy, Verdict, Window, judge, p99_limit
from kiln.registry import ModelVersion
from kiln.settings import Settings
from kiln.spec import ModelSpec

log = logging.getLogger(__name__)


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


def wait_until_served(settings: Settings, *, timeout_s: float, model: str | None = None,
                      version: str | None = None) -> str:
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
        from kiln.service import service_key

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
    raise ExternalToolError(f"the gateway at {base} did not get ready within "
                            f"{timeout_s:.0f} s ({detail}); see {settings.home / 'logs'}")


# --- canary rollouts (issue 5): settings, the gateway's figures, replayed traffic, one step.
class RolloutSettings(BaseModel):
    """How a model's new versions roll out (``Model.settings["rollout"]``); the guardrail
    thresholds are :class:`kiln.guardrails.Policy`'s fields, set in the same record."""

    model_config = ConfigDict(extra="allow")  # the Policy's fields live here too

    steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])
    step_seconds: float = Field(default=30.0, gt=0)
    shadow_share: float = Field(default=0.2, ge=0.0, le=1.0)  # stable traffic mirrored
    replay: bool = True  # make traffic when live traffic is too thin for a verdict
    # what is replayed: "log", the stable version's recent logged requests (the inference log),
    # or the validation dataset when fewer than ``replay_min_logged`` are logged; "dataset": it
    replay_source: Literal["log", "dataset"] = "log"
    replay_min_logged: int = Field(default=200, ge=1)
    replay_concurrency: int = Field(default=4, ge=1, le=64)
    max_extra_s: float = Field(default=60.0, ge=0)  # past a step's end, waiting for a verdict
    ready_timeout_s: float = Field(default=180.0, gt=0)  # the canary's engine warming up
    # after its engine is ready, the canary gets mirrored (shadow) requests only, for this
    # long, before any step is judged: a new engine's first real requests (connections,
    # allocator arenas, caches) are slower than a warm one's, and a short step would hold
    # that against it (Flagger's and Argo's initial delay)
    warmup_s: float = Field(default=10.0, ge=0)
    champion_max_drop: float = Field(default=0.005, ge=0)  # the candidate's metric vs stable's

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_one(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < w <= 1 for w in steps) or steps != sorted(steps):
            raise ValueError("canary steps are rising weights in (0, 1], e.g. [0.1, 0.5, 1.0]")
        if steps[-1] != 1.0:
            steps = [*steps, 1.0]
        return steps

    @classmethod
    def for_model(cls, model_settings: dict[str, Any], **overrides: Any) -> RolloutSettings:
        doc = {**model_settings.get("rollout", {}),
               **{k: v for k, v in overrides.items() if v is not None}}
        return cls.model_validate(doc)

    def policy(self) -> Policy:
        return Policy.from_settings(self.model_dump())


class Gateway:
    """The rollout's view of the local gateway: per-version figures, and replayed requests."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = httpx.Client(timeout=10.0, headers=self.headers)

    def close(self) -> None:
        self.client.close()

    def stats(self, model: str, since: float = 0.0, *, over_ms: float | None = None,
              attempts: int = 5) -> dict[str, Any]:
        """The gateway's per-version figures since ``since`` (retried while it restarts);
        ``over_ms``: also count the requests slower than that."""
        params = {"since": f"{since:.3f}"}
        if over_ms is not None:
            params["over_ms"] = f"{over_ms:.3f}"
        retrying = Retrying(stop=stop_after_attempt(attempts),
                            wait=wait_exponential_jitter(initial=0.2, max=2.0),
                            retry=retry_if_exception_type(httpx.TransportError), reraise=True)
        resp = retrying(self.client.get, f"{self.url}/kiln/models/{model}/stats",
                        params=params)
        if resp.status_code != 200:
            raise ExternalToolError(f"the gateway refused the stats of {model} "
                                    f"({resp.status_code}: {resp.text[:200]})")
        return resp.json()  # type: ignore[no-any-return]

    def infer(self, model: str, body: bytes, routing_key: str) -> int:
        resp = self.client.post(f"{self.url}/v2/models/{model}/infer", content=body,
                                headers={"Content-Type": "application/json",
                                         "X-Kiln-Routing-Key": routing_key})
        return resp.status_code


def replay_bodies(spec: ModelSpec, inputs: list[np.ndarray] | np.ndarray, limit: int = 512
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
            value = np.asarray(column[row:row + 1])
            if tensor.datatype == "BYTES":
                data: list[Any] = [str(v) for v in value.reshape(-1)]
            else:
                data = value.astype(numpy_of_datatype(tensor.datatype)).reshape(-1).tolist()
            tensors.append({"name": tensor.name, "shape": list(value.shape),
                            "datatype": tensor.datatype, "data": data})
        bodies.append(orjson.dumps({"inputs": tensors}))
    return bodies


def logged_bodies(spec: ModelSpec, inputs: list[dict[str, Any]], limit: int = 512
                  ) -> list[bytes]:
    """OIP v2 JSON requests from logged inputs (``InferenceRecord.input``), as they came; a
    record whose tensors are not the spec's served inputs (logged before a spec change) or
    that holds a null (a NaN: JSON has none) is skipped."""
    import orjson

    names = [t.name for t in spec.served_inputs()]
    bodies = []
    for doc in inputs:
        if sorted(doc) != sorted(names) or any(
                v is None for n in names for v in doc[n].get("data", ())):
            continue
        bodies.append(orjson.dumps({"inputs": [{"name": n, "shape": doc[n]["shape"],
                                                "datatype": doc[n]["datatype"],
                                                "data": doc[n]["data"]} for n in names]}))
        if len(bodies) >= limit:
            break
    return bodies


class Replayer:
    """Replayed traffic through the gateway (Flagger's load-test hook): request bodies sent
    in a loop by a few threads, each with its own routing key so weights apply, until stopped."""

    def __init__(self, gateway: Gateway, model: str, bodies: list[bytes], concurrency: int
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
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True,
                                      name=f"kiln-replay-{worker}")
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


@dataclass
class StepResult:
    weight: float
    verdict: Verdict
    seconds: float
    replayed: int

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "decision": self.verdict.decision,
                "reasons": self.verdict.reasons, "figures": self.verdict.figures,
                "seconds": round(self.seconds, 2), "replayed": self.replayed}


def observe_step(gateway: Gateway, *, model: str, stable: str, canary: str, weight: float,
                 canary_since: float, rollout: RolloutSettings, replayer: Replayer | None,
                 poll_s: float = 0.5) -> StepResult:
    """Watch one canary step: the canary's figures since the step began against the stable's
    over the same step (or since the canary began, when the step left the stable too few
    requests), judged every ``poll_s``. Fails as soon as a rule breaks with
    enough requests; passes at the step's end if the verdict is ``pass``; when the verdict is
    still ``wait`` (too little traffic), replays traffic and waits up to ``max_extra_s`` more,
    after which the missing verdict counts as a failure (nothing is promoted unjudged)."""
    policy = rollout.policy()
    started = time.time()
    end = started + rollout.step_seconds
    verdict = judge(Window(), Window(), policy)
    replayed_before = replayer.sent if replayer else 0
    while True:
        time.sleep(poll_s)
        now = time.time()
        final = now >= end
        # the stable over this same step when it had enough requests in it (the same load,
        # the same neighbours), else since the canary began (a 100 % step leaves it none)
        base = _window(gateway.stats(model, since=started), stable)
        if base.requests < policy.min_requests:
            base = _window(gateway.stats(model, since=canary_since), stable)
        limit = p99_limit(base.p99_ms, policy, final=final) if base.p99_ms is not None \
            else None
        observed = _window(gateway.stats(model, since=started, over_ms=limit), canary)
        verdict = judge(base, observed, policy, final=final)
        if verdict.decision == "fail":
            break
        if final and verdict.decision == "pass":
            break
        if now >= end + rollout.max_extra_s:
            verdict = Verdict("fail", [f"no verdict: {verdict.reasons[0]} after "
                                       f"{now - started:.0f} s (replayed traffic included)"],
                              verdict.figures)
            break
        if replayer is not None and not replayer.running and rollout.replay:
            got = observed.requests
            elapsed = now - started
            # too thin: the canary's pace would not reach the minimum by the step's end
            if elapsed >= min(2.0, rollout.step_seconds / 4) and (
                    got + got / max(elapsed, 1e-3) * max(end - now, 0) < policy.min_requests):
                log.info("live traffic too thin for a verdict on %s@%s: replaying", model,
                         canary)
                replayer.start()
    replayed = (replayer.sent - replayed_before) if replayer else 0
    return StepResult(weight, verdict, time.time() - started, replayed)


def _window(doc: dict[str, Any], version: str) -> Window:
    stats = doc.get("versions", {}).get(version, {})
    return Window.from_stats(stats, {"compared": stats.get("shadow_compared", 0),
                                     "disagreed": stats.get("shadow_disagreed", 0)})


def wait_version_ready(gateway: Gateway, *, model: str, version: str, timeout_s: float
                       ) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.stats(model).get("ready", {}).get(version):
            return True
        time.sleep(0.5)
    return False


# --- operator commands: `kiln promote`, `kiln rollback`, `kiln status`
def promote_now(settings: Settings, *, name: str) -> dict[str, Any]:
    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        dep = crud.get_deployment(session=session, model=model)
        previous = session.get(ModelVersion, dep.stable_version_id) \
            if dep is not None and dep.stable_version_id else None
        dep = crud.promote(session=session, model=model, reason="promoted by `kiln promote`")
        stable = session.get(ModelVersion, dep.stable_version_id)
        assert stable is not None
        return {"model": name, "version": stable.version, "outcome": "promoted",
                "previous": previous.version if previous else None,
                "reason": "promoted by hand"}


def rollback_now(settings: Settings, *, name: str, to_version: str | None) -> dict[str, Any]:
    """Drop the canary, or make an earlier production version stable again. Its selected
    artifact is checked first, and pulled from the DVC remote when missing or corrupt here,
    so the engine never gets a rollback it cannot load."""
    from kiln.errors import IntegrityError
    from kiln.store import ArtifactStore

    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        target = crud.require_version(session=session, name=name, version=to_version) \
            if to_version else None
        dep = crud.get_deployment(session=session, model=model)
        if target is None and dep is not None and dep.canary_version_id is None:
            retired = [v for v in crud.list_versions(session=session, model=model)
                       if v.status == "retired"]
            target = retired[-1] if retired else None
        selected = [(a.path, a.sha256) for a in crud.list_artifacts(session=session,
                                                                    version=target)
                    if a.selected] if target is not None else []
    restored = False
    if selected:
        store = ArtifactStore(settings.home, settings.remote_url)
        try:
            store.verified_path(*selected[0])
        except IntegrityError:
            store.restore(selected)
            restored = True
    with session_scope(settings.db_url) as session:
        model = crud.require_model(session=session, name=name)
        row = crud.require_version(session=session, name=name, version=target.version) \
            if target is not None else None
        had_canary = (dep := crud.get_deployment(session=session, model=model)) is not None \
            and dep.canary_version_id is not None and to_version is None
        canary = session.get(ModelVersion, dep.canary_version_id) if had_canary and dep \
            else None
        crud.rollback(session=session, model=model, to_version=None if had_canary else row,
                      reason="rolled back by `kiln rollback`",
                      detail={"restored_from_remote": restored})
    if had_canary and canary is not None:
        reason = f"canary {canary.version} dropped (weight 0, rolled_back)"
        version = canary.version
    else:
        assert target is not None
        version = target.version
        reason = f"{target.version} is the stable version again" + (
            " (its artifact restored from the DVC remote)" if restored else "")
    return {"model": name, "version": version, "outcome": "rolled_back", "reason": reason,
            "restored": restored}


def status_view(settings: Settings) -> dict[str, Any]:
    """``kiln status --json``: deployments from the registry, live figures from the gateway
    (the last minute), or nulls when no gateway answers; the last drift report and the open
    alerts from the registry."""
    with session_scope(settings.db_url) as session:
        rows = [(m.name, dep, s.version if s else None, c.version if c else None)
                for m, dep, s, c in crud.served_versions(session=session)]
        watch = {name: _watch(session, name) for name, *_ in rows}
        key = None
        if rows:
            from kiln.service import service_key

            key = service_key(settings)
    url = gateway_url(settings)
    gateway = Gateway(url, key) if key else None
    reachable = False
    models = []
    try:
        for name, dep, stable, canary in rows:
            figures: dict[str, Any] = {}
            if gateway is not None:
                try:
                    doc = gateway.stats(name, time.time() - 60, attempts=1)
                    reachable = True
                    figures = _merge(doc.get("versions", {}))
                except (httpx.HTTPError, ExternalToolError):
                    figures = {}
            models.append({"name": name, "stable": stable, "canary": canary,
                           "canary_weight": dep.canary_weight if canary else 0.0,
                           "shadow_share": dep.shadow_share, "state": dep.state,
                           "p50_ms": figures.get("p50_ms"), "p99_ms": figures.get("p99_ms"),
                           "error_rate": figures.get("error_rate"), "rps": figures.get("rps"),
                           **watch[name]})
    finally:
        if gateway is not None:
            gateway.close()
    return {"models": models, "gateway": reachable, "gateway_url": url}


def _watch(session: Any, name: str) -> dict[str, Any]:
    """A model's monitoring state in the registry: its last drift report, its open alerts."""
    report = crud.latest_drift_report(session=session, model=name)
    alerts = [{"kind": a.kind, "version": a.version, "message": a.message, "value": a.value,
               "threshold": a.threshold, "opened_at": a.opened_at.isoformat()}
              for a in crud.open_alerts(session=session, model=name)]
    return {"drift_share": report.drift_share if report else None,
            "drift_detected": report.drift_detected if report else None,
            "drift_at": report.created_at.isoformat() if report else None,
            "alerts": alerts}


def _merge(versions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's figures over its versions: requests-weighted (p99: the worst version's)."""
    live = [v for v in versions.values() if v.get("requests")]
    if not live:
        return {}
    total = sum(v["requests"] for v in live)
    errors = sum(v["errors"] for v in live)
    p50s = [(v["p50_ms"], v["requests"]) for v in live if v.get("p50_ms") is not None]
    return {"error_rate": errors / total, "rps": sum(v.get("rps") or 0 for v in live),
            "p50_ms": sum(p * n for p, n in p50s) / sum(n for _, n in p50s) if p50s else None,
            "p99_ms": max((v["p99_ms"] for v in live if v.get("p99_ms") is not None),
                          default=None)}
