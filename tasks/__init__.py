"""Prefect tasks: the pipeline's steps, each a retriable unit over the core library.

Owns: ``upload``, ``optimize``, ``deploy``, ``monitor`` and ``reoptimize``, thin wrappers that
open a registry session, call ``kiln``'s stage functions and return named records.
May import: ``kiln`` (every layer) and ``serving.loader`` (a version loaded as the engine loads
it, for the champion gate and drift). Never imports ``flows`` (import-linter).
Imported by: ``flows``.
"""
