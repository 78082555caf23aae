"""The registry: what Kiln knows about models, versions, artifacts, datasets, jobs, deployments,
keys, alerts and logged inferences.

Owns: the SQLModel tables (``tables``: one ``XBase -> X(table=True)`` family per entity), the CRUD
functions every read and write goes through (``crud``: keyword-only, session first), engines and
sessions (``db``), the Alembic migrations (``migrations/``), tensors as OIP JSON in logged
inferences (``records``), named leases with fencing tokens (``lease``: one holder at a time,
by the database's clock), ``backup``/``restore`` of registry and store together, and the
read-only views the CLI prints (``views``).

May import: ``kiln.settings``, ``kiln.errors``, ``kiln.faults``, ``kiln.store`` (backup copies the
artifacts too). Never a pipeline stage (``intake``, ``optimize``, ``rollout``, ``monitor``), the
backends or the runtime. Imported by: every stage, ``serving``, ``tasks``, ``flows`` and the CLI.
"""
