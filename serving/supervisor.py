"""The supervisor: reconciles running engines to the registry's Deployment rows.

Lifecycle: ``start()`` -> every ``reconcile_interval_s``: read the registry (desired state) ->
start missing replicas (each an engine process in its own process group on a free 127.0.0.1
port) -> health-check them (a replica is routed only after ``/health`` answers 200, i.e. after
warm-up, and ``/channel`` has named where its workers take the gateway's frames) -> restart a replica that died or keeps failing (with backoff, so a version that cannot
load does not spin) -> scale between the model's min and max replicas by outstanding requests
per replica (Ray Serve's autoscaling rule: target ongoing requests per replica) -> drain and stop
replicas no deployment wants (no new requests; stop when their in-flight ones are answered or the
drain timeout passes) -> ``stop()`` stops every engine it started.

Roles (``kiln serve --role``): only the holder of the reconciler lease in the registry's database
(:mod:`kiln.registry.lease`) acts, i.e. starts and stops engines; ``all`` (the default) and
``reconciler`` contend for it, ``gateway`` never does. The acting one renews its lease every fifth
of its term and publishes its replicas to the routing table (:mod:`kiln.registry.endpoints`), each
write fenced by the lease's token; every process that does not act follows that table instead.
One whose term ran out by its own clock without a renewal (a slow or unreachable database), or
whose fenced write was refused, stops acting at once but keeps its engines serving, and takes its
lease back when the database answers again (the token goes up by one; nobody acted meanwhile
unless another process took the lease). One that finds another process holding the lease steps
down: it stops every engine it started and follows the new holder's table.
Engines outlive no reconciler: each watches its parent and stops when it is gone
(``serving.engine``).

The gateway routes by the same :class:`~serving.state.RoutingState` this writes, in the same
process and event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from sqlalchemy.exc import SQLAlchemyError

from kiln.registry import crud, endpoints, lease
from kiln.registry.db import session_scope
from kiln.settings import Settings
from kiln.spec import ModelSpec
from serving.channel import SECRET_ENV
from serving.config import ServingSettings
from serving.metrics import GatewayMetrics
from serving.state import Replica, RoutingState, ServedModel

log = logging.getLogger("kiln.supervisor")
SCALE_UP_COOLDOWN_S = 5.0
SCALE_DOWN_AFTER_S = 30.0  # load under a quarter of the target for this long: one replica fewer
HEALTH_FAILURES = 3  # failed health checks in a row before a ready replica is restarted
MAX_BACKOFF_S = 30.0
RENEW_AFTER = 0.2  # share of the lease's term after which the holder renews it
DB_ERROR_LOG_S = 10.0  # one log line per this long while the database does not answer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EngineProc:
    """One engine replica the supervisor started."""

    replica: Replica
    proc: subprocess.Popen[bytes]
    started: float
    health_failures: int = 0
    ever_ready: bool = False
    draining_since: float | None = None


@dataclass
class VersionPlan:
    """Desired and running replicas of one served version."""

    model: str
    version: str
    settings: ServingSettings
    wanted: int
    engines: list[EngineProc] = field(default_factory=list)
    restarts: int = 0
    next_start: float = 0.0  # backoff: no new start before this monotonic time
    last_scale_up: float = 0.0
    low_since: float | None = None
    last_error: str = ""


class Supervisor:
    """Keeps one engine process group per wanted replica (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        state: RoutingState,
        metrics: GatewayMetrics,
        *,
        env: dict[str, str] | None = None,
        role: str = "all",
        address: str | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.env = env
        self.role = role
        where = f"{socket.gethostname()} pid {os.getpid()}"
        self.holder = f"{address} ({where})" if address else where
        self.held: lease.Held | None = None  # the lease it acts under; None: it follows
        self._lapsed = False  # held, but not renewed in time: not acting until it renews
        self._published: list[endpoints.Endpoint] | None = None
        self._last_db_error_log = 0.0
        self._unheld_since: float | None = None  # a follower: when it found the lease unheld
        self.plans: dict[tuple[str, str], VersionPlan] = {}
        self.retiring: list[EngineProc] = []
        self._task: asyncio.Task[None] | None = None
        self._client: aiohttp.ClientSession | None = None
        self._log_dir = settings.home / "logs"
        self._last_fingerprint: tuple[Any, ...] | None = None

    # --- lifecycle
    async def start(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        await self.reconcile()  # routes are known before the first request
        self._task = asyncio.create_task(self._loop(), name="kiln-supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._stop_engines()
        held, self.held = self.held, None
        if held is not None:  # the successor need not wait for the term to run out
            try:
                await asyncio.to_thread(self._resign, held)
            except (SQLAlchemyError, lease.LeaseLost) as exc:
                log.warning("could not release the reconciler lease: %s", _one_line(exc))
        if self._client is not None:
            await self._client.close()

    async def _stop_engines(self) -> None:
        everything = [e for plan in self.plans.values() for e in plan.engines] + self.retiring
        await asyncio.gather(*(asyncio.to_thread(self._kill, e) for e in everything))
        self.plans.clear()
        self.retiring.clear()

    async def _loop(self) -> None:
        last_health = 0.0
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            try:
                await self.reconcile()
                if time.monotonic() - last_health >= self.settings.health_interval_s:
                    last_health = time.monotonic()
                    await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not stop supervision
                log.exception("reconcile pass failed")

    # --- desired state
    def _read_registry(self) -> dict[str, ServedModel]:
        models: dict[str, ServedModel] = {}
        with session_scope(self.settings.db_url) as session:
            for deployed in crud.served_versions(session=session):
                model, dep = deployed.model, deployed.deployment
                stable, canary = deployed.stable, deployed.canary
                served = ServedModel(
                    name=model.name,
                    task=str(model.task),
                    settings=ServingSettings.for_model(model.settings or {}),
                    stable=stable.version if stable else None,
                    canary=canary.version if canary else None,
                    canary_weight=dep.canary_weight if canary else 0.0,
                    shadow_share=dep.shadow_share,
                )
                for row in (stable, canary):
                    if row is None:
                        continue
                    served.specs[row.version] = ModelSpec.model_validate(row.spec)
                    selected = [
                        a for a in crud.list_artifacts(session=session, version=row) if a.selected
                    ]
                    served.backends[row.version] = selected[0].backend if selected else "unknown"
                if served.versions():
                    models[model.name] = served
        return models

    def _fingerprint(self) -> tuple[Any, ...]:
        """One cheap query over what desired state depends on: deployment rows and their
        models' settings. The full read (specs, artifacts) runs only when this changes."""
        with session_scope(self.settings.db_url) as session:
            return crud.deployment_fingerprint(session=session)

    def _read_if_changed(self) -> dict[str, ServedModel] | None:
        fingerprint = self._fingerprint()
        if fingerprint == self._last_fingerprint:
            return None
        models = self._read_registry()
        self._last_fingerprint = fingerprint
        return models

    async def reconcile(self) -> None:
        if self.role != "gateway":
            await self._keep_lease()
        if self.held is None:
            await self._follow()
        changed = await asyncio.to_thread(self._read_if_changed)
        if changed is not None:
            self._hand_over(self.state.models, changed)
            self.state.models = changed
        models = self.state.models
        self._end_handovers(models)
        self.state.loaded_at = time.monotonic()
        if not self.acting:
            return
        wanted = {
            (m.name, v): m.settings
            for m in models.values()
            for v in [*m.versions(), *([m.previous] if m.previous else [])]
        }
        for key, serving in wanted.items():
            plan = self.plans.get(key)
            if plan is None:
                plan = self.plans[key] = VersionPlan(
                    key[0], key[1], serving, wanted=serving.min_replicas
                )
            plan.settings = serving
            plan.wanted = min(max(plan.wanted, serving.min_replicas), serving.replica_limit)
        for key in [k for k in self.plans if k not in wanted]:
            plan = self.plans.pop(key)
            for engine in plan.engines:
                self._begin_drain(engine)
            self.retiring.extend(plan.engines)
        for plan in self.plans.values():
            self._reap(plan)
            self._autoscale(plan)
            self._converge(plan)
        await self._finish_drains()
        self._publish()
        await self._publish_table()

    # --- the reconciler lease
    @property
    def acting(self) -> bool:
        """Whether this process holds the reconciler lease now (it starts and stops engines)."""
        held = self.held
        return held is not None and not self._lapsed and held.valid_for() > 0

    def _take_lease(self) -> lease.Held | None:
        held = self.held
        with session_scope(self.settings.db_url) as session:
            taken = lease.acquire(
                session=session,
                name=lease.RECONCILER,
                holder=self.holder,
                ttl_s=self.settings.lease_ttl_s,
            )
            if taken is not None and held is not None and taken.token == held.token + 1:
                # its own lapsed lease taken back, nobody held it between: the same engines
                endpoints.carry_over(session=session, token=held.token, held=taken)
            return taken

    async def _keep_lease(self) -> None:
        """Take the lease when it is free, renew it once a fifth of its term has passed; step
        down when another process holds it or its term ran out without a renewal."""
        held = self.held
        fresh = held is not None and held.valid_for() > self.settings.lease_ttl_s * (
            1 - RENEW_AFTER
        )
        if fresh and not self._lapsed:
            return
        try:
            taken = await asyncio.to_thread(self._take_lease)
        except SQLAlchemyError as exc:
            self._db_error("could not renew the reconciler lease", exc)
            if held is not None and held.valid_for() <= 0:
                self._lapse("its lease ran out without a renewal")
            return
        if taken is None:
            if held is not None:
                await self._step_down("another process holds the reconciler lease")
            return
        if held is None:
            log.info("took the reconciler lease as %s (token %d)", self.holder, taken.token)
        elif taken.token != held.token:
            log.warning(
                "took the reconciler lease back (token %d -> %d); its engines kept serving",
                held.token,
                taken.token,
            )
        if held is None or taken.token != held.token:
            self._published = None  # the table is published again under the new token
        self.held, self._lapsed = taken, False

    def _lapse(self, why: str) -> None:
        """Stop acting, keep the engines: until the lease is renewed (or another holds it)."""
        if not self._lapsed:
            engines = sum(len(p.engines) for p in self.plans.values())
            log.warning("not acting: %s; its %d engines keep serving", why, engines)
        self._lapsed = True

    async def _step_down(self, why: str) -> None:
        """Stop acting at once: stop every engine this process started, then follow the
        routing table like any gateway."""
        engines = sum(len(p.engines) for p in self.plans.values()) + len(self.retiring)
        log.warning("no longer the reconciler: %s; stopping its %d engines", why, engines)
        self.held, self._lapsed = None, False
        self._published = None
        self.state.replicas = {}
        await self._stop_engines()

    def _resign(self, held: lease.Held) -> None:
        with session_scope(self.settings.db_url) as session:
            endpoints.publish(session=session, held=held, endpoints=[])
            lease.release(session=session, held=held)

    # --- the routing table (kiln.registry.endpoints)
    def _write_table(self, held: lease.Held, table: list[endpoints.Endpoint]) -> None:
        with session_scope(self.settings.db_url) as session:
            endpoints.publish(session=session, held=held, endpoints=table)

    async def _publish_table(self) -> None:
        """Publish this reconciler's replicas when they changed, fenced by its lease."""
        held = self.held
        if held is None or not self.acting:
            return
        table = [
            endpoints.Endpoint(
                model=r.model,
                version=r.version,
                url=r.url,
                channels=tuple(r.channels),
                ready=r.ready,
                draining=r.draining,
                pid=r.pid,
            )
            for replicas in self.state.replicas.values()
            for r in replicas
        ]
        if table == self._published:
            return
        try:
            await asyncio.to_thread(self._write_table, held, table)
        except lease.LeaseLost:  # the next pass finds out whether another process holds it
            self._lapse("a write under its lease was refused (fenced)")
            return
        except SQLAlchemyError as exc:  # published again next pass
            self._db_error("could not publish the routing table", exc)
            return
        self._published = table

    def _read_table(self) -> list[endpoints.Endpoint] | None:
        with session_scope(self.settings.db_url) as session:
            return endpoints.followed(session=session)

    async def _follow(self) -> None:
        """Route by the acting reconciler's table; keep the last one while the database does
        not answer, and for up to a lease term while its holder's lease ran out with nobody
        holding it since (a holder that could not renew it while the database was away takes it
        back on its next pass). A replica seen before keeps its gateway-side state (requests in
        flight, circuit breaker)."""
        try:
            table = await asyncio.to_thread(self._read_table)
        except SQLAlchemyError as exc:
            self._db_error("could not read the routing table (routing on the last one)", exc)
            return
        if table is None:
            now = time.monotonic()
            if self._unheld_since is None:
                self._unheld_since = now
                if self.state.replicas:
                    log.warning(
                        "the reconciler's lease ran out and nobody holds it: routing on the "
                        "last table for up to %g s",
                        self.settings.lease_ttl_s,
                    )
            if now - self._unheld_since < self.settings.lease_ttl_s:
                return
            table = []
        else:
            self._unheld_since = None
        known = {(r.model, r.version, r.url): r for rs in self.state.replicas.values() for r in rs}
        replicas: dict[tuple[str, str], list[Replica]] = {}
        for e in table:
            replica = known.get((e.model, e.version, e.url)) or Replica(
                model=e.model, version=e.version, url=e.url, pid=e.pid
            )
            replica.channels = list(e.channels)
            replica.ready = e.ready
            replica.draining = e.draining
            replicas.setdefault((e.model, e.version), []).append(replica)
        self.state.replicas = replicas

    def _db_error(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_db_error_log >= DB_ERROR_LOG_S:
            self._last_db_error_log = now
            log.warning("%s: %s", what, _one_line(exc))

    # --- make-before-break
    def _hand_over(self, before: dict[str, ServedModel], after: dict[str, ServedModel]) -> None:
        """A model whose new stable version has no ready engine yet keeps its outgoing stable
        (when that one still has a ready engine) as ``previous``: the gateway routes to it until
        the new one is ready, and its engines are not drained before then."""
        for name, new in after.items():
            old = before.get(name)
            if old is None or new.stable is None or self.state.ready(name, new.stable):
                continue
            outgoing = next(
                (
                    v
                    for v in (old.stable, old.previous)
                    if v is not None
                    and v != new.stable
                    and v not in new.versions()
                    and v in old.specs
                    and self.state.ready(name, v)
                ),
                None,
            )
            if outgoing is not None:
                new.previous = outgoing
                new.specs[outgoing] = old.specs[outgoing]
                new.backends[outgoing] = old.backends.get(outgoing, "unknown")
                log.info(
                    "%s@%s has no ready engine yet: %s@%s keeps serving until it has",
                    name,
                    new.stable,
                    name,
                    outgoing,
                )

    def _end_handovers(self, models: dict[str, ServedModel]) -> None:
        """Drop ``previous`` once the new stable is ready (or the previous one is not)."""
        for name, served in models.items():
            previous = served.previous
            if previous is None or served.stable is None:
                continue
            if self.state.ready(name, served.stable) or not self.state.ready(name, previous):
                served.previous = None
                if previous not in served.versions():
                    served.specs.pop(previous, None)
                    served.backends.pop(previous, None)

    # --- replicas
    def _spawn(self, plan: VersionPlan) -> None:
        from serving.engine import start_engine_process

        host = self.settings.engine_host  # the channels'; the HTTP API is this host's own
        port = free_port()
        log_path = self._log_dir / f"engine-{plan.model}-{plan.version}-{port}.log"
        env = {**os.environ, **(self.env or {}), "KILN_HOME": str(self.settings.home)}
        if self.settings.database_url:
            env["KILN_DATABASE_URL"] = self.settings.database_url
        if self.settings.engine_secret is not None:
            env[SECRET_ENV] = self.settings.engine_secret.get_secret_value()
        proc = start_engine_process(
            plan.model, plan.version, port, env=env, log_path=log_path, host=host
        )
        replica = Replica(
            model=plan.model, version=plan.version, url=f"http://127.0.0.1:{port}", pid=proc.pid
        )
        plan.engines.append(EngineProc(replica=replica, proc=proc, started=time.monotonic()))
        log.info(
            "started engine %s@%s on port %d (pid %d)", plan.model, plan.version, port, proc.pid
        )

    def _converge(self, plan: VersionPlan) -> None:
        live = [e for e in plan.engines if e.draining_since is None]
        now = time.monotonic()
        while len(live) < plan.wanted and now >= plan.next_start:
            self._spawn(plan)
            live = [e for e in plan.engines if e.draining_since is None]
        while len(live) > plan.wanted:
            victim = scale_in_victim(live)
            self._begin_drain(victim)
            plan.engines.remove(victim)
            self.retiring.append(victim)
            live.remove(victim)

    def _reap(self, plan: VersionPlan) -> None:
        """Drop replicas whose process died (or never got ready in time); schedule a restart."""
        now = time.monotonic()
        for engine in list(plan.engines):
            died = engine.proc.poll() is not None
            stuck = (
                not engine.replica.ready
                and now - engine.started > self.settings.engine_start_timeout_s
            )
            failing = engine.health_failures >= HEALTH_FAILURES
            if not (died or stuck or failing):
                continue
            engine.replica.ready = False
            plan.engines.remove(engine)
            why = (
                f"exited with code {engine.proc.returncode}"
                if died
                else "not ready in time"
                if stuck
                else "failed its health checks"
            )
            plan.last_error = why
            # Stopped off the event loop by _finish_drains, at once (no drain: it is broken);
            # a dead leader's workers may still hold its process group.
            self._begin_drain(engine)
            engine.draining_since = now - self.settings.drain_timeout_s
            self.retiring.append(engine)
            plan.restarts += 1
            self.metrics.engine_restarts.labels(plan.model, plan.version).inc()
            never_ready = not engine.ever_ready
            backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** min(plan.restarts, 6)) if never_ready else 0.0
            plan.next_start = now + backoff
            log.warning(
                "engine %s@%s (pid %d) %s; restarting%s",
                plan.model,
                plan.version,
                engine.proc.pid,
                why,
                f" in {backoff:.1f} s" if backoff else "",
            )

    def _autoscale(self, plan: VersionPlan) -> None:
        ready = [e for e in plan.engines if e.replica.ready and e.draining_since is None]
        if not ready:
            return
        now = time.monotonic()
        load = sum(e.replica.outstanding for e in ready)
        target = plan.settings.target_outstanding
        want = min(
            plan.settings.replica_limit, max(plan.settings.min_replicas, math.ceil(load / target))
        )
        if want > plan.wanted and now - plan.last_scale_up >= SCALE_UP_COOLDOWN_S:
            plan.wanted = want
            plan.last_scale_up = now
            plan.low_since = None
            log.info(
                "scaling %s@%s up to %d replicas (outstanding %d)",
                plan.model,
                plan.version,
                want,
                load,
            )
        elif plan.wanted > plan.settings.min_replicas and load < target * (plan.wanted - 1) / 4:
            plan.low_since = plan.low_since or now
            if now - plan.low_since >= SCALE_DOWN_AFTER_S:
                plan.wanted -= 1
                plan.low_since = None
                log.info("scaling %s@%s down to %d replicas", plan.model, plan.version, plan.wanted)
        else:
            plan.low_since = None

    # --- draining
    def _begin_drain(self, engine: EngineProc) -> None:
        if not engine.replica.draining:
            log.info(
                "draining engine %s@%s (pid %d, %d in flight)",
                engine.replica.model,
                engine.replica.version,
                engine.proc.pid,
                engine.replica.outstanding,
            )
        engine.replica.draining = True
        engine.draining_since = engine.draining_since or time.monotonic()

    async def _finish_drains(self) -> None:
        now = time.monotonic()
        done = [
            e
            for e in self.retiring
            if e.replica.outstanding == 0
            or now - (e.draining_since or now) >= self.settings.drain_timeout_s
            or e.proc.poll() is not None
        ]
        for engine in done:
            self.retiring.remove(engine)
        if done:
            await asyncio.gather(*(asyncio.to_thread(self._kill, e) for e in done))

    @staticmethod
    def _kill(engine: EngineProc) -> None:
        from serving.engine import stop_engine_process

        engine.replica.ready = False
        stop_engine_process(engine.proc, timeout_s=10.0)

    # --- health
    async def check_health(self) -> None:
        if self.held is None:  # its own engines only (still probed while it is not acting)
            return
        engines = [e for p in self.plans.values() for e in p.engines if e.proc.poll() is None]
        await asyncio.gather(*(self._probe(e) for e in engines))
        self._publish()
        await self._publish_table()

    async def _probe(self, engine: EngineProc) -> None:
        assert self._client is not None
        try:
            async with self._client.get(engine.replica.url + "/health") as resp:
                ok = resp.status == 200
            if ok and not engine.replica.channels:  # where its workers take the gateway's frames
                async with self._client.get(engine.replica.url + "/channel") as resp:
                    doc = await resp.json() if resp.status == 200 else {}
                engine.replica.channels = [str(e) for e in doc.get("endpoints", [])]
                ok = bool(engine.replica.channels)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        if ok:
            engine.health_failures = 0
            if not engine.replica.ready:
                log.info(
                    "engine %s@%s ready after %.1f s",
                    engine.replica.model,
                    engine.replica.version,
                    time.monotonic() - engine.started,
                )
            engine.replica.ready = True
            engine.ever_ready = True
        elif engine.replica.ready:
            # A replica busy answering traffic may answer its probe late; what it served in
            # the last few probe periods counts as health (passive health checking).
            recent = time.monotonic() - engine.replica.last_ok < 3 * self.settings.health_interval_s
            engine.health_failures = 0 if recent else engine.health_failures + 1

    def _publish(self) -> None:
        """Expose replicas to the router: ready and draining ones (draining take no new work)."""
        replicas: dict[tuple[str, str], list[Replica]] = {}
        for key, plan in self.plans.items():
            replicas[key] = [e.replica for e in plan.engines]
        for engine in self.retiring:
            replicas.setdefault((engine.replica.model, engine.replica.version), []).append(
                engine.replica
            )
        self.state.replicas = replicas

    # --- reporting
    def engine_rows(self) -> list[dict[str, Any]]:
        import psutil

        rows = []
        for plan in list(self.plans.values()):
            for index, engine in enumerate(plan.engines):
                rows.append(
                    {
                        "model": plan.model,
                        "version": plan.version,
                        "replica": index,
                        "ready": engine.replica.ready,
                        "outstanding": engine.replica.outstanding,
                        "rss_bytes": _group_rss(psutil, engine.proc.pid),
                    }
                )
        return rows

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "model": p.model,
                "version": p.version,
                "wanted": p.wanted,
                "ready": sum(e.replica.ready for e in p.engines),
                "restarts": p.restarts,
                "last_error": p.last_error,
            }
            for p in self.plans.values()
        ]


def scale_in_victim(live: list[EngineProc]) -> EngineProc:
    """The replica to drain when there is one too many: one that is not serving yet (warming
    up, breaker open) before a ready one, else the ready one with the fewest requests in flight.
    Draining the only ready replica while its sibling still warms up would leave the version
    with nothing to answer until the sibling is ready."""
    now = time.monotonic()
    return min(live, key=lambda e: (e.replica.available(now), e.replica.outstanding))


def _group_rss(psutil: Any, pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def _one_line(exc: Exception) -> str:
    """An exception as one short line: a driver's message without its SQL and parameters, and
    never a URL's password (SQLAlchemy renders URLs without it)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
