"""The artifact store: content-addressed files (sha256) in ``$KILN_HOME``, versioned with DVC
and pushed to its remote (a local folder by default).

Owns: ``artifacts`` (``ArtifactStore``: put, verify, pull, sweep; the DVC repository it keeps).
May import: ``kiln.errors``, ``kiln.faults``. Imported by: the registry's backup, the stages,
``serving`` (engines load what the store verified) and ``tasks``.
"""
