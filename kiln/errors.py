"""Kiln's domain exceptions, in one place.

Each class says what it becomes at the edge: ``http_status`` for the gateway (which answers
``{"error": message}`` with that status and the error's ``headers``), ``exit_code`` for the CLI
(which prints the message, one line, and exits with it). Messages say how to fix the input, never
internals such as tracebacks or absolute paths.

Exit codes: 1 any other failure, 2 bad input, 3 not found, 4 conflict, 5 integrity failure, 6 an
external tool failed, 7 the version is rejected, 8 a variant this host cannot build, 11 busy or
out of time (retry later). 9 and 10 are not errors: ``kiln deploy``'s rollback and ``kiln drift
--exit-code``'s drift (``kiln/cli``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class KilnError(Exception):
    """Base of every error Kiln raises on purpose. HTTP 500 / exit 1 unless a subclass says.

    ``headers`` are the extra response headers the gateway sends with the error (``Retry-After``
    on a refusal to come back from, ``Allow`` on a wrong method); none unless the raiser gives
    them.
    """

    http_status: int = 500
    exit_code: int = 1
    headers: Mapping[str, str] = _NO_HEADERS

    def __init__(self, *args: object, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(*args)
        if headers:
            self.headers = dict(headers)  # a plain dict, so the error still pickles


class InvalidInput(KilnError):
    """Bad user input (a name, a file, a field). HTTP 400, exit 2."""

    http_status = 400
    exit_code = 2


class UnsafeSource(InvalidInput):
    """A model source Kiln refuses to read: pickle, URL, archive escaping its folder. HTTP 400."""


class TooLarge(InvalidInput):
    """A file or body over the configured size limit. HTTP 413."""

    http_status = 413


class MethodNotAllowed(InvalidInput):
    """A route asked with an HTTP method it does not take. HTTP 405 (the raiser names the method
    it takes in an ``Allow`` header), exit 2."""

    http_status = 405


class UnsupportedMediaType(InvalidInput):
    """A body in a content type or encoding the route does not read. HTTP 415, exit 2."""

    http_status = 415


class NotFound(KilnError):
    """Unknown model, version, artifact or key. HTTP 404, exit 3."""

    http_status = 404
    exit_code = 3


class Unauthorized(KilnError):
    """A request without a live API key: missing, malformed, unknown or revoked, all alike.
    HTTP 401 (the raiser adds the ``WWW-Authenticate`` challenge), exit 1."""

    http_status = 401


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


class InferenceFailed(KilnError):
    """The model failed on a request that reached it: it raised, or answered NaN or infinite
    values. The message carries the engine's reason. HTTP 500, exit 1; the request may be retried
    on another version (inference is idempotent)."""


class Unavailable(KilnError):
    """Kiln cannot take the request now but expects to shortly: a model's queue is full, it has
    no served version or no engine able to answer yet. HTTP 503 (the raiser says when to come
    back in ``Retry-After``), exit 11: retry later."""

    http_status = 503
    exit_code = 11


class RateLimited(Unavailable):
    """An API key over its request rate. HTTP 429 (``Retry-After``: the whole seconds until its
    window frees a slot), exit 11."""

    http_status = 429


class DeadlineExceeded(KilnError):
    """The request's deadline passed before an answer was ready: before an engine took it, while
    it waited in the engine, or while the model ran. HTTP 504, exit 11: retry later, or with a
    longer deadline."""

    http_status = 504
    exit_code = 11
