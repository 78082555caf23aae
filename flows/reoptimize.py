"""Prefect flow ``reoptimize`` (nightly, ``prefect.yaml``): re-optimize what is served.

For each model with a production (stable) version, or just ``model``:

1. register a new patch version with the production version's source (the stored source
   artifact, reused) and metadata ``reoptimized_from`` (``kiln.optimize.reoptimize``); the model's
   registered dataset serves it as it serves every later version;
2. ``optimize-model`` on it, with the model's current settings and this host's toolchain;
3. compare its selected variant with the production version's at the serving batch: p50
   latency (and throughput) and the metric, against the model's accuracy gate;
4. at least ``min_speedup`` times faster at equal quality: ``deploy-model`` takes it the
   normal way (champion/challenger gate, canary, promote or roll back); otherwise "no
   improvement", and the candidate is removed again completely (rows and stored objects), so
   the registry is exactly as before the run.

Versions are never mutated (docs/architecture.md, data model). A model with a canary in flight, or with no gateway
to canary through, is skipped before anything is written; a step that fails removes a
candidate that never reached traffic and reports the error, and the other models carry on.
"""

from __future__ import annotations

from typing import Any, cast

import httpx
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from kiln.errors import KilnError
from kiln.optimize import reoptimize as core
from kiln.rollout.client import gateway_url
from kiln.settings import get_settings
from tasks import deploy as deploy_tasks
from tasks import reoptimize as t

OUTCOMES = ("promoted", "rolled_back", "rejected", "no improvement", "skipped", "error")


@flow(name="reoptimize", log_prints=True)
def reoptimize(
    model: str | None = None, min_speedup: float = 1.1, step_seconds: float | None = None
) -> dict[str, Any]:
    """Re-optimize the production version of every model (or ``model``).

    Returns ``{"models": [{"model", "production", "candidate", "speedup", "outcome",
    "reason"}]}``; ``outcome`` is deploy-model's (``promoted`` | ``rolled_back`` |
    ``rejected``), ``no improvement`` (nothing changed), or ``skipped`` / ``error`` (nothing
    was deployed; see ``reason``). ``speedup`` is production's p50 latency over the
    candidate's at the serving batch.
    """
    if min_speedup <= 0:
        raise ValueError(f"min_speedup must be positive, got {min_speedup}")
    rows = [_one(production, min_speedup, step_seconds) for production in t.productions(model)]
    result = {"models": rows}
    _report(result, min_speedup)
    return result


def _one(
    production: core.Production, min_speedup: float, step_seconds: float | None
) -> dict[str, Any]:
    from flows.deploy import deploy_model
    from flows.optimize import optimize_model

    name = production.model
    row: dict[str, Any] = {
        "model": name,
        "production": production.version,
        "candidate": None,
        "speedup": None,
    }
    if production.canary is not None:
        return _done(
            row,
            "skipped",
            f"{name} has a canary in flight ({production.canary}): promote or roll it back first",
        )
    if (problem := _gateway_problem()) is not None:
        return _done(row, "skipped", problem)
    candidate = t.register_candidate(production)
    row["candidate"] = candidate
    print(f"{name}: re-optimizing production {production.version} as {candidate}")
    try:
        optimized = optimize_model(name, candidate)
        if optimized.get("status") != "validated":
            removed = t.discard_candidate(name, candidate)
            return _done(
                row,
                "rejected",
                f"optimize rejected {name}@{candidate} "
                f"({optimized.get('reason')}); removed it again",
                removed=removed,
            )
        st = deploy_tasks.standing(name, candidate)
        verdict = t.compare(
            st.task,
            st.model_settings,
            t.optimize_report(name, production.version),
            # validated just now, so its report is written (compare indexes it)
            cast(dict[str, Any], t.optimize_report(name, candidate)),
            min_speedup,
        )
        row.update(speedup=verdict["speedup"], comparison=verdict)
        if not verdict["better"]:
            removed = t.discard_candidate(name, candidate)
            return _done(
                row,
                "no improvement",
                f"{verdict['reason']}; {name}@{candidate} removed again, nothing changed",
                removed=removed,
            )
        print(f"{name}@{candidate}: {verdict['reason']}; deploying it")
        deployed = deploy_model(name, candidate, step_seconds=step_seconds)
    except Exception as exc:
        return _done(row, "error", f"{type(exc).__name__}: {exc}"[:500] + _cleanup(name, candidate))
    except BaseException:  # interrupted: leave nothing half-made behind, then stop
        _cleanup(name, candidate)
        raise
    row["deploy"] = {k: deployed.get(k) for k in ("strategy", "gate", "steps")}
    return _done(row, deployed["outcome"], deployed["reason"])


def _cleanup(name: str, candidate: str) -> str:
    """Remove a candidate that never reached traffic after a failure; says what happened."""
    try:
        if core.still_candidate(get_settings(), name, candidate):
            core.discard_candidate(get_settings(), name, candidate)
            return f"; {name}@{candidate} removed again"
    except KilnError as exc:
        return f"; {name}@{candidate} left in the registry ({exc})"
    return f"; {name}@{candidate} stays (it reached the deploy path: see `kiln show`)"


def _gateway_problem() -> str | None:
    """None when a gateway answers (the canary needs one), else why the model is skipped."""
    url = gateway_url(get_settings())
    try:
        httpx.get(url + "/v2/health/live", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        return (
            f"no gateway answers at {url} ({type(exc).__name__}): a better candidate "
            "would need a canary; start `kiln serve` (nothing was changed)"
        )
    return None


def _done(row: dict[str, Any], outcome: str, reason: str, **extra: Any) -> dict[str, Any]:
    assert outcome in OUTCOMES, outcome
    print(f"{row['model']}: {outcome} ({reason})")
    return {**row, "outcome": outcome, "reason": reason, **extra}


def _report(result: dict[str, Any], min_speedup: float) -> None:
    lines = [
        "# reoptimize",
        "",
        f"Candidates need {min_speedup:g}x at equal quality.",
        "",
        "| model | production | candidate | speedup | outcome | reason |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        speed = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(
            f"| {row['model']} | {row['production']} | {row['candidate'] or '-'} | "
            f"{speed} | {row['outcome']} | {row['reason']} |"
        )
    if not result["models"]:
        lines.append("| - | - | - | - | - | no model has a production version |")
    try:
        create_markdown_artifact(
            markdown="\n".join(lines),
            key="reoptimize",
            description=f"{len(result['models'])} model(s)",
        )
    except Exception:  # outside a flow run: printing is enough
        pass
