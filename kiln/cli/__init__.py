"""The ``kiln`` command line, the top of the house: one command per user action.

Owns: the Typer app (``_common``) and its commands, grouped by what they act on: ``models``
(upload, models, show, optimize), ``rollout`` (deploy, promote, rollback, status, serve),
``ops`` (drift, backup, restore, demo) and ``keys``. With ``--json`` stdout carries exactly one
JSON document; people get rich tables. Errors print one line on stderr saying how to fix the
input, and exit with the error's code (kiln/errors.py).

May import: every ``kiln`` package, and ``flows`` and ``serving`` (lazily, inside the command that
needs them, so ``kiln --help`` stays fast). Imported by: nothing (the ``kiln`` console script).
"""

from __future__ import annotations

from kiln.cli import keys, models, ops, rollout
from kiln.cli._common import app
from kiln.settings import apply_privacy_env

__all__ = ["app", "main"]
_COMMANDS = (models, rollout, ops, keys)  # imported for the commands they register on ``app``


def main() -> None:
    apply_privacy_env()
    app()
