"""One canary rollout step: the model's rollout settings, and the step observed through the
gateway's figures and judged by :mod:`kiln.rollout.guardrails`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.gate import MAX_ACCURACY_DROP
from kiln.rollout.client import GatewayClient
from kiln.rollout.guardrails import Policy, Verdict, Window, judge, p99_limit
from kiln.rollout.replay import Replayer
from kiln.settings import CANARY_STEP_SECONDS, READY_TIMEOUT_S

log = logging.getLogger(__name__)


class RolloutSettings(BaseModel):
    """How a model's new versions roll out (``Model.settings["rollout"]``); the guardrail
    thresholds are :class:`kiln.rollout.guardrails.Policy`'s fields, set in the same record."""

    model_config = ConfigDict(extra="allow")  # the Policy's fields live here too

    steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])
    step_seconds: float = Field(default=CANARY_STEP_SECONDS, gt=0)
    shadow_share: float = Field(default=0.2, ge=0.0, le=1.0)  # stable traffic mirrored
    replay: bool = True  # make traffic when live traffic is too thin for a verdict
    # what is replayed: "log", the stable version's recent logged requests (the inference log),
    # or the validation dataset when fewer than ``replay_min_logged`` are logged; "dataset": it
    replay_source: Literal["log", "dataset"] = "log"
    replay_min_logged: int = Field(default=200, ge=1)
    replay_concurrency: int = Field(default=4, ge=1, le=64)
    max_extra_s: float = Field(default=60.0, ge=0)  # past a step's end, waiting for a verdict
    ready_timeout_s: float = Field(default=READY_TIMEOUT_S, gt=0)  # a new engine warming up
    # after its engine is ready, the canary gets mirrored (shadow) requests only, for this
    # long, before any step is judged: a new engine's first real requests (connections,
    # allocator arenas, caches) are slower than a warm one's, and a short step would hold
    # that against it (Flagger's and Argo's initial delay)
    warmup_s: float = Field(default=10.0, ge=0)
    # the candidate's metric vs stable's (tasks/deploy.py's champion gate): by default the
    # optimize gate's allowed accuracy drop
    champion_max_drop: float = Field(default=MAX_ACCURACY_DROP, ge=0)

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_one(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < w <= 1 for w in steps) or steps != sorted(steps):
            raise ValueError("canary steps are rising weights in (0, 1], e.g. [0.1, 0.5, 1.0]")
        if steps[-1] != 1.0:
            steps = [*steps, 1.0]
        return steps

    @classmethod
    def for_model(cls, model_settings: dict[str, Any], **overrides: Any) -> RolloutSettings:
        doc = {
            **model_settings.get("rollout", {}),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        return cls.model_validate(doc)

    def policy(self) -> Policy:
        return Policy.from_settings(self.model_dump())


@dataclass
class StepResult:
    weight: float
    verdict: Verdict
    seconds: float
    replayed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "decision": self.verdict.decision,
            "reasons": self.verdict.reasons,
            "figures": self.verdict.figures,
            "seconds": round(self.seconds, 2),
            "replayed": self.replayed,
        }


def observe_step(
    gateway: GatewayClient,
    *,
    model: str,
    stable: str,
    canary: str,
    weight: float,
    canary_since: float,
    rollout: RolloutSettings,
    replayer: Replayer | None,
    poll_s: float = 0.5,
) -> StepResult:
    """Watch one canary step: the canary's figures since the step began against the stable's
    over the same step (or since the canary began, when the step left the stable too few
    requests), judged every ``poll_s``. Fails as soon as a rule breaks with
    enough requests; passes at the step's end if the verdict is ``pass``; when the verdict is
    still ``wait`` (too little traffic), replays traffic and waits up to ``max_extra_s`` more,
    after which the missing verdict counts as a failure (nothing is promoted unjudged)."""
    policy = rollout.policy()
    started = time.time()
    end = started + rollout.step_seconds
    verdict = judge(Window(), Window(), policy)
    replayed_before = replayer.sent if replayer else 0
    while True:
        time.sleep(poll_s)
        now = time.time()
        final = now >= end
        # the stable over this same step when it had enough requests in it (the same load,
        # the same neighbours), else since the canary began (a 100 % step leaves it none)
        base = _window(gateway.stats(model, since=started), stable)
        if base.requests < policy.min_requests:
            base = _window(gateway.stats(model, since=canary_since), stable)
        limit = p99_limit(base.p99_ms, policy, final=final) if base.p99_ms is not None else None
        observed = _window(gateway.stats(model, since=started, over_ms=limit), canary)
        verdict = judge(base, observed, policy, final=final)
        if verdict.decision == "fail":
            break
        if final and verdict.decision == "pass":
            break
        if now >= end + rollout.max_extra_s:
            verdict = Verdict(
                "fail",
                [
                    f"no verdict: {verdict.reasons[0]} after "
                    f"{now - started:.0f} s (replayed traffic included)"
                ],
                verdict.figures,
            )
            break
        if replayer is not None and not replayer.running and rollout.replay:
            got = observed.requests
            elapsed = now - started
            # too thin: the canary's pace would not reach the minimum by the step's end
            if elapsed >= min(2.0, rollout.step_seconds / 4) and (
                got + got / max(elapsed, 1e-3) * max(end - now, 0) < policy.min_requests
            ):
                log.info("live traffic too thin for a verdict on %s@%s: replaying", model, canary)
                replayer.start()
    replayed = (replayer.sent - replayed_before) if replayer else 0
    return StepResult(weight, verdict, time.time() - started, replayed)


def _window(doc: dict[str, Any], version: str) -> Window:
    stats = doc.get("versions", {}).get(version, {})
    return Window.from_stats(
        stats,
        {
            "compared": stats.get("shadow_compared", 0),
            "disagreed": stats.get("shadow_disagreed", 0),
        },
    )
