"""Commands that change or show what is served: deploy, promote, rollback, status, serve."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from kiln.cli._common import (
    JsonOpt,
    _emit,
    _settings,
    _split_ref,
    app,
    err,
    handled,
    out,
)
from kiln.net import redact_url
from kiln.settings import CANARY_STEP_SECONDS, READY_TIMEOUT_S, ServeRole, Settings

# what `kiln serve` binds to without --port and --host (the environment's KILN_* aside)
_DEFAULT_PORT = Settings.model_fields["gateway_port"].default
_DEFAULT_HOST = Settings.model_fields["gateway_host"].default


@app.command()
@handled
def deploy(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Default: newest.")],
    strategy: Annotated[
        str | None,
        typer.Option(
            help="canary (the default once the model has a stable version: weight steps with "
            "guardrails, then promote or roll back) or direct (stable at once, no gates)."
        ),
    ] = None,
    steps: Annotated[str | None, typer.Option(help="Canary weights, e.g. 0.1,0.5,1.")] = None,
    step_seconds: Annotated[
        float | None,
        typer.Option(help=f"Seconds each canary step is held (default {CANARY_STEP_SECONDS:g})."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            help="direct: seconds to wait for the engine to answer ready (0: do not wait)."
        ),
    ] = READY_TIMEOUT_S,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a version: the deploy-model flow (optimize if needed, champion/challenger gate,
    canary, promote or roll back), or --strategy direct."""
    from kiln.errors import InvalidInput
    from kiln.rollout.client import gateway_url, wait_until_served
    from kiln.rollout.commands import deploy_direct

    if strategy not in (None, "direct", "canary"):
        raise InvalidInput(f"--strategy must be direct or canary, got {strategy!r}")
    settings = _settings()
    target = _split_ref(ref)
    name, version = target.name, target.version
    if strategy == "direct":
        doc = deploy_direct(settings, name=name, version=version)
        doc["served"] = (
            wait_until_served(settings, timeout_s=wait, model=name, version=doc["version"])
            if wait > 0
            else "not-waited"
        )
    else:
        weights = None
        if steps is not None:
            try:
                weights = [float(w) for w in steps.split(",") if w.strip()]
            except ValueError:
                raise InvalidInput(
                    "--steps takes weights between 0 and 1, e.g. 0.1,0.5,1"
                ) from None
        from contextlib import redirect_stdout

        from flows.deploy import deploy_model

        with redirect_stdout(sys.stderr):  # the flow's prints and logs: never on stdout
            doc = deploy_model(
                name, version, strategy=strategy, canary_steps=weights, step_seconds=step_seconds
            )
    if as_json:
        _emit(doc)
    else:
        colour = {"promoted": "green", "rolled_back": "yellow", "rejected": "red"}.get(
            doc["outcome"], "white"
        )
        out.print(
            f"[bold]{doc['model']}@{doc['version']}[/bold]: "
            f"[{colour}]{doc['outcome']}[/{colour}] ({doc['reason']})",
            highlight=False,
        )
        if doc.get("served") == "no-gateway":
            out.print(
                f"no gateway answers at {gateway_url(settings)}: run `kiln serve` to serve it"
            )
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
    from kiln.rollout.commands import promote_now

    doc = promote_now(_settings(), name=name)
    _emit(doc) if as_json else out.print(
        f"[bold]{name}@{doc['version']}[/bold] is the stable version (was {doc['previous']})",
        highlight=False,
    )


@app.command()
@handled
def rollback(
    name: Annotated[str, typer.Argument(help="The model to roll back.")],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="An earlier production version "
            "(default: drop the canary, or the "
            "newest earlier one).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop the canary at once, or put an earlier production version back as the stable one
    (its artifacts restored from the DVC remote when they are not here)."""
    from kiln.rollout.commands import rollback_now

    doc = rollback_now(_settings(), name=name, to_version=to)
    _emit(doc) if as_json else out.print(f"{name}: {doc['reason']}", highlight=False)


@app.command()
@handled
def status(as_json: JsonOpt = False) -> None:
    """Each deployed model: stable and canary versions, weight, live figures from the gateway
    (p50/p99, error rate, requests per second over the last minute), the last drift share and
    the open alerts."""
    from kiln.rollout.commands import status_view

    doc = status_view(_settings())
    if as_json:
        _emit(doc)
        return
    table = Table(
        "model",
        "stable",
        "canary",
        "weight",
        "state",
        "p50 ms",
        "p99 ms",
        "errors",
        "rps",
        "drift",
        "alerts",
        title="deployments",
    )

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for m in doc["models"]:
        drift = fmt(m["drift_share"], ".0%") + (" [red]drift[/red]" if m["drift_detected"] else "")
        alerts = ", ".join(
            a["kind"] + (f"@{a['version']}" if a["version"] else "") for a in m["alerts"]
        )
        table.add_row(
            m["name"],
            m["stable"] or "-",
            m["canary"] or "-",
            f"{m['canary_weight']:.0%}" if m["canary"] else "-",
            m["state"],
            fmt(m["p50_ms"], ".1f"),
            fmt(m["p99_ms"], ".1f"),
            fmt(m["error_rate"], ".2%"),
            fmt(m["rps"], ".1f"),
            drift,
            f"[red]{alerts}[/red]" if alerts else "-",
        )
    out.print(table)
    for m in doc["models"]:
        for a in m["alerts"]:
            out.print(
                f"[red]alert[/red] {m['name']}"
                f"{'@' + a['version'] if a['version'] else ''} {a['kind']}: {a['message']}",
                highlight=False,
            )
    held = doc.get("reconciler")
    out.print(
        f"reconciler: {held['holder']}"
        if held
        else "reconciler: none (no `kiln serve` holds the lease)",
        highlight=False,
    )
    if not doc.get("gateway"):
        out.print(f"no gateway answers at {doc['gateway_url']}: live figures need `kiln serve`")


@app.command()
@handled
def serve(
    port: Annotated[
        int | None,
        typer.Option(help=f"Gateway port (default KILN_GATEWAY_PORT, {_DEFAULT_PORT})."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help=f"Bind address (default {_DEFAULT_HOST}).")
    ] = None,
    role: Annotated[
        ServeRole,
        typer.Option(
            help="all: route and contend for the reconciler lease (one machine); gateway: "
            "route only, by the acting reconciler's table; reconciler: contend for the lease "
            "and run engines, route nothing."
        ),
    ] = ServeRole.all,
) -> None:
    """Run the gateway and the supervisor that keeps engines matched to the deployments."""
    import logging

    from serving.gateway import serve as run_gateway

    settings = _settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    bind = host or settings.gateway_host
    err.print(
        f"kiln serve --role {role.value} on http://{bind}:"
        f"{settings.gateway_port if port is None else port} (registry {redact_url(settings.db_url)})",
        highlight=False,
    )
    run_gateway(settings, port=port, host=host, role=role.value)
