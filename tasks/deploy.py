"""Prefect tasks of the deploy flow: where a version stands, the champion/challenger gate, and
the registry writes that move traffic (each one a compare-and-swap in ``kiln.registry.crud``, so a
re-run or a concurrent ``kiln promote`` cannot apply a change twice).

State lives in the registry, not in the flow: a crashed run is re-run with the same arguments
and carries on from the version's status and the deployment's canary weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from kiln.errors import IllegalTransition
from kiln.gate import within
from kiln.registry import crud
from kiln.registry.db import session_scope
from kiln.registry.tables import Task, VersionStatus
from kiln.rollout.canary import RolloutSettings
from kiln.rollout.replay import REPLAY_LIMIT
from kiln.settings import get_settings

if TYPE_CHECKING:
    from kiln.spec import ModelSpec


@dataclass(frozen=True)
class Standing:
    """A version and its model's deployment, as the registry has them now."""

    model: str
    version: str
    status: str
    task: str
    stable: str | None
    canary: str | None
    canary_weight: float
    model_settings: dict[str, Any]


@task(name="read-standing", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def standing(name: str, version: str | None) -> Standing:
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        model = crud.require_model(session=session, name=name)
        dep = crud.get_deployment(session=session, model=model)
        stable = canary = None
        if dep is not None and dep.stable_version_id is not None:
            stable = crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
        if dep is not None and dep.canary_version_id is not None:
            canary = crud.get_version_by_id(session=session, version_id=dep.canary_version_id)
        return Standing(
            model=name,
            version=row.version,
            status=str(row.status),
            task=str(model.task),
            stable=stable.version if stable else None,
            canary=canary.version if canary else None,
            canary_weight=dep.canary_weight if dep else 0.0,
            model_settings=dict(model.settings or {}),
        )


@task(name="champion-challenger-gate", retries=0, cache_policy=NO_CACHE)
def champion_gate(st: Standing, rollout: RolloutSettings) -> dict[str, Any]:
    """The candidate's metric on the registered validation dataset against the production
    version's, both through their selected (served) artifacts; worse by more than
    ``champion_max_drop`` fails (MLflow's ``MetricThreshold`` against a baseline model).

    Accuracy for classification, negative RMSE for regression. With no labels (or for
    embeddings) there is no "worse" to measure: the gate records how far the candidate's
    answers agree with the champion's and passes; the canary's shadow comparison judges next.
    """
    from kiln.intake.datasets import load_dataset
    from kiln.optimize.validate import quality
    from kiln.store.artifacts import ArtifactStore, ObjectRef
    from serving.loader import load_version

    result: dict[str, Any] = {
        "candidate": st.version,
        "champion": st.stable,
        "max_drop": rollout.champion_max_drop,
    }
    if st.stable is None or st.stable == st.version:
        return {**result, "passed": True, "reason": "no production version to compare with"}
    settings = get_settings()
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        dataset = crud.dataset_for(session=session, version=row)
        data_ref = (ObjectRef.of(dataset), dataset.name) if dataset else None
    if data_ref is None:
        return {
            **result,
            "passed": True,
            "reason": "no registered dataset: nothing to compare the versions on",
        }
    store = ArtifactStore.of(settings)
    data = load_dataset(store.fetch(data_ref[0]))
    outputs = {}
    for version in (st.stable, st.version):
        loaded = load_version(settings, st.model, version)
        name = loaded.spec.served_inputs()[0].name
        parts = []
        for start in range(0, len(data.inputs), 256):
            out = loaded({name: data.inputs[start : start + 256]})
            parts.append(next(iter(out.values())))
        outputs[version] = np.concatenate(parts)
    task_kind = Task(st.task)
    labels = data.labels
    result["dataset"] = data_ref[1]
    result["rows"] = len(data.inputs)
    if labels is None or task_kind is Task.embedding:
        agreement = quality(task_kind, outputs[st.version], outputs[st.stable], None)
        result.update(
            passed=True,
            agreement=agreement.metric,
            reason=f"no labels to rank the versions ({task_kind.value}): the "
            f"candidate agrees with {st.stable} at {agreement.metric:.4f}",
        )
        return result
    champion = quality(task_kind, outputs[st.stable], outputs[st.stable], labels).metric
    candidate = quality(task_kind, outputs[st.version], outputs[st.version], labels).metric
    drop = champion - candidate
    metric = "accuracy" if task_kind is Task.classification else "negative RMSE"
    result.update(
        metric=metric,
        champion_metric=round(champion, 6),
        candidate_metric=round(candidate, 6),
        drop=round(drop, 6),
        passed=within(drop, rollout.champion_max_drop),
    )
    verb = "is not worse than" if result["passed"] else "is worse than"
    result["reason"] = (
        f"{st.model}@{st.version} {verb} production {st.stable} on "
        f"{data_ref[1]}: {metric} {candidate:.4f} against {champion:.4f} "
        f"(drop {drop:+.4f}, allowed {rollout.champion_max_drop:g})"
    )
    return result


@task(name="reject-version", retries=0, cache_policy=NO_CACHE)
def reject(st: Standing, reason: str, gate: dict[str, Any]) -> None:
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        crud.set_version_status(session=session, version=row, status=VersionStatus.rejected)
        model = crud.require_model(session=session, name=st.model)
        dep = crud.get_deployment(session=session, model=model)
        if dep is not None:
            crud.add_deployment_event(
                session=session,
                deployment=dep,
                kind="rejected",
                reason=reason,
                detail={"version": st.version, **gate},
            )


@task(name="check-artifacts-pullable", retries=0, cache_policy=NO_CACHE)
def check_pullable(st: Standing) -> None:
    """The DVC remote holds what ``st.version`` serves (every serving host pulls it from
    there), or the deploy stops here, before it changes anything."""
    from kiln.rollout.commands import require_pullable

    require_pullable(get_settings(), name=st.model, version=st.version)


@task(name="deploy-direct", retries=0, cache_policy=NO_CACHE)
def deploy_direct(st: Standing, reason: str) -> None:
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        crud.make_stable(session=session, version=row, reason=reason)


@task(name="start-canary", retries=0, cache_policy=NO_CACHE)
def start_canary(st: Standing, shadow_share: float) -> None:
    """The candidate becomes the canary at weight 0 (its engine starts and warms up, shadowed
    traffic only); a canary already there (a re-run) is left as it is."""
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        if VersionStatus(row.status) == VersionStatus.canary:
            return
        crud.start_canary(
            session=session,
            version=row,
            weight=0.0,
            shadow_share=shadow_share,
            reason="canary started by deploy-model",
        )


@task(name="set-canary-weight", retries=0, cache_policy=NO_CACHE)
def set_weight(st: Standing, weight: float, reason: str, detail: dict[str, Any]) -> None:
    with session_scope(get_settings().db_url) as session:
        model = crud.require_model(session=session, name=st.model)
        crud.set_canary_weight(
            session=session, model=model, weight=weight, reason=reason, detail=detail
        )


@task(name="promote", retries=0, cache_policy=NO_CACHE)
def promote(st: Standing, reason: str, detail: dict[str, Any]) -> None:
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        if VersionStatus(row.status) == VersionStatus.production:
            return  # a re-run after the promote landed
        model = crud.require_model(session=session, name=st.model)
        crud.promote(session=session, model=model, reason=reason, detail=detail)


@task(name="roll-back", retries=0, cache_policy=NO_CACHE)
def roll_back(st: Standing, reason: str, detail: dict[str, Any]) -> None:
    with session_scope(get_settings().db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        if VersionStatus(row.status) != VersionStatus.canary:
            raise IllegalTransition(f"{st.model}@{st.version} is {row.status}, not the canary")
        model = crud.require_model(session=session, name=st.model)
        crud.rollback(session=session, model=model, reason=reason, detail=detail)


@task(name="replay-inputs", retries=0, cache_policy=NO_CACHE)
def replay_inputs(st: Standing, limit: int = REPLAY_LIMIT) -> list[bytes]:
    """Request bodies for replayed traffic, one request each: with ``replay_source: log`` (the
    default) the stable version's recent logged requests (the inference log), else, or when
    fewer than ``replay_min_logged`` are logged, the candidate's validation dataset rows; the
    choice is logged and printed with the flow's output."""
    from kiln.rollout.replay import logged_bodies
    from kiln.spec import ModelSpec

    rollout = RolloutSettings.for_model(st.model_settings)
    settings = get_settings()
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        spec = ModelSpec.model_validate(row.spec)
        logged: list[dict[str, Any]] = []
        if rollout.replay_source == "log" and st.stable is not None:
            logged = [
                r.input
                for r in crud.recent_inferences(
                    session=session, model=st.model, version=st.stable, status=200, limit=limit
                )
            ]
    bodies = logged_bodies(spec, logged, limit) if logged else []
    if rollout.replay_source == "log" and len(bodies) >= min(rollout.replay_min_logged, limit):
        _say(f"replaying {len(bodies)} logged requests of {st.model}@{st.stable} to the canary")
        return bodies
    dataset_bodies = _dataset_bodies(st, spec, limit)
    if rollout.replay_source == "log":
        _say(
            f"replaying the validation dataset to the canary: {len(bodies)} usable logged "
            f"requests of {st.model}@{st.stable}, fewer than replay_min_logged "
            f"({rollout.replay_min_logged})"
        )
    return dataset_bodies


def _dataset_bodies(st: Standing, spec: ModelSpec, limit: int) -> list[bytes]:
    """The candidate's validation dataset, one row per request (sample inputs without one)."""
    from kiln.intake.datasets import load_dataset
    from kiln.rollout.replay import replay_bodies
    from kiln.store.artifacts import ArtifactStore, ObjectRef

    settings = get_settings()
    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=st.model, version=st.version)
        dataset = crud.dataset_for(session=session, version=row)
        ref = ObjectRef.of(dataset) if dataset else None
    if ref is None:
        from kiln.intake.probe import SAMPLE_DYNAMIC, SAMPLE_ROWS, sample_inputs

        tensors = sample_inputs(spec.inputs, batch=SAMPLE_ROWS, dynamic=SAMPLE_DYNAMIC)
        return replay_bodies(spec, [t.numpy() for t in tensors], limit)
    store = ArtifactStore.of(settings)
    data = load_dataset(store.fetch(ref))
    return replay_bodies(spec, data.inputs, limit)


def _say(message: str) -> None:
    """To the flow run's log (Prefect) and its printed output; the module log outside a run."""
    print(message)
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # called outside a flow run (tests call the plain function)
        logging.getLogger("kiln.deploy").info(message)
