"""`make up`: Kiln as a local service, a Prefect server with its UI, a process worker and the
gateway, all on 127.0.0.1, stopped together on Ctrl-C.

Run it as ``python -m flows.up [--prefect-port P] [--gateway-port P] [--no-ui] [--cluster]``.
The deployments come from the checkout's ``prefect.yaml``, so what the UI's Run button starts is
exactly what that file declares.

The cluster form (``--cluster``, ``make up CLUSTER=1``; docs/cluster.md) keeps Prefect's state
in PostgreSQL (``KILN_PREFECT_DATABASE_URL``, given to the server only), needs the registry in
PostgreSQL too (``KILN_DATABASE_URL``), and registers the ``*-cluster`` deployments on the
``kiln-cluster`` pool with a concurrency limit; its workers (``--workers N`` here, and one on
every other machine) take runs from that pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Self

import httpx
import psutil
import typer
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.errors import Conflict, ExternalToolError, InvalidInput, KilnError
from kiln.net import redact_url
from kiln.processes import ExitedEarly, ReadyTimeout, http_ok, start_group, stop_group, wait_ready
from kiln.settings import PRIVACY_ENV, Settings, get_settings

# The checkout this module belongs to (flows/ is installed in editable mode): where
# prefect.yaml lives and where the worker's flow runs import flows/ from.
PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# The work pools prefect.yaml's deployments name (a test checks that they agree).
WORK_POOL = "kiln-process"
CLUSTER_POOL = "kiln-cluster"
# What each form registers of prefect.yaml (the cluster form: the same flows on CLUSTER_POOL).
DEPLOYMENTS = ("deploy-model", "reoptimize", "monitor-drift")
CLUSTER_DEPLOYMENTS = (
    "deploy-model-cluster",
    "optimize-model-cluster",
    "reoptimize-cluster",
    "monitor-drift-cluster",
)


class UpSettings(BaseSettings):
    """What `make up` starts and how long it waits (``KILN_PREFECT_PORT`` etc.; KILN_HOME and
    KILN_GATEWAY_PORT come from Kiln's own settings)."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    prefect_port: int = Field(default=4200, ge=1, le=65535, description="Prefect API + UI port")
    prefect_ui: bool = Field(default=True, description="serve Prefect's UI (off in tests)")
    project: Path = Field(default=PROJECT, description="the checkout holding prefect.yaml")
    prefect_file: str = Field(default="prefect.yaml", description="relative to project")
    worker_poll_s: float = Field(default=2.0, gt=0, description="worker's query interval")
    start_timeout_s: float = Field(default=180.0, gt=0, description="per component")
    stop_timeout_s: float = Field(default=30.0, gt=0, description="per child, then SIGKILL")
    cluster: bool = Field(default=False, description="the cluster form (docs/cluster.md)")
    prefect_database_url: SecretStr | None = Field(
        default=None,
        description="Prefect's own PostgreSQL database, postgresql+asyncpg://USER[:PW]@HOST/DB "
        "(the cluster form's Prefect state; given to the server process only)",
    )
    prefect_host: str = Field(
        default=HOST, description="the address the Prefect server binds (other machines' workers)"
    )
    workers: int = Field(default=1, ge=1, le=16, description="process workers started here")
    pool_concurrency: int = Field(
        default=2, ge=1, description="flow runs the cluster pool runs at once, on all machines"
    )


class Child:
    """One long-running process `make up` started, in its own process group (session).

    Lifecycle: started by :meth:`Stack._spawn`; :meth:`wait_ready` until it answers;
    :meth:`stop` stops its group (:func:`kiln.processes.stop_group`: SIGTERM, wait, SIGKILL),
    then any descendant that left it (Prefect starts flow runs in new sessions; the supervisor
    starts engines in theirs).
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._descendants: dict[int, psutil.Process] = {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remember_descendants(self) -> None:
        """Record the processes below this child (while it is alive to be asked)."""
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._descendants[p.pid] = p

    def processes(self) -> list[psutil.Process]:
        """This child and every descendant seen so far."""
        self.remember_descendants()
        own: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            own.append(psutil.Process(self.proc.pid))
        return own + list(self._descendants.values())

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def check_alive(self) -> None:
        """ExternalToolError naming this child and its log when it has exited."""
        if not self.alive():
            raise self._exited()

    def _exited(self) -> ExternalToolError:
        return ExternalToolError(
            f"{self.name} exited ({self.proc.returncode}): see {self.log_path}"
        )

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float, not_ready: str) -> None:
        """Until ``probe`` succeeds; ExternalToolError when this child exits first, or
        "``not_ready`` in N s" when ``timeout_s`` passes."""
        try:
            wait_ready(self.proc, probe, timeout_s=timeout_s, what=self.name)
        except ExitedEarly:
            raise self._exited() from None
        except ReadyTimeout:
            raise ExternalToolError(
                f"{not_ready} in {timeout_s:.0f} s: see {self.log_path}"
            ) from None

    def stop(self, timeout_s: float) -> None:
        self.remember_descendants()
        stop_group(self.proc, timeout_s=timeout_s)
        leftovers = [p for p in self._descendants.values() if still_running(p)]
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _gone, alive = psutil.wait_procs(leftovers, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)


def still_running(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (bound as uvicorn binds: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class Stack:
    """Prefect server, work pool, deployments, process worker and gateway for one KILN_HOME.

    Lifecycle: :meth:`start` (refuses when a port is taken, before starting anything) ->
    :meth:`watch` (until a signal or a child dies) -> :meth:`stop` (gateway, worker, server:
    the reverse order, so the worker can still report to the server while it stops). Also a
    context manager: ``with Stack(...) as stack:`` starts, and stops on the way out.

    Every child gets the same environment: KILN_HOME, KILN_DATABASE_URL (when set),
    KILN_GATEWAY_PORT, PREFECT_HOME (``$KILN_HOME/prefect``) and PREFECT_API_URL, so a flow run
    the worker starts writes the registry that ``kiln serve`` reads.
    """

    def __init__(
        self,
        up: UpSettings | None = None,
        *,
        home: Path | None = None,
        gateway_port: int | None = None,
        base_env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        kiln = get_settings()  # defaults for what the caller does not pass
        self.up = up or UpSettings()
        # Absolute: the worker's flow runs change directory to the checkout.
        self.home = (home or kiln.home).absolute()
        self.gateway_host = kiln.gateway_host
        self.gateway_port = kiln.gateway_port if gateway_port is None else gateway_port
        base = dict(os.environ if base_env is None else base_env)
        self.prefect_url = f"http://{self.up.prefect_host}:{self.up.prefect_port}"
        self.api_url = self.prefect_url + "/api"
        self.gateway_url = f"http://{self.gateway_host}:{self.gateway_port}"
        self.logs = self.home / "logs"
        self.env = {
            **base,
            **{k: v for k, v in PRIVACY_ENV.items() if k not in base},
            "KILN_HOME": str(self.home),
            "KILN_GATEWAY_PORT": str(self.gateway_port),
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            # `prefect server start --port P` alone still tells the UI to call port 4200.
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_UI_ENABLED": str(self.up.prefect_ui).lower(),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": str(self.up.worker_poll_s),
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_CLI_WRAP_LINES": "false",
        }
        self.pool = CLUSTER_POOL if self.up.cluster else WORK_POOL
        self.children: list[Child] = []
        self.admin_key: str | None = None
        self.timings: dict[str, float] = {}
        self._say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._bin = Path(sys.executable).parent

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, admin_key: bool = True) -> None:
        """Start everything; raise Conflict (a port is taken), InvalidInput (the cluster form
        without PostgreSQL) or ExternalToolError."""
        self.check_cluster()
        self.check_ports()
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        self._timed("prefect server", self.start_server)
        self._timed("work pool", self.ensure_work_pool)
        self._timed("deployments", self.register_deployments)
        self._timed("worker", self.start_worker)
        self._timed("gateway", self.start_gateway)
        if admin_key:
            self._timed("admin key", self.create_admin_key)

    def check_cluster(self) -> None:
        """The cluster form shares state through PostgreSQL only: refuse it on SQLite."""
        if not self.up.cluster:
            return
        prefect_db = self.up.prefect_database_url
        if prefect_db is None or not prefect_db.get_secret_value().startswith("postgresql"):
            raise InvalidInput(
                "the cluster form keeps Prefect's state in PostgreSQL: set "
                "KILN_PREFECT_DATABASE_URL=postgresql+asyncpg://USER@HOST/DB (a database of "
                "Prefect's own)"
            )
        if not self.env.get("KILN_DATABASE_URL", "").startswith("postgresql"):
            raise InvalidInput(
                "the cluster form needs the registry every machine shares: set "
                "KILN_DATABASE_URL=postgresql+psycopg://USER@HOST/DB"
            )

    def check_ports(self) -> None:
        for what, host, port, option in (
            ("Prefect", self.up.prefect_host, self.up.prefect_port, "--prefect-port"),
            ("gateway", self.gateway_host, self.gateway_port, "--gateway-port"),
        ):
            if port_in_use(host, port):
                raise Conflict(
                    f"{what} port {port} on {host} is in use: stop what holds it "
                    f"or pass another port with {option}"
                )

    def start_server(self) -> None:
        database = self.up.prefect_database_url
        where = (
            f"database {redact_url(database.get_secret_value())}"
            if database is not None and self.up.cluster
            else f"PREFECT_HOME {self.env['PREFECT_HOME']}"
        )
        self._say(f"starting the Prefect server on {self.prefect_url} ({where})")
        extra = (
            {"PREFECT_API_DATABASE_CONNECTION_URL": database.get_secret_value()}
            if database is not None and self.up.cluster
            else {}
        )
        server = self._spawn(
            "prefect-server",
            [
                self._tool("prefect"),
                "server",
                "start",
                "--host",
                self.up.prefect_host,
                "--port",
                str(self.up.prefect_port),
            ],
            env=extra,
        )
        self._wait_http(server, self.api_url + "/health")

    def ensure_work_pool(self) -> None:
        resp = httpx.get(f"{self.api_url}/work_pools/{self.pool}", timeout=10)
        if resp.status_code != 200:
            self._cli(
                "work pool",
                "prefect",
                "--no-prompt",
                "work-pool",
                "create",
                self.pool,
                "--type",
                "process",
            )
        if self.up.cluster:
            limit = str(self.up.pool_concurrency)
            self._cli(
                "work pool limit", "prefect", "work-pool", "set-concurrency-limit", self.pool, limit
            )

    def register_deployments(self) -> None:
        names = CLUSTER_DEPLOYMENTS if self.up.cluster else DEPLOYMENTS
        self._say(f"registering {', '.join(names)} of {self.up.prefect_file}")
        # prefect.yaml's pull step is `set_working_directory: {{ $PWD }}`, resolved here.
        self._cli(
            "deployments",
            "prefect",
            "--no-prompt",
            "deploy",
            *(arg for name in names for arg in ("--name", name)),
            "--prefect-file",
            self.up.prefect_file,
            cwd=self.up.project,
            env={"PWD": str(self.up.project)},
        )

    def start_worker(self) -> None:
        count = self.up.workers
        self._say(f"starting {count} process worker(s) on the {self.pool} pool")
        names = [f"kiln-{socket.gethostname()}-{os.getpid()}-{i}" for i in range(count)]
        workers = [
            self._spawn(
                "prefect-worker" if count == 1 else f"prefect-worker-{i}",
                [
                    self._tool("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    self.pool,
                    "--type",
                    "process",
                    "--name",
                    name,
                    "--install-policy",
                    "never",
                    "--no-create-pool-if-not-found",
                ],
            )
            for i, name in enumerate(names)
        ]

        # Ready once each has reported to the server (its heartbeat: ONLINE).
        def reported() -> bool:
            resp = httpx.post(f"{self.api_url}/work_pools/{self.pool}/workers/filter", timeout=10)
            online = {w["name"] for w in resp.json() if w.get("status") == "ONLINE"}
            return online >= set(names)

        workers[0].wait_ready(
            reported, self.up.start_timeout_s, "the Prefect worker(s) did not report"
        )
        for worker in workers:
            worker.check_alive()

    def start_gateway(self) -> None:
        self._say(f"starting the gateway (kiln serve) on {self.gateway_url}")
        gateway = self._spawn(
            "gateway", [self._tool("kiln"), "serve", "--port", str(self.gateway_port)]
        )
        self._wait_http(gateway, self.gateway_url + "/v2/health/live")

    def create_admin_key(self) -> None:
        out = self._cli("admin key", "kiln", "keys", "create", "--scope", "admin", "--json")
        self.admin_key = json.loads(out)["key"]

    def watch(self) -> None:
        """Block until a child exits; raise ExternalToolError naming it (a signal interrupts
        this with KeyboardInterrupt, see :func:`up`)."""
        while True:
            for child in self.children:
                child.check_alive()
                child.remember_descendants()
            time.sleep(1.0)

    def processes(self) -> list[psutil.Process]:
        """Every process this stack started, and their descendants seen so far."""
        return [p for child in self.children for p in child.processes()]

    def stop(self) -> None:
        """Stop every child, newest first (idempotent)."""
        while self.children:
            child = self.children.pop()
            t0 = time.monotonic()
            was_alive = child.alive()
            child.stop(self.up.stop_timeout_s)
            if was_alive:
                self._say(f"stopped {child.name} ({time.monotonic() - t0:.1f} s)")

    # --- helpers ---------------------------------------------------------------------------
    def _timed(self, what: str, step: Callable[[], None]) -> None:
        t0 = time.monotonic()
        step()
        self.timings[what] = round(time.monotonic() - t0, 2)

    def _tool(self, name: str) -> str:
        return str(self._bin / name)

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        log_path = self.logs / f"{name}.log"
        proc = start_group(
            argv, env={**self.env, **(env or {})}, cwd=self.up.project, log_path=log_path
        )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _cli(
        self,
        what: str,
        tool: str,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        proc = subprocess.run(
            [self._tool(tool), *args],
            env={**self.env, **(env or {})},
            cwd=cwd or self.up.project,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=self.up.start_timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise ExternalToolError(
                f"{what}: `{tool} {' '.join(args[:3])}` failed: "
                f"{detail[-1] if detail else proc.returncode}"
            )
        return proc.stdout

    def _wait_http(self, child: Child, url: str) -> None:
        child.wait_ready(
            http_ok(url), self.up.start_timeout_s, f"{child.name} did not answer {url}"
        )


def banner(stack: Stack) -> str:
    lines = [
        "",
        "Kiln is up (Ctrl-C stops everything it started):",
        f"  Prefect UI   {stack.prefect_url}"
        + ("" if stack.up.prefect_ui else " (UI off: API only)"),
        f"  gateway      {stack.gateway_url}   (OIP v2: /v2/models/NAME/infer)",
    ]
    if stack.admin_key:
        lines.append(f"  admin key    {stack.admin_key}   (shown once: keep it)")
    lines += [
        f"  work pool    {stack.pool}"
        + (f" (at most {stack.up.pool_concurrency} runs at once)" if stack.up.cluster else ""),
        f"  logs         {stack.logs}",
        f"  registry     {stack.home}",
        "  deploy: UI > Deployments > deploy-model > Run > Custom run, "
        'parameters {"model": "digits"}',
        "",
    ]
    return "\n".join(lines)


_PREFECT_PORT = UpSettings.model_fields["prefect_port"].default
_GATEWAY_PORT = Settings.model_fields["gateway_port"].default


def up(
    prefect_port: Annotated[
        int | None,
        typer.Option(help=f"Prefect API + UI port (default KILN_PREFECT_PORT, {_PREFECT_PORT})."),
    ] = None,
    gateway_port: Annotated[
        int | None, typer.Option(help=f"Gateway port (default KILN_GATEWAY_PORT, {_GATEWAY_PORT}).")
    ] = None,
    ui: Annotated[bool, typer.Option(help="Serve Prefect's UI.")] = True,
    cluster: Annotated[
        bool,
        typer.Option(
            help="The cluster form: Prefect on PostgreSQL (KILN_PREFECT_DATABASE_URL), the "
            "*-cluster deployments on the kiln-cluster pool (docs/cluster.md)."
        ),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Process workers to start here (default 1).")
    ] = None,
) -> None:
    """Start the Prefect server + UI, the deployments of prefect.yaml, a process worker and
    the gateway; print their addresses and an admin key; stop them all on Ctrl-C."""
    overrides: dict[str, Any] = {"prefect_ui": ui}
    if cluster:
        overrides["cluster"] = True
    if workers is not None:
        overrides["workers"] = workers
    if prefect_port is not None:
        overrides["prefect_port"] = prefect_port
    try:
        stack = Stack(UpSettings(**overrides), gateway_port=gateway_port)
    except ValidationError as exc:  # a KILN_* value: named, never echoed (it may be a URL)
        fields = ", ".join("KILN_" + "_".join(map(str, e["loc"])).upper() for e in exc.errors())
        print(f"error: invalid {fields}: see `python -m flows.up --help`", file=sys.stderr)
        raise typer.Exit(2) from None
    # SIGTERM stops us as Ctrl-C does; children are in their own sessions, so only we get the
    # terminal's SIGINT and we stop them. Installing a handler also means the children start
    # with SIGINT at its default even when we inherited it ignored (`nohup`, `cmd &` in a
    # script): Prefect's worker stops itself by sending itself SIGINT, and hangs if ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    code = 0
    try:
        stack.start()
        print(banner(stack), flush=True)
        stack.watch()
    except KeyboardInterrupt:
        pass
    except KilnError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        code = exc.exit_code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        stack.stop()
    raise typer.Exit(code)


def main() -> None:
    typer.run(up)


if __name__ == "__main__":
    main()
