"""Prefect flow ``deploy-model``: (upload) -> optimize -> champion/challenger gate -> canary
(weight steps with guardrails) -> promote, or roll back.

The flow only writes desired state (docs/architecture.md, control plane): the canary's weight, promote,
roll back. ``kiln serve``'s supervisor starts, warms and drains the engines, and the gateway
routes by the same rows and keeps the per-version figures each step is judged on. The first
deploy of a model has nothing to canary against and goes straight to production after the
gates; later ones canary, unless ``strategy="direct"``.

Re-running the flow for the same version is safe: a version in production reports
``promoted``, a rejected or rolled-back one reports that (rolled-back versions are tried
again only when asked with ``strategy``), and a canary left behind by a crashed run resumes
at its weight.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from kiln.errors import ExternalToolError
from kiln.registry.tables import VersionStatus
from kiln.rollout.canary import RolloutSettings, StepResult, observe_step
from kiln.rollout.client import GatewayClient, gateway_url, wait_until_served, wait_version_ready
from kiln.rollout.replay import Replayer
from kiln.settings import get_settings
from tasks import deploy as t
from tasks.upload import upload_model


@flow(name="deploy-model", log_prints=True)
def deploy_model(
    model: str,
    version: str | None = None,
    source: str | None = None,
    dataset: str | None = None,
    strategy: str | None = None,
    canary_steps: list[float] | None = None,
    step_seconds: float | None = None,
) -> dict[str, Any]:
    """Take ``model@version`` (or a new ``source``) to production, safely.

    Returns ``{"model", "version", "outcome": "promoted" | "rolled_back" | "rejected",
    "reason", "strategy", "gate", "steps"}`` (``kiln deploy --json``).
    """
    if strategy not in (None, "direct", "canary"):
        raise ValueError(f"strategy must be direct or canary, got {strategy!r}")
    if source is not None:
        uploaded = upload_model(model, source, version=version, dataset=dataset)
        version = uploaded["version"]
    st = t.standing(model, version)
    result: dict[str, Any] = {
        "model": model,
        "version": st.version,
        "strategy": strategy,
        "gate": None,
        "steps": [],
    }
    done = _settled(st)
    if done is not None and not (strategy and st.status == VersionStatus.rolled_back):
        return _report({**result, **done})

    if st.status in (VersionStatus.uploaded, VersionStatus.optimizing):
        from flows.optimize import optimize_model

        optimized = optimize_model(model, st.version)
        if optimized.get("status") == "rejected":
            return _report(
                {
                    **result,
                    "outcome": "rejected",
                    "reason": f"optimization rejected it: {optimized.get('reason')}",
                }
            )
        st = t.standing(model, st.version)
    rollout = RolloutSettings.for_model(
        st.model_settings, steps=canary_steps, step_seconds=step_seconds
    )
    t.check_pullable(st)  # the remote holds what every serving host will pull, or stop here
    if st.status != VersionStatus.canary:  # a resumed canary passed the gate already
        gate = t.champion_gate(st, rollout)
        result["gate"] = gate
        print(gate["reason"])
        if not gate["passed"]:
            reason = f"champion/challenger gate: {gate['reason']}"
            t.reject(st, reason, gate)
            return _report({**result, "outcome": "rejected", "reason": reason})
    chosen = strategy or ("canary" if st.stable not in (None, st.version) else "direct")
    result["strategy"] = chosen
    if chosen == "direct" or st.stable is None:
        t.deploy_direct(
            st,
            reason="deploy-model: "
            + ("first version of the model" if st.stable is None else "direct strategy"),
        )
        served = wait_until_served(
            get_settings(), timeout_s=rollout.ready_timeout_s, model=model, version=st.version
        )
        return _report(
            {
                **result,
                "strategy": "direct",
                "outcome": "promoted",
                "reason": "stable at once after the gates ("
                + ("first version" if st.stable is None else "direct")
                + ")"
                + (
                    "" if served == "ready" else "; no gateway runs yet: `kiln serve` will start it"
                ),
            }
        )
    return _report({**result, **canary(st, rollout)})


def _settled(st: t.Standing) -> dict[str, Any] | None:
    """The outcome of a version whose fate is already decided, or None."""
    status = VersionStatus(st.status)
    if status in (VersionStatus.production, VersionStatus.retired) and st.stable == st.version:
        return {
            "outcome": "promoted",
            "reason": f"{st.model}@{st.version} is already the production version",
        }
    if status == VersionStatus.rejected:
        return {
            "outcome": "rejected",
            "reason": f"{st.model}@{st.version} was rejected before: see `kiln show`",
        }
    if status == VersionStatus.rolled_back:
        return {
            "outcome": "rolled_back",
            "reason": f"{st.model}@{st.version} was rolled back "
            "before; pass a strategy to try it again",
        }
    if status == VersionStatus.canary and st.canary != st.version:
        raise ExternalToolError(
            f"{st.model}@{st.version} is marked canary but the deployment's "
            f"canary is {st.canary}: check `kiln status`"
        )
    return None


def canary(st: t.Standing, rollout: RolloutSettings) -> dict[str, Any]:
    """Weight steps with guardrails, then promote; any failed step rolls back at once."""
    from kiln.rollout.service import service_key

    settings = get_settings()
    if st.canary not in (None, st.version):
        raise ExternalToolError(
            f"{st.model} already has a canary ({st.canary}): promote or "
            "roll it back first (`kiln promote` / `kiln rollback`)"
        )
    gateway = GatewayClient(gateway_url(settings), service_key(settings))
    replayer: Replayer | None = None
    steps: list[StepResult] = []
    try:
        try:
            gateway.stats(st.model)
        except Exception as exc:
            raise ExternalToolError(
                f"a canary needs the gateway, and none answers at {gateway.url} ({exc}): "
                "start `kiln serve`, or deploy with --strategy direct"
            ) from None
        t.start_canary(st, rollout.shadow_share)
        if not wait_version_ready(
            gateway, model=st.model, version=st.version, timeout_s=rollout.ready_timeout_s
        ):
            reason = (
                f"the canary's engine was not ready within {rollout.ready_timeout_s:.0f} "
                f"s; see {settings.home / 'logs'}"
            )
            t.roll_back(st, reason, {"phase": "warm-up"})
            return {"outcome": "rolled_back", "reason": reason, "steps": []}
        stable = st.stable
        assert stable is not None
        replayer = (
            Replayer(gateway, st.model, t.replay_inputs(st), rollout.replay_concurrency)
            if rollout.replay
            else None
        )
        if rollout.warmup_s > 0 and st.canary_weight == 0:
            # weight 0: the canary sees only mirrored requests (replayed ones too), unjudged
            if replayer is not None and rollout.shadow_share > 0:
                replayer.start()
            time.sleep(rollout.warmup_s)
            if replayer is not None:
                replayer.stop()
        canary_since = time.time()
        for weight in rollout.steps:
            if weight < st.canary_weight:
                continue  # a resumed run: steps already taken
            t.set_weight(st, weight, f"canary step {weight:.0%}", {"step": weight})
            print(f"{st.model}@{st.version}: canary at {weight:.0%} for {rollout.step_seconds:g} s")
            step = observe_step(
                gateway,
                model=st.model,
                stable=stable,
                canary=st.version,
                weight=weight,
                canary_since=canary_since,
                rollout=rollout,
                replayer=replayer,
            )
            steps.append(step)
            print(
                f"  {step.verdict.decision}: "
                + ("; ".join(step.verdict.reasons) or "ok")
                + (f" ({step.replayed} replayed requests)" if step.replayed else "")
            )
            if step.verdict.decision != "pass":
                reason = f"canary step {weight:.0%} failed its guardrails: " + "; ".join(
                    step.verdict.reasons
                )
                t.roll_back(st, reason, {"step": weight, **step.verdict.figures})
                return {
                    "outcome": "rolled_back",
                    "reason": reason,
                    "steps": [s.to_dict() for s in steps],
                }
        reason = (
            f"every canary step passed its guardrails "
            f"({', '.join(f'{s.weight:.0%}' for s in steps)})"
        )
        t.promote(st, reason, {"steps": [s.to_dict() for s in steps]})
        return {"outcome": "promoted", "reason": reason, "steps": [s.to_dict() for s in steps]}
    finally:
        if replayer is not None:
            replayer.stop()
        gateway.close()


def _report(result: dict[str, Any]) -> dict[str, Any]:
    """Publish the outcome as a Prefect markdown artifact and print it."""
    lines = [
        f"# deploy-model: {result['model']}@{result['version']}",
        "",
        f"**{result['outcome']}**: {result['reason']}",
        "",
    ]
    gate = result.get("gate") or {}
    if "champion_metric" in gate:
        lines += [
            "| | version | " + gate["metric"] + " |",
            "|---|---|---|",
            f"| champion | {gate['champion']} | {gate['champion_metric']:.4f} |",
            f"| challenger | {gate['candidate']} | {gate['candidate_metric']:.4f} |",
            "",
        ]
    if result.get("steps"):
        lines += [
            "| step | verdict | canary requests | canary errors | canary p99 ms | "
            "stable p99 ms | replayed |",
            "|---|---|---|---|---|---|---|",
        ]
        for step in result["steps"]:
            fig = step["figures"]
            can, sta = fig.get("canary", {}), fig.get("stable", {})
            lines.append(
                f"| {step['weight']:.0%} | {step['decision']} | "
                f"{can.get('requests', 0)} | {can.get('errors', 0)} | "
                f"{_ms(can.get('p99_ms'))} | {_ms(sta.get('p99_ms'))} | "
                f"{step['replayed']} |"
            )
    try:
        create_markdown_artifact(
            markdown="\n".join(lines),
            key=f"deploy-{result['model']}".lower(),
            description=f"{result['model']}@{result['version']}: {result['outcome']}",
        )
    except Exception:  # outside a flow run (tests calling helpers): printing is enough
        pass
    print(f"{result['model']}@{result['version']}: {result['outcome']} ({result['reason']})")
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
