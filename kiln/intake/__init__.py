"""Intake: how a model and its data get into Kiln safely.

Owns: ``upload`` (a source and its dataset into the registry and store, all or nothing),
``formats`` (which sources are accepted: ``.pt2``, ``.onnx``, a ``kiln.yaml`` folder; pickles
refused), ``probe`` (the model loaded and run once in a sandboxed child to record its spec),
``sandbox`` (the child runner: own process group, timeout, killed whole) and ``datasets``
(``.npz``/``.parquet`` loading and the Great Expectations checks).

May import: ``kiln.registry``, ``kiln.store`` and the shared modules. Imported by:
``kiln.optimize`` (formats, datasets, sample inputs), ``kiln.monitor`` (the GX helpers),
``tasks`` and the CLI.
"""
