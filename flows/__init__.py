"""Prefect flows: the journeys people start from the UI, a schedule, the CLI or HTTP.

Owns: ``register`` (upload), ``optimize``, ``deploy`` (gate, canary, promote or roll back),
``reoptimize``, ``monitor`` (drift and alerts), ``demo`` (``make demo``'s end-to-end run) and
``up`` (``make up``: a local Prefect server and worker). ``prefect.yaml`` deploys them.
May import: ``tasks``, ``kiln`` and, for the demo, ``serving``. Imported by: ``kiln.cli`` (lazily, to run a flow) and the tests.
"""
