"""Registry CRUD: keyword-only functions over a session.

They ``flush`` but never ``commit``: the caller owns the transaction, so an operation that writes
several rows (an upload: model, version, artifact, dataset) lands whole or not at all.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import semver
from sqlalchemy import insert, text
from sqlmodel import Session, SQLModel, col, delete, select

from kiln.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from kiln.faults import failpoint
from kiln.registry.tables import (
    TRANSITIONS,
    Alert,
    AlertState,
    ApiKey,
    Artifact,
    ArtifactKind,
    Dataset,
    Deployment,
    DeploymentEvent,
    DriftReport,
    InferenceRecord,
    Model,
    ModelVersion,
    OptimizationJob,
    Task,
    VersionStatus,
    utcnow,
)

RowT = TypeVar("RowT", bound=SQLModel)


# --- sessions
def detached(*, session: Session, row: RowT) -> RowT:
    """``row`` as the database has it now, read again and detached from ``session``, for a
    caller that hands it on after the session closes (an alert that goes out in an event)."""
    session.refresh(row)
    session.expunge(row)
    return row


# --- models
def create_model(
    *, session: Session, name: str, task: Task, settings: dict[str, Any] | None = None
) -> Model:
    if get_model(session=session, name=name) is not None:
        raise Conflict(f"model {name!r} already exists")
    model = Model(name=name, task=Task(task), settings=settings or {})
    session.add(model)
    session.flush()
    return model


def get_model(*, session: Session, name: str) -> Model | None:
    return session.exec(select(Model).where(Model.name == name)).first()


def require_model(*, session: Session, name: str) -> Model:
    model = get_model(session=session, name=name)
    if model is None:
        raise NotFound(f"no model named {name!r}: `kiln models` lists them")
    return model


def update_model_settings(*, session: Session, model: Model, settings: dict[str, Any]) -> Model:
    """Merge ``settings`` into the model's (gates, optimize, batching, replicas...)."""
    model.settings = {**model.settings, **settings}
    session.add(model)
    session.flush()
    return model


def list_models(*, session: Session) -> Sequence[Model]:
    return session.exec(select(Model).order_by(col(Model.name))).all()


# --- versions
def parse_version(version: str) -> semver.Version:
    try:
        return semver.Version.parse(version)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"version {version!r} is not semver: use MAJOR.MINOR.PATCH such as 0.1.0"
        ) from None


def list_versions(*, session: Session, model: Model) -> list[ModelVersion]:
    rows = session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id)).all()
    return sorted(rows, key=lambda v: parse_version(v.version))


def latest_version(*, session: Session, model: Model) -> ModelVersion | None:
    versions = list_versions(session=session, model=model)
    return versions[-1] if versions else None


def next_version(*, session: Session, model: Model | None) -> str:
    """The patch after the newest version, or 0.1.0 for a new model."""
    latest = latest_version(session=session, model=model) if model is not None else None
    return str(parse_version(latest.version).bump_patch()) if latest else "0.1.0"


def get_version(*, session: Session, model: Model, version: str) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).first()


def get_version_by_id(*, session: Session, version_id: int | None) -> ModelVersion | None:
    """The version whose primary key is ``version_id`` (a deployment's stable or canary, a run's
    version), or None for None or an unknown id; a row the session holds comes from its identity
    map, without a query."""
    return session.get(ModelVersion, version_id) if version_id is not None else None


def require_version(*, session: Session, name: str, version: str | None = None) -> ModelVersion:
    """``name`` at ``version``, or its newest version when ``version`` is None."""
    model = require_model(session=session, name=name)
    found = (
        latest_version(session=session, model=model)
        if version is None
        else get_version(session=session, model=model, version=version)
    )
    if found is None:
        raise NotFound(f"model {name!r} has no version {version or '(none yet)'}")
    return found


def create_version(
    *,
    session: Session,
    model: Model,
    version: str,
    source_format: str,
    source_sha256: str,
    spec: dict[str, Any],
    meta: dict[str, Any] | None = None,
    optimization_config: dict[str, Any] | None = None,
) -> ModelVersion:
    """A new version of ``model``; ``optimization_config`` records the optimize settings it is
    to be built with, when they are known up front (a re-optimization candidate's)."""
    parse_version(version)
    if get_version(session=session, model=model, version=version) is not None:
        raise Conflict(f"{model.name}@{version} already exists; versions are immutable")
    row = ModelVersion(
        model_id=model.id,  # type: ignore[arg-type]
        version=version,
        source_format=source_format,
        source_sha256=source_sha256,
        spec=spec,
        meta=meta or {},
        optimization_config=optimization_config or {},
    )
    session.add(row)
    session.flush()
    return row


def set_version_status(
    *, session: Session, version: ModelVersion, status: VersionStatus
) -> ModelVersion:
    """Move ``version`` along the lifecycle; any edge not in ``TRANSITIONS`` is IllegalTransition."""
    status = VersionStatus(status)
    current = VersionStatus(version.status)
    if status not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (terminal)"
        raise IllegalTransition(
            f"version {version.version} cannot go from {current} to {status}; allowed: {allowed}"
        )
    version.status = status
    session.add(version)
    session.flush()
    return version


# Versions that were never offered to traffic: the only ones delete_version removes.
NEVER_DEPLOYED = frozenset(
    {
        VersionStatus.uploaded,
        VersionStatus.optimizing,
        VersionStatus.validated,
        VersionStatus.rejected,
    }
)


def delete_version(*, session: Session, version: ModelVersion) -> list[str]:
    """Remove a version that is not and never was deployed, with its artifacts, jobs and own
    datasets; returns the store paths those rows named (the caller removes the files that no
    remaining row references, after the commit).

    Versions are immutable records, so this is only for undoing a version nothing ever saw (a
    re-optimization candidate that brought no improvement). A version that is or was served
    (canary, production, retired, rolled back), that a deployment row points to, that the
    deployment history names or that has inference records is refused with IllegalTransition.
    """
    model = session.get(Model, version.model_id)
    assert model is not None
    ref = f"{model.name}@{version.version}"
    if VersionStatus(version.status) not in NEVER_DEPLOYED:
        raise IllegalTransition(
            f"{ref} is {version.status}: only a version that was never "
            "deployed can be deleted (versions are immutable records)"
        )
    dep = get_deployment(session=session, model=model)
    if dep is not None:
        if version.id in (dep.stable_version_id, dep.canary_version_id):
            raise IllegalTransition(f"{ref} is referenced by {model.name}'s deployment")
        named = [
            e
            for e in list_deployment_events(session=session, deployment=dep)
            if (e.detail or {}).get("version") == version.version
            or (e.detail or {}).get("previous") == version.version
        ]
        if named:
            raise IllegalTransition(
                f"{ref} is named in {model.name}'s deployment history "
                f"({named[0].kind}): it cannot be deleted"
            )
    served = session.exec(
        select(InferenceRecord).where(
            InferenceRecord.model_name == model.name, InferenceRecord.version == version.version
        )
    ).first()
    if served is not None:
        raise IllegalTransition(f"{ref} has served requests: it cannot be deleted")
    paths: list[str] = []
    for job in list_jobs(session=session, version=version):
        session.delete(job)
    session.flush()  # jobs point at artifacts (result_artifact_id): they go first
    for artifact in list_artifacts(session=session, version=version):
        paths.append(artifact.path)
        session.delete(artifact)
    for dataset in session.exec(select(Dataset).where(Dataset.version_id == version.id)).all():
        paths.append(dataset.path)
        session.delete(dataset)
    session.flush()
    session.delete(version)
    session.flush()
    return paths


# --- artifacts
def add_artifact(
    *,
    session: Session,
    version: ModelVersion,
    kind: ArtifactKind,
    path: str,
    sha256: str,
    size: int,
    dvc_hash: str = "",
    backend: str = "torch-eager",
    precision: str = "fp32",
    selected: bool = False,
    built_on: str = "",
) -> Artifact:
    artifact = Artifact(
        version_id=version.id,  # type: ignore[arg-type]
        kind=ArtifactKind(kind),
        backend=backend,
        precision=precision,
        path=path,
        sha256=sha256,
        size=size,
        dvc_hash=dvc_hash,
        selected=selected,
        built_on=built_on,
    )
    session.add(artifact)
    session.flush()
    return artifact


def list_artifacts(*, session: Session, version: ModelVersion) -> Sequence[Artifact]:
    return session.exec(
        select(Artifact).where(Artifact.version_id == version.id).order_by(col(Artifact.id))
    ).all()


def mark_selected_artifact(
    *, session: Session, version: ModelVersion, path: str | None
) -> Sequence[Artifact]:
    """Mark the artifact ``version``'s engines serve: the one stored at ``path``, or the source
    artifact when ``path`` is None or empty (the baseline won and there is no export to serve);
    every other artifact of the version is unmarked. Returns the version's artifacts."""
    artifacts = list_artifacts(session=session, version=version)
    for artifact in artifacts:
        artifact.selected = artifact.path == path if path else artifact.kind == ArtifactKind.source
        session.add(artifact)
    session.flush()
    return artifacts


def all_artifacts(*, session: Session) -> Sequence[Artifact]:
    return session.exec(select(Artifact).order_by(col(Artifact.id))).all()


# --- datasets
def add_dataset(
    *,
    session: Session,
    model: Model,
    name: str,
    path: str,
    sha256: str,
    size: int,
    rows: int,
    check_passed: bool,
    check: dict[str, Any],
    version: ModelVersion | None = None,
    dvc_hash: str = "",
) -> Dataset:
    dataset = Dataset(
        model_id=model.id,  # type: ignore[arg-type]
        version_id=version.id if version else None,
        name=name,
        path=path,
        sha256=sha256,
        size=size,
        dvc_hash=dvc_hash,
        rows=rows,
        check_passed=check_passed,
        check=check,
    )
    session.add(dataset)
    session.flush()
    return dataset


def list_datasets(*, session: Session, model: Model) -> Sequence[Dataset]:
    return session.exec(
        select(Dataset).where(Dataset.model_id == model.id).order_by(col(Dataset.id))
    ).all()


def all_datasets(*, session: Session) -> Sequence[Dataset]:
    return session.exec(select(Dataset).order_by(col(Dataset.id))).all()


def dataset_for(*, session: Session, version: ModelVersion) -> Dataset | None:
    """The dataset that serves ``version``: its own, else the model's newest one that passed."""
    rows = session.exec(
        select(Dataset)
        .where(Dataset.model_id == version.model_id, col(Dataset.check_passed).is_(True))
        .order_by(col(Dataset.id).desc())
    ).all()
    own = [d for d in rows if d.version_id == version.id]
    return (
        own[0]
        if own
        else next(
            (d for d in rows if d.version_id is None or d.version_id < (version.id or 0)), None
        )
    )


# --- optimization jobs
def list_jobs(*, session: Session, version: ModelVersion) -> Sequence[OptimizationJob]:
    return session.exec(
        select(OptimizationJob)
        .where(OptimizationJob.version_id == version.id)
        .order_by(col(OptimizationJob.id))
    ).all()


def get_job(*, session: Session, job_id: int) -> OptimizationJob | None:
    """The job whose primary key is ``job_id`` (a run's parent job, a variant's own), or None."""
    return session.get(OptimizationJob, job_id)


def last_optimize_run(*, session: Session, version: ModelVersion) -> OptimizationJob | None:
    """The newest finished (``done``) optimize run of ``version``: its job's ``metrics`` hold
    the run's report (``kiln optimize --json``'s document)."""
    return session.exec(
        select(OptimizationJob)
        .where(
            OptimizationJob.version_id == version.id,
            OptimizationJob.optimization_type == "optimize",
            OptimizationJob.status == "done",
        )
        .order_by(col(OptimizationJob.id).desc())
    ).first()


def create_job(
    *, session: Session, version: ModelVersion, optimization_type: str
) -> OptimizationJob:
    job = OptimizationJob(version_id=version.id, optimization_type=optimization_type)  # type: ignore[arg-type]
    session.add(job)
    session.flush()
    return job


def update_job(*, session: Session, job: OptimizationJob, **changes: Any) -> OptimizationJob:
    for key, value in changes.items():
        setattr(job, key, value)
    job.updated_at = utcnow()
    session.add(job)
    session.flush()
    return job


# --- deployments: desired serving state (the supervisor reconciles engines to these rows)
def get_deployment(*, session: Session, model: Model) -> Deployment | None:
    return session.exec(select(Deployment).where(Deployment.model_id == model.id)).first()


def list_deployments(*, session: Session) -> Sequence[Deployment]:
    return session.exec(select(Deployment).order_by(col(Deployment.id))).all()


def deployment_fingerprint(*, session: Session) -> tuple[tuple[str, ...], ...]:
    """What the supervisor's desired state depends on, as one cheap query: every deployment row
    (versions, weight, shadow share, state, last change) with its model's settings, in id order,
    each value as text. Equal fingerprints mean nothing it reads changed, so its full read
    (:func:`served_versions`, specs, artifacts) runs only when this changes; the value is for
    comparison only. Plain SQL: the JSON settings are compared as stored, never parsed."""
    query = text(
        "SELECT d.id, d.stable_version_id, d.canary_version_id, d.canary_weight, "
        "d.shadow_share, d.state, d.updated_at, m.settings FROM deployment d "
        "JOIN model m ON m.id = d.model_id ORDER BY d.id"
    )
    rows = session.connection().execute(query).all()
    return tuple(tuple(str(v) for v in row) for row in rows)


@dataclass(frozen=True)
class DeployedModel:
    """A deployment with its model and the versions it serves (rows of the caller's session)."""

    model: Model
    deployment: Deployment
    stable: ModelVersion | None
    canary: ModelVersion | None


def served_versions(*, session: Session) -> list[DeployedModel]:
    """Every deployment with its model, stable and canary versions (one query per table)."""
    rows = []
    for dep in list_deployments(session=session):
        model = session.get(Model, dep.model_id)
        stable = session.get(ModelVersion, dep.stable_version_id) if dep.stable_version_id else None
        canary = session.get(ModelVersion, dep.canary_version_id) if dep.canary_version_id else None
        if model is not None:
            rows.append(DeployedModel(model=model, deployment=dep, stable=stable, canary=canary))
    return rows


def make_stable(
    *, session: Session, version: ModelVersion, reason: str = "direct deploy"
) -> Deployment:
    """Make ``version`` the model's stable version at once (no canary): the registry change
    behind the ``direct`` deploy strategy and a model's first version. The version becomes
    ``production``, the previous stable one ``retired``, and an event records the change.

    Only a ``validated`` version (or a ``retired`` one, brought back) may be deployed; the
    deployment row is locked for the change, so concurrent deploys serialise.
    """
    model = session.get(Model, version.model_id)
    assert model is not None
    dep = session.exec(
        select(Deployment).where(Deployment.model_id == model.id).with_for_update()
    ).first()
    if dep is None:
        dep = Deployment(model_id=model.id)  # type: ignore[arg-type]
        session.add(dep)
        session.flush()
    if dep.stable_version_id == version.id:
        return dep
    if VersionStatus(version.status) not in (VersionStatus.validated, VersionStatus.retired):
        raise IllegalTransition(
            f"{model.name}@{version.version} is {version.status}: only a validated version can be "
            f"deployed; run `kiln optimize {model.name}@{version.version}` first"
        )
    previous = session.get(ModelVersion, dep.stable_version_id) if dep.stable_version_id else None
    set_version_status(session=session, version=version, status=VersionStatus.production)
    failpoint("deploy.after_status")  # docs/reliability.md scenario 21: killed mid-transaction
    if previous is not None and VersionStatus(previous.status) == VersionStatus.production:
        set_version_status(session=session, version=previous, status=VersionStatus.retired)
    dep.stable_version_id = version.id
    dep.state = "stable"
    dep.updated_at = utcnow()
    session.add(dep)
    session.flush()
    add_deployment_event(
        session=session,
        deployment=dep,
        kind="deploy",
        reason=reason,
        detail={
            "version": version.version,
            "previous": previous.version if previous else None,
            "strategy": "direct",
        },
    )
    return dep


def _swap_deployment(
    *, session: Session, dep: Deployment, expect_canary: int | None, **values: Any
) -> None:
    """Compare-and-swap on the deployment row: apply ``values`` only if its canary is still
    ``expect_canary``. Two concurrent promotes (or a promote and a rollback) cannot both win,
    on SQLite and PostgreSQL alike: the loser's UPDATE matches no row and it gets Conflict."""
    from sqlalchemy import update

    result = session.execute(
        update(Deployment)
        .where(
            col(Deployment.id) == dep.id,
            col(Deployment.canary_version_id).is_(None)
            if expect_canary is None
            else col(Deployment.canary_version_id) == expect_canary,
        )
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(
            "the deployment changed while this change was being made (another "
            "promote or rollback won); check `kiln status` and retry"
        )
    session.refresh(dep)


def _require_deployment(*, session: Session, model: Model) -> Deployment:
    dep = get_deployment(session=session, model=model)
    if dep is None:
        raise NotFound(f"model {model.name!r} is not deployed: run `kiln deploy {model.name}`")
    return dep


def start_canary(
    *,
    session: Session,
    version: ModelVersion,
    weight: float,
    reason: str = "canary started",
    shadow_share: float = 0.0,
) -> Deployment:
    """Make ``version`` the canary at ``weight`` beside the stable version, with
    ``shadow_share`` of the stable's requests mirrored to it (answers discarded, compared)."""
    model = session.get(Model, version.model_id)
    assert model is not None
    dep = _require_deployment(session=session, model=model)
    if dep.stable_version_id is None:
        raise IllegalTransition(
            f"{model.name} has no stable version to canary against: deploy "
            "it with --strategy direct first"
        )
    if not 0.0 <= weight <= 1.0 or not 0.0 <= shadow_share <= 1.0:
        raise InvalidInput(
            f"canary weight and shadow share must be between 0 and 1, got "
            f"{weight} and {shadow_share}"
        )
    set_version_status(session=session, version=version, status=VersionStatus.canary)
    _swap_deployment(
        session=session,
        dep=dep,
        expect_canary=None,
        canary_version_id=version.id,
        canary_weight=weight,
        state="canary",
        shadow_share=shadow_share,
    )
    add_deployment_event(
        session=session,
        deployment=dep,
        kind="canary",
        reason=reason,
        detail={"version": version.version, "weight": weight, "shadow_share": shadow_share},
    )
    return dep


def set_canary_weight(
    *,
    session: Session,
    model: Model,
    weight: float,
    reason: str,
    detail: dict[str, Any] | None = None,
) -> Deployment:
    dep = _require_deployment(session=session, model=model)
    if dep.canary_version_id is None:
        raise Conflict(f"{model.name} has no canary")
    if not 0.0 <= weight <= 1.0:
        raise InvalidInput(f"canary weight must be between 0 and 1, got {weight}")
    _swap_deployment(
        session=session, dep=dep, expect_canary=dep.canary_version_id, canary_weight=weight
    )
    add_deployment_event(
        session=session,
        deployment=dep,
        kind="weight",
        reason=reason,
        detail={"weight": weight, **(detail or {})},
    )
    return dep


def promote(
    *,
    session: Session,
    model: Model,
    reason: str = "promoted",
    detail: dict[str, Any] | None = None,
) -> Deployment:
    """The canary becomes stable (production); the old stable version is retired."""
    dep = _require_deployment(session=session, model=model)
    if dep.canary_version_id is None:
        raise Conflict(f"{model.name} has no canary to promote")
    canary = session.get(ModelVersion, dep.canary_version_id)
    assert canary is not None
    return _replace_stable(
        session=session,
        dep=dep,
        new=canary,
        kind="promote",
        reason=reason,
        detail=detail,
        canary_version_id=None,
        canary_weight=0.0,
        shadow_share=0.0,
    )


def _replace_stable(
    *,
    session: Session,
    dep: Deployment,
    new: ModelVersion,
    kind: str,
    reason: str,
    detail: dict[str, Any] | None,
    **values: Any,
) -> Deployment:
    """``new`` becomes the production (stable) version, the current one retires, one event."""
    current = session.get(ModelVersion, dep.stable_version_id) if dep.stable_version_id else None
    _swap_deployment(
        session=session,
        dep=dep,
        expect_canary=dep.canary_version_id,
        stable_version_id=new.id,
        state="stable",
        **values,
    )
    # docs/reliability.md scenario 21 kills the process mid-transaction here ({promote,rollback}.after_swap)
    # and after the last write, before the caller commits ({promote,rollback}.after_event)
    failpoint(f"{kind}.after_swap")
    set_version_status(session=session, version=new, status=VersionStatus.production)
    if current is not None and VersionStatus(current.status) == VersionStatus.production:
        set_version_status(session=session, version=current, status=VersionStatus.retired)
    add_deployment_event(
        session=session,
        deployment=dep,
        kind=kind,
        reason=reason,
        detail={
            "version": new.version,
            "previous": current.version if current else None,
            **(detail or {}),
        },
    )
    failpoint(f"{kind}.after_event")
    return dep


def rollback(
    *,
    session: Session,
    model: Model,
    to_version: ModelVersion | None = None,
    reason: str = "rolled back",
    detail: dict[str, Any] | None = None,
) -> Deployment:
    """Undo: a canary is dropped at once (weight 0, ``rolled_back``); without a canary, the
    stable version is replaced by ``to_version`` (an earlier production version, now
    ``retired``) or by the newest retired one."""
    dep = _require_deployment(session=session, model=model)
    if dep.canary_version_id is not None and to_version is None:
        canary = session.get(ModelVersion, dep.canary_version_id)
        assert canary is not None
        _swap_deployment(
            session=session,
            dep=dep,
            expect_canary=canary.id,
            canary_version_id=None,
            canary_weight=0.0,
            shadow_share=0.0,
            state="stable",
        )
        failpoint(
            "canary_rollback.after_swap"
        )  # docs/reliability.md scenario 21: killed mid-transaction
        set_version_status(session=session, version=canary, status=VersionStatus.rolled_back)
        add_deployment_event(
            session=session,
            deployment=dep,
            kind="rollback",
            reason=reason,
            detail={"version": canary.version, **(detail or {})},
        )
        return dep
    if to_version is None:
        retired = [
            v
            for v in list_versions(session=session, model=model)
            if VersionStatus(v.status) == VersionStatus.retired
        ]
        if not retired:
            raise Conflict(
                f"{model.name} has no canary and no earlier production version to roll back to"
            )
        to_version = retired[-1]
    if VersionStatus(to_version.status) != VersionStatus.retired:
        raise IllegalTransition(
            f"{model.name}@{to_version.version} is {to_version.status}: "
            "rollback goes to an earlier production (retired) version"
        )
    return _replace_stable(
        session=session, dep=dep, new=to_version, kind="rollback", reason=reason, detail=detail
    )


def add_deployment_event(
    *,
    session: Session,
    deployment: Deployment,
    kind: str,
    reason: str,
    detail: dict[str, Any] | None = None,
) -> DeploymentEvent:
    row = DeploymentEvent(
        deployment_id=deployment.id,  # type: ignore[arg-type]
        kind=kind,
        reason=reason,
        detail=detail or {},
    )
    session.add(row)
    session.flush()
    return row


def list_deployment_events(
    *, session: Session, deployment: Deployment
) -> Sequence[DeploymentEvent]:
    return session.exec(
        select(DeploymentEvent)
        .where(DeploymentEvent.deployment_id == deployment.id)
        .order_by(col(DeploymentEvent.id))
    ).all()


# --- API keys: only the sha256 is stored; the plaintext is returned once.
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    """A new API key: the secret itself (shown once, never stored) and its row (the hash)."""

    key: str
    row: ApiKey


def create_api_key(
    *,
    session: Session,
    scopes: list[str],
    models: list[str] | None = None,
    rate_per_second: float | None = None,
) -> IssuedKey:
    unknown = set(scopes) - {"infer", "deploy", "admin"}
    if not scopes or unknown:
        raise InvalidInput("scope must be one or more of infer, deploy, admin")
    prefix = "kiln_" + secrets.token_hex(4)
    key = f"{prefix}.{secrets.token_urlsafe(32)}"
    row = ApiKey(
        prefix=prefix,
        key_hash=hash_key(key),
        scopes=sorted(set(scopes)),
        models=models,
        rate_per_second=rate_per_second,
    )
    session.add(row)
    session.flush()
    return IssuedKey(key=key, row=row)


def find_api_key(*, session: Session, key: str) -> ApiKey | None:
    """The live key matching ``key``; revoked and unknown keys both give None."""
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    return row if row is not None and not row.revoked else None


def list_api_keys(*, session: Session) -> Sequence[ApiKey]:
    """Every key, newest first (``kiln keys list``)."""
    return session.exec(select(ApiKey).order_by(col(ApiKey.id).desc())).all()


def revoke_api_key(*, session: Session, prefix: str) -> ApiKey:
    row = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None:
        raise NotFound(f"no key with prefix {prefix!r}")
    row.revoked = True
    session.add(row)
    session.flush()
    return row


# --- inference log: sampled requests as served (the gateway writes them in batches)
def add_inference_records(*, session: Session, records: Sequence[InferenceRecord]) -> int:
    session.add_all(records)
    session.flush()
    return len(records)


def insert_inference_rows(*, session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """The gateway writer's bulk path: plain column dicts in one executemany on the session's
    connection (Core: about a third of the CPU of the ORM's bulk insert; JSON columns through
    the registry's orjson serializer, :func:`kiln.registry.db.json_serializer`)."""
    if rows:
        # sqlmodel's stubs omit the SQLAlchemy-declared __table__ of a table=True model
        table = InferenceRecord.__table__  # type: ignore[attr-defined]
        session.connection().execute(insert(table), list(rows))
    return len(rows)


def recent_inferences(
    *,
    session: Session,
    model: str,
    since: datetime | None = None,
    version: str | None = None,
    status: int | None = 200,
    limit: int | None = None,
) -> Sequence[InferenceRecord]:
    """The model's logged requests, newest first (``status`` None: every status)."""
    query = select(InferenceRecord).where(InferenceRecord.model_name == model)
    if since is not None:
        query = query.where(InferenceRecord.timestamp >= since)
    if version is not None:
        query = query.where(InferenceRecord.version == version)
    if status is not None:
        query = query.where(InferenceRecord.status == status)
    query = query.order_by(col(InferenceRecord.timestamp).desc(), col(InferenceRecord.id).desc())
    if limit is not None:
        query = query.limit(limit)
    return session.exec(query).all()


def purge_inferences(*, session: Session, older_than: datetime) -> int:
    """Retention: delete records logged before ``older_than``; how many went."""
    result = session.execute(
        delete(InferenceRecord)
        .where(col(InferenceRecord.timestamp) < older_than)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# --- alerts: at most one open alert per (model, version, kind)
def open_alerts(*, session: Session, model: str | None = None) -> Sequence[Alert]:
    query = select(Alert).where(Alert.state == AlertState.open)
    if model is not None:
        query = query.where(Alert.model_name == model)
    return session.exec(query.order_by(col(Alert.id))).all()


def list_alerts(*, session: Session, model: str | None = None, limit: int = 100) -> Sequence[Alert]:
    """Open and resolved alerts, newest first."""
    query = select(Alert)
    if model is not None:
        query = query.where(Alert.model_name == model)
    return session.exec(query.order_by(col(Alert.id).desc()).limit(limit)).all()


def find_open_alert(
    *, session: Session, model: str, kind: str, version: str | None = None
) -> Alert | None:
    return session.exec(
        select(Alert).where(
            Alert.model_name == model,
            Alert.kind == kind,
            Alert.version == version,
            Alert.state == AlertState.open,
        )
    ).first()


@dataclass(frozen=True)
class RaisedAlert:
    """An open alert, and whether raising it opened it (False: an open one was refreshed)."""

    alert: Alert
    opened: bool


def raise_alert(
    *,
    session: Session,
    model: str,
    kind: str,
    message: str,
    version: str | None = None,
    value: float | None = None,
    threshold: float | None = None,
    detail: dict[str, Any] | None = None,
) -> RaisedAlert:
    """Open the alert, or refresh the open one's figures."""
    row = find_open_alert(session=session, model=model, kind=kind, version=version)
    opened = row is None
    if row is None:
        row = Alert(model_name=model, version=version, kind=kind)
    row.message, row.value, row.threshold = message, value, threshold
    row.detail = detail or {}
    session.add(row)
    session.flush()
    return RaisedAlert(alert=row, opened=opened)


def resolve_alert(*, session: Session, alert: Alert, detail: dict[str, Any] | None = None) -> Alert:
    if alert.state != AlertState.resolved:
        alert.state = AlertState.resolved
        alert.resolved_at = utcnow()
        if detail:
            alert.detail = {**(alert.detail or {}), **detail}
        session.add(alert)
        session.flush()
    return alert


# --- drift reports
def add_drift_report(*, session: Session, report: DriftReport) -> DriftReport:
    session.add(report)
    session.flush()
    return report


def stored_paths(*, session: Session) -> set[str]:
    """Every store path a registry row references (artifacts, datasets, drift reports): what
    the store's sweep keeps."""
    paths = {a.path for a in all_artifacts(session=session)}
    paths |= {d.path for d in all_datasets(session=session)}
    paths |= {p for p in session.exec(select(DriftReport.report_path)).all() if p}
    return paths


def latest_drift_report(*, session: Session, model: str) -> DriftReport | None:
    return session.exec(
        select(DriftReport)
        .where(DriftReport.model_name == model)
        .order_by(col(DriftReport.id).desc())
    ).first()
