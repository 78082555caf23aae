"""The runtime (data plane): what ``kiln serve`` runs.

Owns: ``gateway`` (the Open Inference Protocol v2 and KServe v1 routes, canary split, shadow,
cache, deadlines, admission), ``engine`` (one LitServe server per model version, loading the
selected artifact through its backend), ``supervisor`` (starts, warms, drains and replaces the
engines to match the registry's Deployment rows), ``state`` (the gateway's view of those rows),
``oip`` and ``wire`` (request parsing and tensor encoding), ``auth`` (API keys, rate limits),
``inference_log``, ``metrics`` (Prometheus), ``alerts`` (guardrail alerts while serving),
``loader``, ``config``, ``http`` and ``heap``.
May import: ``kiln`` (settings, errors, the registry, backends, rollout's pure guardrails).
Never imports ``tasks`` or ``flows`` (pyproject.toml's import-linter contracts).
Imported by: ``kiln.cli`` (``kiln serve``), the tests and the bench.
"""
