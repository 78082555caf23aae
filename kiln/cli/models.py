"""Commands over the registry's models and versions: upload, list, show, optimize."""

from __future__ import annotations

from typing import Annotated, Any, cast

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
from kiln.settings import Settings


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
    from kiln.intake.upload import upload as do_upload

    result = do_upload(
        settings=_settings(), name=name, source=source, version=version, dataset=dataset, task=task
    )
    if as_json:
        _emit(
            {
                "name": result.name,
                "version": result.version,
                "sha256": result.sha256,
                "status": str(result.status),
                "created": result.created,
                "dataset": result.dataset.model_dump() if result.dataset else None,
            }
        )
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
    from kiln.registry.views import list_models_view

    doc = list_models_view(_settings())
    if as_json:
        _emit(doc)
        return
    table = Table("model", "task", "version", "status", "sha256")
    for model in doc["models"]:
        for v in model["versions"]:
            table.add_row(model["name"], model["task"], v["version"], v["status"], v["sha256"][:16])
    out.print(table)


@app.command()
@handled
def show(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Default: newest.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one version: status, spec, artifacts, datasets and jobs."""
    from kiln.registry.views import show_version_view

    target = _split_ref(ref)
    name, version = target.name, target.version
    doc = show_version_view(_settings(), name=name, version=version)
    if as_json:
        _emit(doc)
        return
    out.print(
        f"[bold]{doc['name']}@{doc['version']}[/bold]  status {doc['status']}  task {doc['task']}"
    )
    for io in ("inputs", "outputs"):
        for t in doc["spec"].get(io, []):
            out.print(f"  {io[:-1]} {t['name']}: {t['datatype']} {t['shape']}")
    table = Table("kind", "backend", "precision", "sha256", "size", "selected", "path")
    for a in doc["artifacts"]:
        table.add_row(
            a["kind"],
            a["backend"],
            a["precision"],
            a["sha256"][:16],
            str(a["size"]),
            "yes" if a["selected"] else "",
            a["path"],
        )
    out.print(table)
    for d in doc["datasets"]:
        out.print(
            f"  dataset {d['name']} ({d['rows']} rows): "
            f"{'passed' if d['check_passed'] else 'failed'}"
        )


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
    table = Table(
        "backend",
        "precision",
        "metric",
        "drop",
        "p50 b1 ms",
        "p50 b32 ms",
        "speedup",
        "size",
        "passed",
        title=f"{ref}: variants",
    )
    for v in [doc["baseline"], *doc["variants"]]:
        lat = v["latency_ms"]
        table.add_row(
            v["backend"],
            v["precision"],
            f"{v['metric']:.4f}",
            f"{v['metric_drop']:+.4f}",
            f"{lat.get('1', {}).get('p50', float('nan')):.3f}",
            f"{lat.get('32', {}).get('p50', float('nan')):.3f}",
            f"{v.get('speedup') or 1.0:.2f}x",
            str(v["size_bytes"]),
            "[green]yes[/green]" if v["passed"] else "[red]no[/red]",
        )
    out.print(table)
    out.print(
        f"selected [bold]{doc['selected']['backend']}/{doc['selected']['precision']}"
        f"[/bold]: {doc['reason']}",
        highlight=False,
    )
    for note in doc.get("skipped", []):
        out.print(f"  note: {note}", highlight=False)
    out.print(f"chart: {doc['chart']}")


def _run_with_progress(settings: Settings, ref: str) -> dict[str, Any]:
    """Run the optimize flow in a thread; draw its progress from the registry's job rows."""
    import threading

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.optimize import optimize_model
    from kiln.registry.views import job_progress

    target = _split_ref(ref)
    name, version = target.name, target.version
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["doc"] = optimize_model(name=name, version=version)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[jobs]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(f"optimizing {ref}", total=100, jobs="")
        while thread.is_alive():
            thread.join(timeout=0.5)
            progress = job_progress(settings, name=name, version=version)
            bar.update(task, completed=progress.percent, jobs=progress.running)
    if "error" in result:
        raise result["error"]
    return cast(dict[str, Any], result["doc"])
