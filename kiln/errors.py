"""Kiln's domain exceptions, in one place.

Each class says what it becomes at the edge: ``http_status`` for the gateway, ``exit_code`` for
the CLI (which prints the message, one line, and exits with it). Messages say how to fix the
input, never internals such as tracebacks or absolute paths.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises on purpose. HTTP 500 / exit 1 unless a subclass says."""

    http_status: int = 500
    exit_code: int = 1


class InvalidInput(KilnError):
    """Bad user input (a name, a file, a field). HTTP 400, exit 2."""

    http_status = 400
    exit_code = 2


class UnsafeSource(InvalidInput):
    """A model source Kiln refuses to read: pickle, URL, archive escaping its folder. HTTP 400."""


class TooLarge(InvalidInput):
    """A file or body over the configured size limit. HTTP 413."""

    http_status = 413


class NotFound(KilnError):
    """Unknown model, version, artifact or key. HTTP 404, exit 3."""

    http_status = 404
    exit_code = 3


class Forbidden(KilnError):
    """A valid API key without the scope or the model a route needs. HTTP 403, exit 1."""

    http_status = 403

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Conflict(KilnError):
    """A write that contradicts stored state: same version with other content, a concurrent
    promote. HTTP 409, exit 4."""

    http_status = 409
    exit_code = 4


class IllegalTransition(Conflict):
    """A version status change not on the lifecycle (``TRANSITIONS`` in kiln/registry/tables.py). HTTP 409, exit 4."""


class IntegrityError(KilnError):
    """A stored artifact whose sha256 no longer matches the registry: refused, never served.
    HTTP 500 (the operator must restore it: ``kiln restore`` or a DVC pull), exit 5."""

    exit_code = 5


class ModelLoadError(InvalidInput):
    """The model could not be loaded or run on a sample input (in its sandbox subprocess).
    HTTP 400, exit 2; the upload changes nothing."""


class DatasetCheckFailed(InvalidInput):
    """A dataset failed its Great Expectations checks; the message lists each expectation."""


class ExternalToolError(KilnError):
    """A tool Kiln drives (DVC, pg_dump) failed; the message carries its own reason. Exit 6."""

    exit_code = 6


class ExtractionError(KilnError):
    """torch.export (or the ONNX exporter) could not capture the model, or the captured graph
    disagrees with the eager model. The message is the exporter's reason in one paragraph.
    HTTP 422, exit 7; the version becomes ``rejected`` and nothing else changes."""

    http_status = 422
    exit_code = 7


class VariantUnavailable(KilnError):
    """A backend or precision this host cannot build or run (no CUDA device, a package that
    does not import, calibration data missing). The compile stage skips that variant and reports
    the reason; the version is not rejected. HTTP 422, exit 8."""

    http_status = 422
    exit_code = 8
