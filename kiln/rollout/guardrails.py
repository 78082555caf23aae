"""The canary verdict: is the candidate worse than the stable version, given what was observed?

A pure function over two windows of per-version figures (requests, 5xx errors, latency
percentiles, shadow disagreement), so the decision can be tested on recorded or synthetic
streams without any process (docs/reliability.md scenario 24). Flagger's metric checks and Argo Rollouts'
analysis are the models; the difference is that every rule here is a *statistical* one:

- no verdict below ``min_requests`` canary requests (noise never rolls back);
- errors: roll back only when the canary's error rate is above the stable's plus
  ``max_error_increase`` with confidence (the lower Wilson bound, ``z`` standard errors), so a
  healthy canary with 1 % errors beside a 0 % stable, at the bound itself, is not rolled back
  by an unlucky sample, even though the flow looks again every half second (the bound is at
  99.999 %; tests/unit/test_guardrails.py measures the false-rollback rate over simulated
  rollouts), and looks before a step's end fail only on severe breaches;
- latency: "p99 no worse than ``p99_ratio`` times the stable's (and ``p99_slack_ms`` more: a
  1.2x rule alone would roll back a 2 ms model for 1 ms of jitter)" is tested as what it means:
  at most 1 % of the canary's requests may be slower than that limit. A sample p99 of a few
  hundred requests is its third-slowest request, one scheduler hiccup on a busy host; so the
  rule fails only when the share of requests over the limit is above 1 % with confidence
  (the gateway counts them: ``over_ms``);
- disagreement: rows where the canary's prediction differs from the stable's on mirrored
  (shadow) requests, with the same lower-bound rule, once ``min_compared`` rows were compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Decision = Literal["pass", "fail", "wait"]


@dataclass(frozen=True)
class Window:
    """What one version did over an observation window (the gateway's ``/kiln`` stats)."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    over: int | None = None  # requests slower than the p99 limit the stats were asked about
    compared: int = 0  # shadowed rows compared with the stable's answers
    disagreed: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @classmethod
    def from_stats(cls, doc: dict[str, Any] | None, shadow: dict[str, Any] | None = None) -> Window:
        doc = doc or {}
        shadow = shadow or {}
        return cls(
            requests=int(doc.get("requests", 0)),
            errors=int(doc.get("errors", 0)),
            p50_ms=doc.get("p50_ms"),
            p99_ms=doc.get("p99_ms"),
            over=doc.get("over"),
            compared=int(shadow.get("compared", 0)),
            disagreed=int(shadow.get("disagreed", 0)),
        )


@dataclass(frozen=True)
class Policy:
    """Guardrail thresholds; a model's ``settings["rollout"]`` overrides any of them."""

    min_requests: int = 200
    max_error_increase: float = 0.01  # one point above the stable's error rate
    p99_ratio: float = 1.2
    p99_slack_ms: float = 10.0
    max_disagreement: float = 0.05
    min_compared: int = 50
    severity: float = 3.0  # how far past a limit a look before the step's end must be to fail
    z: float = 4.26  # one-sided 99.999 %: a canary at the limit itself must not be rolled back

    @classmethod
    def from_settings(cls, rollout: dict[str, Any] | None) -> Policy:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in (rollout or {}).items() if k in known})


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson_lower(successes: int, n: int, z: float) -> float:
    """Lower bound of the Wilson score interval for a proportion (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def p99_limit(stable_p99_ms: float, policy: Policy, *, final: bool = True) -> float:
    """The latency a healthy canary's p99 stays under, given the stable's p99."""
    limit = max(stable_p99_ms * policy.p99_ratio, stable_p99_ms + policy.p99_slack_ms)
    return limit * (1.0 if final else policy.severity)


def judge(
    stable: Window, canary: Window, policy: Policy | None = None, *, final: bool = True
) -> Verdict:
    """``pass``, ``fail`` (with every broken rule as a reason) or ``wait`` (too few requests).

    ``final`` is the verdict at a step's end. The looks before it (``final=False``, every poll)
    fail only on severe breaches (``severity`` times the allowance), so a clearly bad canary is
    rolled back at once while a borderline one is judged once per step: many looks at the same
    rule would turn a 0.1 % false-alarm rate per look into several per cent per rollout.
    """
    p = policy or Policy()
    k = 1.0 if final else p.severity
    figures = {
        "stable": asdict(stable),
        "canary": asdict(canary),
        "stable_error_rate": stable.error_rate,
        "canary_error_rate": canary.error_rate,
    }
    if canary.requests < p.min_requests:
        return Verdict(
            "wait",
            [f"{canary.requests} canary requests of the {p.min_requests} needed for a verdict"],
            figures,
        )
    reasons = []
    base_rate = stable.error_rate or 0.0
    lower = wilson_lower(canary.errors, canary.requests, p.z)
    figures["canary_error_lower_bound"] = round(lower, 5)
    if lower > base_rate + p.max_error_increase * k:
        reasons.append(
            f"error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}; at least "
            f"{lower:.1%} with 99.999% confidence) against the stable's {base_rate:.1%} + "
            f"{p.max_error_increase:.0%} allowed"
        )
    if (
        canary.p99_ms is not None
        and stable.p99_ms is not None
        and stable.requests >= p.min_requests
    ):
        limit = p99_limit(stable.p99_ms, p, final=final)
        figures["p99_limit_ms"] = round(limit, 3)
        slow_lower = 1.0 if canary.over is None else wilson_lower(canary.over, canary.requests, p.z)
        figures["over_limit"] = canary.over
        if canary.p99_ms > limit and slow_lower > 0.01:
            counted = (
                ""
                if canary.over is None
                else (
                    f"; {canary.over} of {canary.requests} requests slower than the limit, at least "
                    f"{slow_lower:.1%} with 99.999% confidence, where a p99 allows 1%"
                )
            )
            reasons.append(
                f"p99 {canary.p99_ms:.1f} ms against the stable's "
                f"{stable.p99_ms:.1f} ms (limit {limit:.1f} ms: {p.p99_ratio}x, and "
                f"at least {p.p99_slack_ms:g} ms more{counted})"
            )
    if canary.compared >= p.min_compared:
        lower_d = wilson_lower(canary.disagreed, canary.compared, p.z)
        figures["disagreement"] = round(canary.disagreed / canary.compared, 5)
        figures["disagreement_lower_bound"] = round(lower_d, 5)
        if lower_d > p.max_disagreement * k:
            reasons.append(
                f"predictions differ from the stable's on {canary.disagreed} of "
                f"{canary.compared} shadowed rows ({figures['disagreement']:.1%}; "
                f"allowed {p.max_disagreement:.0%})"
            )
    return Verdict("fail" if reasons else "pass", reasons, figures)


def disagreements(task: str, stable: Any, canary: Any) -> tuple[int, int]:
    """(rows compared, rows where the canary's answer differs from the stable's) for one
    mirrored request: the predicted class for classification, a cosine under 0.99 for
    embeddings, an error above 1 % (+1e-3) for regression. Shapes that differ: every row."""
    import numpy as np

    a = np.asarray(stable, dtype=np.float64)
    b = np.asarray(canary, dtype=np.float64)
    rows = int(a.shape[0]) if a.ndim else 1
    if a.shape != b.shape or rows == 0:
        return rows, rows
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    if not (np.isfinite(a2).all() and np.isfinite(b2).all()):
        bad = ~(np.isfinite(a2).all(axis=1) & np.isfinite(b2).all(axis=1))
        return rows, int(bad.sum())
    if task == "classification":
        differ = a2.argmax(axis=1) != b2.argmax(axis=1)
    elif task == "embedding":
        norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cosine = (a2 * b2).sum(axis=1) / np.where(norms == 0, 1.0, norms)
        differ = cosine < 0.99
    else:
        differ = (np.abs(a2 - b2) > 1e-3 + 1e-2 * np.abs(a2)).any(axis=1)
    return rows, int(differ.sum())
