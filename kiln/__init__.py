"""Kiln's core library: everything the pipeline stages, the runtime and the CLI share.

Layout (docs/architecture.md explains the journey through it):

- shared by every layer: ``settings`` (pydantic-settings, each tunable default written once),
  ``errors`` (the domain exceptions, each naming its HTTP status and exit code), ``spec`` (tensor
  and model specs, OIP datatypes), ``faults`` (failpoints for the reliability tests),
  ``examples`` (the example models' code, which the ``data/`` stages and the GPU check import),
  ``gate`` (a quality gate's drop arithmetic, one comparison for every gate), ``net`` (addresses
  and URLs, standard library only) and ``processes`` (children in their own process group: start,
  wait until ready, stop);
- ``store``: the DVC artifact store; ``registry``: tables, CRUD, migrations, backup, views;
- ``intake``: uploads, source formats, the sandboxed probe, datasets;
- ``backends``: one module per inference backend, with the ONNX graph tools they build on;
- ``optimize``: graph extraction, pruning, validation gates, the optimize pipeline;
- ``rollout``: deploy decisions as desired state, canary steps, guardrails;
- ``monitor``: drift reports and alerts;
- ``cli``: the ``kiln`` command line, the top of the house.

The layer rules are import-linter contracts in pyproject.toml (``make lint`` checks them): no
``kiln`` package imports ``tasks``, ``flows`` or ``serving`` except ``kiln.cli``.
"""
