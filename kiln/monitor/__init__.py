"""Monitoring after deploy: drift of logged traffic against the reference data, and alerts.

Owns: ``drift`` (Great Expectations checks and Evidently's data drift over logged inferences)
and ``alerts`` (fire and clear as registry rows and Prefect events, the drift automation).

May import: ``kiln.intake`` (the GX helpers of ``datasets``), ``kiln.registry`` and the shared
modules. Imported by: ``tasks``, ``flows``, ``serving`` (the gateway's alert monitor) and the CLI.
"""
