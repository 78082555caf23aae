"""Operations commands: drift reports, backup and restore, the demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kiln.cli._common import (
    DRIFT_EXIT_CODE,
    JsonOpt,
    _emit,
    _settings,
    app,
    handled,
    out,
)
from kiln.settings import DRIFT_MIN_SAMPLES, DRIFT_WINDOW_HOURS


@app.command()
@handled
def drift(
    name: Annotated[str, typer.Argument(help="The model whose recent traffic is judged.")],
    hours: Annotated[
        float, typer.Option(help="Window of logged requests, in hours.")
    ] = DRIFT_WINDOW_HOURS,
    min_samples: Annotated[
        int,
        typer.Option(
            help="Fewer valid logged rows than this: 'not enough data' (drift_detected null)."
        ),
    ] = DRIFT_MIN_SAMPLES,
    version: Annotated[
        str | None,
        typer.Option(
            help="Judge only this version's traffic, against its dataset (default: every "
            "version's traffic, against the stable version's dataset)."
        ),
    ] = None,
    exit_code: Annotated[
        bool,
        typer.Option(
            "--exit-code",
            help=f"Exit {DRIFT_EXIT_CODE} when drift is detected (0 for no drift or "
            "not enough data), for scripts and cron jobs, as `git diff "
            "--exit-code` does.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the monitor-drift flow now: the model's recent inputs against its reference dataset
    (Great Expectations, then Evidently); stores the HTML report and opens or resolves the
    drift alert."""
    from contextlib import redirect_stdout

    from kiln.errors import InvalidInput
    from kiln.monitor.drift import DriftSettings
    from kiln.registry import crud
    from kiln.registry.db import session_scope

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
        verdict = {
            True: "[red]drift[/red]",
            False: "[green]no drift[/green]",
            None: "[yellow]not enough data[/yellow]",
        }[doc["drift_detected"]]
        share = "-" if doc["drift_share"] is None else f"{doc['drift_share']:.3f}"
        out.print(
            f"[bold]{doc['model']}[/bold]: {verdict} (drift share {share}, "
            f"{doc['samples']} rows; {doc['reason']})",
            highlight=False,
        )
        for failure in doc["checks"]["failures"]:
            out.print(f"  - {failure}", highlight=False)
        if doc["report"]:
            out.print(f"report: {doc['report']}")
    if exit_code and doc["drift_detected"] is True:
        raise typer.Exit(DRIFT_EXIT_CODE)


@app.command("backup")
@handled
def backup_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A new or empty folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Snapshot the registry and the manifest of the artifacts it references."""
    from kiln.registry.backup import backup

    manifest = backup(_settings(), directory)
    doc = {
        "dir": str(directory),
        "database": manifest["database"],
        "artifacts": len(manifest["artifacts"]),
    }
    _emit(doc) if as_json else out.print(
        f"backed up the {doc['database']} registry and {doc['artifacts']} artifact pointers "
        f"to {directory}"
    )


@app.command("restore")
@handled
def restore_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A `kiln backup` folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup into an empty KILN_HOME, pulling artifacts from the DVC remote."""
    from kiln.registry.backup import restore

    doc = restore(_settings(), directory)
    _emit(doc) if as_json else out.print(
        f"restored the {doc['database']} registry and {doc['restored']} artifacts "
        f"(hashes checked) from {doc['remote']}"
    )


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
