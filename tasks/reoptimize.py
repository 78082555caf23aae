"""Prefect tasks of the reoptimize flow: thin wrappers over ``kiln.optimize.reoptimize``.

Not retried and not cached: each one writes (or reads) the registry, which is the record.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.optimize import reoptimize as core
from kiln.settings import get_settings


@task(name="find-production-versions", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def productions(model: str | None) -> list[core.Production]:
    return core.productions(get_settings(), model)


@task(name="register-candidate", retries=0, cache_policy=NO_CACHE)
def register_candidate(production: core.Production) -> str:
    return core.register_candidate(get_settings(), production)


@task(name="read-optimize-report", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def optimize_report(model: str, version: str) -> dict[str, Any] | None:
    return core.optimize_report(get_settings(), model, version)


@task(name="compare-with-production", retries=0, cache_policy=NO_CACHE)
def compare(
    task_kind: str,
    model_settings: dict[str, Any],
    production: dict[str, Any] | None,
    candidate: dict[str, Any],
    min_speedup: float,
) -> dict[str, Any]:
    return core.compare(
        task=task_kind,
        model_settings=model_settings,
        production=production,
        candidate=candidate,
        min_speedup=min_speedup,
    )


@task(name="discard-candidate", retries=0, cache_policy=NO_CACHE)
def discard_candidate(model: str, version: str) -> list[str]:
    return core.discard_candidate(get_settings(), model, version)
