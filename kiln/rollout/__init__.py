"""Rollout: deploy decisions as desired state, and the canary that earns a promotion.

Owns: ``commands`` (direct deploy, promote, rollback, status: Deployment rows the supervisor
reconciles to; nothing here starts a process), ``client`` (the rollout's HTTP client of the
gateway: readiness, per-version figures), ``replay`` (request bodies replayed when live traffic
is thin), ``canary`` (rollout settings and one observed step), ``guardrails`` (the statistical
verdict on a step) and ``service`` (the key the flows use to call the gateway).

May import: ``kiln.registry``, ``kiln.store`` and the shared modules. Imported by: ``tasks``,
``flows``, ``serving`` (guardrail thresholds, the service key) and the CLI.
"""
