"""Optimization: from a registered version to validated variants, one of them selected.

Owns: ``extract`` (torch.export and ONNX export of a source, checked against the source's own
outputs), ``isolated`` (that extraction in a sandboxed child), ``prune`` (structured pruning),
``validate`` (the accuracy and latency gates, and the choice of the fastest passing variant),
``pipeline`` (the stage functions the ``optimize-model`` flow's tasks call) and ``reoptimize``
(a new patch version from the same source with today's optimizer).

May import: ``kiln.backends``, ``kiln.intake``, ``kiln.registry``, ``kiln.store`` and the shared
modules. Imported by: ``tasks``, ``flows`` and ``serving.loader`` (never the other way round).
"""
