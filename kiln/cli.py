"""The ``kiln`` command line: one command per user action.

With ``--json`` stdout carries exactly one JSON document (DESIGN.md); people get rich tables.
Errors print one line on stderr saying how to fix the input, and exit non-zero.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kiln.errors import KilnError
from kiln.settings import Settings, apply_privacy_env, get_settings

app = typer.Typer(
    help="Kiln: take a trained PyTorch model to a fast, safely rolled-out HTTP endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
# `kiln demo` reproduces the example data and models (optimize_digits is DVC's own showcase).
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
F = TypeVar("F", bound=Callable[..., Any])
DRIFT_EXIT_CODE = 10  # `kiln drift --exit-code` found drift; apart from the errors' 1-8


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


def handled(func: F) -> F:
    """Turn Kiln's errors into one stderr line and the error's exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KilnError as exc:
            message = " ".join(str(exc).split())  # one line, whatever a tool put in it
            err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    apply_privacy_env()
    return get_settings()


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@app.command()
@handled
def upload(
    name: Annotated[str, typer.Argument(help="Model name, a slug such as 'digits'.")],
    source: Annotated[str, typer.Argument(help="A .pt2, an .onnx, or a folder with kiln.yaml.")],
    version: Annotated[str | None, typer.Option(help="Semver; default: next patch.")] = None,
    dataset: Annotated[str | None, typer.Option(help=".npz (inputs, labels) or .parquet.")] = None,
    task: Annotated[
        str | None, typer.Option(help="classification | regression | embedding.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a model version (and its dataset) in the registry and the artifact store."""
    from kiln.upload import upload as do_upload

    result = do_upload(settings=_settings(), name=name, source=source, version=version,
                       dataset=dataset, task=task)
    if as_json:
        _emit({"name": result.name, "version": result.version, "sha256": result.sha256,
               "status": str(result.status), "created": result.created,
               "dataset": result.dataset.model_dump() if result.dataset else None})
        return
    verb = "registered" if result.created else "unchanged (same content already stored as)"
    out.print(f"{verb} [bold]{result.name}@{result.version}[/bold] sha256 {result.sha256}")
    if result.dataset is not None:
        ds = result.dataset
        state = "[green]passed[/green]" if ds.check_passed else "[red]FAILED (not used)[/red]"
        out.print(f"dataset {ds.name}: {ds.rows} rows, checks {state}")
        for failure in ds.failures:
            out.print(f"  - {failure}", highlight=False)


@app.command()
@handled
def models(as_json: JsonOpt = False) -> None:
    """List models and their versions."""
    from kiln.views import list_models_view

    doc = list_models_view(_settings())
    if as_json:
        _emit(doc)
        return
    table = Table("model", "task", "version", "status", "sha256")
    for model in doc["models"]:
        for v in model["versions"]:
            table.add_row(model["name"], model["task"], v["version"], v["status"],
                          v["sha256"][:16])
    out.print(table)


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Default: newest.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one version: status, spec, artifacts, datasets and jobs."""
    from kiln.views import show_version_view

    name, version = _split_ref(ref)
    doc = show_version_view(_settings(), name=name, version=version)
    if as_json:
        _emit(doc)
        return
    out.print(f"[bold]{doc['name']}@{doc['version']}[/bold]  status {doc['status']}  "
              f"task {doc['task']}")
    for io in ("inputs", "outputs"):
        for t in doc["spec"].get(io, []):
            out.print(f"  {io[:-1]} {t['name']}: {t['datatype']} {t['shape']}")
    table = Table("kind", "backend", "precision", "sha256", "size", "selected", "path")
    for a in doc["artifacts"]:
        table.add_row(a["kind"], a["backend"], a["precision"], a["sha256"][:16], str(a["size"]),
                      "yes" if a["selected"] else "", a["path"])
    out.print(table)
    for d in doc["datasets"]:
        out.print(f"  dataset {d['name']} ({d['rows']} rows): "
                  f"{'passed' if d['check_passed'] else 'failed'}")


@app.command()
@handled
def optimize(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Default: newest.")],
    as_json: JsonOpt = False,
) -> None:
    """Extract, quantize, compile and validate a version; select the fastest passing variant."""
    doc = _run_with_progress(_settings(), ref)
    rejected = doc["status"] == "rejected"
    if as_json:
        _emit({k: v for k, v in doc.items() if k != "markdown"})
        raise typer.Exit(7 if rejected else 0)
    if rejected:
        err.print(f"[red]rejected:[/red] {doc['reason']}", highlight=False)
        raise typer.Exit(7)
    table = Table("backend", "precision", "metric", "drop", "p50 b1 ms", "p50 b32 ms",
                  "speedup", "size", "passed", title=f"{ref}: variants")
    for v in [doc["baseline"], *doc["variants"]]:
        lat = v["latency_ms"]
        table.add_row(v["backend"], v["precision"], f"{v['metric']:.4f}",
                      f"{v['metric_drop']:+.4f}",
                      f"{lat.get('1', {}).get('p50', float('nan')):.3f}",
                      f"{lat.get('32', {}).get('p50', float('nan')):.3f}",
                      f"{v.get('speedup') or 1.0:.2f}x", str(v["size_bytes"]),
                      "[green]yes[/green]" if v["passed"] else "[red]no[/red]")
    out.print(table)
    out.print(f"selected [bold]{doc['selected']['backend']}/{doc['selected']['precision']}"
              f"[/bold]: {doc['reason']}", highlight=False)
    for note in doc.get("skipped", []):
        out.print(f"  note: {note}", highlight=False)
    out.print(f"chart: {doc['chart']}")


def _run_with_progress(settings: Settings, ref: str) -> dict[str, Any]:
    """Run the optimize flow in a thread; draw its progress from the registry's job rows."""
    import threading

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.optimize import optimize_model
    from kiln.views import job_progress

    name, version = _split_ref(ref)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["doc"] = optimize_model(name=name, version=version)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[jobs]}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"optimizing {ref}", total=100, jobs="")
        while thread.is_alive():
            thread.join(timeout=0.5)
            done, total, running = job_progress(settings, name=name, version=version)
            bar.update(task, completed=done, jobs=running)
    if "error" in result:
        raise result["error"]
    return result["doc"]


@app.command()
@handled
def deploy(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Default: newest.")],
    strategy: Annotated[str | None, typer.Option(
        help="canary (the default once the model has a stable version: weight steps with "
             "guardrails, then promote or roll back) or direct (stable at once, no gates).")
    ] = None,
    steps: Annotated[str | None, typer.Option(help="Canary weights, e.g. 0.1,0.5,1.")] = None,
    step_seconds: Annotated[float | None, typer.Option(help="Seconds each canary step is "
                                                            "held (default 30).")] = None,
    wait: Annotated[float, typer.Option(help="direct: seconds to wait for the engine to answer "
                                             "ready (0: do not wait).")] = 180.0,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a version: the deploy-model flow (optimize if needed, champion/challenger gate,
    canary, promote or roll back), or --strategy direct."""
    from kiln.errors import InvalidInput
    from kiln.rollout import deploy_direct, gateway_url, wait_until_served

    if strategy not in (None, "direct", "canary"):
        raise InvalidInput(f"--strategy must be direct or canary, got {strategy!r}")
    settings = _settings()
    name, version = _split_ref(ref)
    if strategy == "direct":
        doc = deploy_direct(settings, name=name, version=version)
        doc["served"] = wait_until_served(settings, timeout_s=wait, model=name,
                                          version=doc["version"]) if wait > 0 else "not-waited"
    else:
        weights = None
        if steps is not None:
            try:
                weights = [float(w) for w in steps.split(",") if w.strip()]
            except ValueError:
                raise InvalidInput("--steps takes weights between 0 and 1, e.g. 0.1,0.5,1") \
                    from None
        from contextlib import redirect_stdout

        from flows.deploy import deploy_model

        with redirect_stdout(sys.stderr):  # the flow's prints and logs: never on stdout
            doc = deploy_model(name, version, strategy=strategy, canary_steps=weights,
                               step_seconds=step_seconds)
    if as_json:
        _emit(doc)
    else:
        colour = {"promoted": "green", "rolled_back": "yellow", "rejected": "red"}.get(
            doc["outcome"], "white")
        out.print(f"[bold]{doc['model']}@{doc['version']}[/bold]: "
                  f"[{colour}]{doc['outcome']}[/{colour}] ({doc['reason']})", highlight=False)
        if doc.get("served") == "no-gateway":
            out.print(f"no gateway answers at {gateway_url(settings)}: run `kiln serve` to "
                      "serve it")
    if doc["outcome"] == "rejected":
        raise typer.Exit(7)
    if doc["outcome"] == "rolled_back":
        raise typer.Exit(9)


@app.command()
@handled
def promote(
    name: Annotated[str, typer.Argument(help="The model whose canary becomes stable.")],
    as_json: JsonOpt = False,
) -> None:
    """Promote the model's canary now (the old stable version retires; its engine drains)."""
    from kiln.rollout import promote_now

    doc = promote_now(_settings(), name=name)
    _emit(doc) if as_json else out.print(f"[bold]{name}@{doc['version']}[/bold] is the stable "
                                         f"version (was {doc['previous']})", highlight=False)


@app.command()
@handled
def rollback(
    name: Annotated[str, typer.Argument(help="The model to roll back.")],
    to: Annotated[str | None, typer.Option("--to", help="An earlier production version "
                                                        "(default: drop the canary, or the "
                                                        "newest earlier one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop the canary at once, or put an earlier production version back as the stable one
    (its artifacts restored from the DVC remote when they are not here)."""
    from kiln.rollout import rollback_now

    doc = rollback_now(_settings(), name=name, to_version=to)
    _emit(doc) if as_json else out.print(f"{name}: {doc['reason']}", highlight=False)


@app.command()
@handled
def status(as_json: JsonOpt = False) -> None:
    """Each deployed model: stable and canary versions, weight, live figures from the gateway
    (p50/p99, error rate, requests per second over the last minute), the last drift share and
    the open alerts."""
    from kiln.rollout import status_view

    doc = status_view(_settings())
    if as_json:
        _emit(doc)
        return
    table = Table("model", "stable", "canary", "weight", "state", "p50 ms", "p99 ms",
                  "errors", "rps", "drift", "alerts", title="deployments")
    fmt = (lambda v, spec: "-" if v is None else format(v, spec))
    for m in doc["models"]:
        drift = fmt(m["drift_share"], ".0%") + (" [red]drift[/red]" if m["drift_detected"]
                                                else "")
        alerts = ", ".join(a["kind"] + (f"@{a['version']}" if a["version"] else "")
                           for a in m["alerts"])
        table.add_row(m["name"], m["stable"] or "-", m["canary"] or "-",
                      f"{m['canary_weight']:.0%}" if m["canary"] else "-", m["state"],
                      fmt(m["p50_ms"], ".1f"), fmt(m["p99_ms"], ".1f"),
                      fmt(m["error_rate"], ".2%"), fmt(m["rps"], ".1f"), drift,
                      f"[red]{alerts}[/red]" if alerts else "-")
    out.print(table)
    for m in doc["models"]:
        for a in m["alerts"]:
            out.print(f"[red]alert[/red] {m['name']}"
                      f"{'@' + a['version'] if a['version'] else ''} {a['kind']}: {a['message']}",
                      highlight=False)
    if not doc.get("gateway"):
        out.print(f"no gateway answers at {doc['gateway_url']}: live figures need `kiln serve`")


@app.command()
@handled
def drift(
    name: Annotated[str, typer.Argument(help="The model whose recent traffic is judged.")],
    hours: Annotated[float, typer.Option(help="Window of logged requests, in hours.")] = 24.0,
    min_samples: Annotated[int, typer.Option(
        help="Fewer valid logged rows than this: 'not enough data' (drift_detected null).")
    ] = 100,
    version: Annotated[str | None, typer.Option(
        help="Judge only this version's traffic, against its dataset (default: every "
             "version's traffic, against the stable version's dataset).")] = None,
    exit_code: Annotated[bool, typer.Option(
        "--exit-code", help=f"Exit {DRIFT_EXIT_CODE} when drift is detected (0 for no drift or "
                            "not enough data), for scripts and cron jobs, as `git diff "
                            "--exit-code` does.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the monitor-drift flow now: the model's recent inputs against its reference dataset
    (Great Expectations, then Evidently); stores the HTML report and opens or resolves the
    drift alert."""
    from contextlib import redirect_stdout

    from kiln import crud
    from kiln.db import session_scope
    from kiln.drift import DriftSettings
    from kiln.errors import InvalidInput

    if not hours > 0:
        raise InvalidInput(f"--hours must be positive, got {hours}")
    DriftSettings(min_samples=min_samples)  # refuses a bad minimum before anything starts
    settings = _settings()
    with session_scope(settings.db_url) as session:  # an unknown name fails fast, in one line
        crud.require_model(session=session, name=name)
        if version is not None:
            crud.require_version(session=session, name=name, version=version)
    from flows.monitor import monitor_drift

    with redirect_stdout(sys.stderr):  # the flow's prints and logs: never on stdout
        doc = monitor_drift(name, hours=hours, min_samples=min_samples, version=version)
    if as_json:
        _emit(doc)
    else:
        verdict = {True: "[red]drift[/red]", False: "[green]no drift[/green]",
                   None: "[yellow]not enough data[/yellow]"}[doc["drift_detected"]]
        share = "-" if doc["drift_share"] is None else f"{doc['drift_share']:.3f}"
        out.print(f"[bold]{doc['model']}[/bold]: {verdict} (drift share {share}, "
                  f"{doc['samples']} rows; {doc['reason']})", highlight=False)
        for failure in doc["checks"]["failures"]:
            out.print(f"  - {failure}", highlight=False)
        if doc["report"]:
            out.print(f"report: {doc['report']}")
    if exit_code and doc["drift_detected"] is True:
        raise typer.Exit(DRIFT_EXIT_CODE)


@app.command()
@handled
def serve(
    port: Annotated[int | None, typer.Option(help="Gateway port (default KILN_GATEWAY_PORT, "
                                                  "8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
) -> None:
    """Run the gateway and the supervisor that keeps engines matched to the deployments."""
    import logging

    from serving.gateway import serve as run_gateway

    settings = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    bind = host or settings.gateway_host
    err.print(f"kiln gateway on http://{bind}:{settings.gateway_port if port is None else port} "
              f"(registry {settings.db_url})", highlight=False)
    run_gateway(settings, port=port, host=host)


@app.command("backup")
@handled
def backup_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A new or empty folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Snapshot the registry and the manifest of the artifacts it references."""
    from kiln.backup import backup

    manifest = backup(_settings(), directory)
    doc = {"dir": str(directory), "database": manifest["database"],
           "artifacts": len(manifest["artifacts"])}
    _emit(doc) if as_json else out.print(
        f"backed up the {doc['database']} registry and {doc['artifacts']} artifact pointers "
        f"to {directory}")


@app.command("restore")
@handled
def restore_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A `kiln backup` folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup into an empty KILN_HOME, pulling artifacts from the DVC remote."""
    from kiln.backup import restore

    doc = restore(_settings(), directory)
    _emit(doc) if as_json else out.print(
        f"restored the {doc['database']} registry and {doc['restored']} artifacts "
        f"(hashes checked) from {doc['remote']}")


@app.command()
@handled
def demo(
    project: Annotated[Path, typer.Option(help="The Kiln checkout (holds dvc.yaml).")] = Path("."),
) -> None:
    """The journey: reproduce the examples, register them, serve digits, then watch the gates
    reject a worse version and the canary roll back a slower one (flows/demo.py)."""
    _settings()
    from flows.demo import run_demo

    code = run_demo(project)
    if code:
        raise typer.Exit(code)


# --- API keys (issue 4): only a key's sha256 is stored; the key itself is printed once.
keys_app = typer.Typer(help="Create, list and revoke API keys for the gateway.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_doc(row: Any) -> dict[str, Any]:
    """A key's public fields (never its hash)."""
    return {"prefix": row.prefix, "scopes": list(row.scopes), "models": row.models,
            "rate_per_second": row.rate_per_second, "revoked": row.revoked,
            "created_at": row.created_at}


@keys_app.command("create")
@handled
def keys_create(
    scope: Annotated[list[str], typer.Option(
        "--scope", help="infer | deploy | admin (repeatable; admin implies all, deploy infer).")],
    rate: Annotated[float | None, typer.Option(
        help="Requests per second (also 60x per minute); default: the gateway's default "
             "(KILN_DEFAULT_RATE_PER_SECOND, unlimited when unset).")] = None,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated model names the key may reach; default: every model.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; it is shown once (only its sha256 is stored)."""
    from kiln import crud
    from kiln.db import session_scope
    from kiln.errors import InvalidInput

    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise InvalidInput(f"--rate {rate:g} is not a rate: give requests per second above 0, "
                           "or leave it out for the default")
    names = None if models is None else [m.strip() for m in models.split(",") if m.strip()]
    if names is not None and not names:
        raise InvalidInput("--models is empty: give model names such as digits,minilm, or leave "
                           "it out for every model")
    with session_scope(_settings().db_url) as session:
        key, row = crud.create_api_key(session=session, scopes=scope, models=names,
                                       rate_per_second=rate)
    if as_json:
        _emit({"key": key, **_key_doc(row)})
        return
    out.print(f"key [bold]{row.prefix}[/bold] scopes {', '.join(row.scopes)}, models "
              f"{', '.join(row.models) if row.models else 'all'}, rate "
              f"{f'{row.rate_per_second:g}/s' if row.rate_per_second else 'default'}",
              highlight=False)
    out.print(key, highlight=False, soft_wrap=True, markup=False)
    err.print("store it now: it is not shown again (send it as 'Authorization: Bearer <key>')")


@keys_app.command("list")
@handled
def keys_list(as_json: JsonOpt = False) -> None:
    """List keys by prefix: scopes, models, rate, revoked (never the key or its hash)."""
    from kiln import crud
    from kiln.db import session_scope

    with session_scope(_settings().db_url) as session:
        docs = [_key_doc(row) for row in crud.list_api_keys(session=session)]
    if as_json:
        _emit({"keys": docs})
        return
    table = Table("prefix", "scopes", "models", "rate/s", "revoked", "created")
    for d in docs:
        table.add_row(d["prefix"], ", ".join(d["scopes"]),
                      ", ".join(d["models"]) if d["models"] else "all",
                      f"{d['rate_per_second']:g}" if d["rate_per_second"] else "default",
                      "[red]yes[/red]" if d["revoked"] else "", str(d["created_at"])[:19])
    out.print(table)


@keys_app.command("revoke")
@handled
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, e.g. kiln_1a2b3c4d "
                                               "(`kiln keys list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; running gateways refuse it within KILN_AUTH_CACHE_S (default 1 s)."""
    from kiln import crud
    from kiln.db import session_scope

    settings = _settings()
    with session_scope(settings.db_url) as session:
        row = crud.revoke_api_key(session=session, prefix=prefix)
    if as_json:
        _emit({"prefix": row.prefix, "revoked": True})
        return
    out.print(f"revoked {row.prefix}; gateways refuse it within {settings.auth_cache_s:g} s",
              highlight=False)


def main() -> None:
    apply_privacy_env()
    app()


if __name__ == "__main__":
    main()
