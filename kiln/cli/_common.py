"""What every ``kiln`` command shares: the Typer app, the consoles, ``--json`` output and the
error handler that turns Kiln's errors into one stderr line and the error's exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from kiln.errors import InvalidInput, KilnError, Unavailable
from kiln.settings import Settings, apply_privacy_env, get_settings

app = typer.Typer(
    help="Kiln: take a trained PyTorch model to a fast, safely rolled-out HTTP endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
F = TypeVar("F", bound=Callable[..., Any])
DRIFT_EXIT_CODE = 10  # `kiln drift --exit-code` found drift; apart from kiln/errors.py's codes


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


def handled(func: F) -> F:
    """Turn Kiln's errors into one stderr line and the error's exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KilnError as exc:
            message = " ".join(str(exc).split())  # one line, whatever a tool put in it
            err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            unavailable = _registry_unreachable(exc)
            if unavailable is None:
                raise
            message = " ".join(str(unavailable).split())
            err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(unavailable.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _registry_unreachable(exc: Exception) -> Unavailable | None:
    """A registry database that does not answer (connection refused, restarting, dropped) as
    an :class:`Unavailable` (exit 11: retry later), naming the driver's reason without the SQL,
    its parameters or the URL's password; None for any other error."""
    sa_exc = sys.modules.get("sqlalchemy.exc")  # not imported: not SQLAlchemy's error
    if sa_exc is None or not isinstance(exc, sa_exc.OperationalError):
        return None
    reason = str(exc.orig or exc).strip().splitlines()
    return Unavailable(
        "the registry database does not answer "
        f"({type(exc.orig or exc).__name__}: {(reason[0] if reason else '')[:200]}): "
        "retry once it is back"
    )


def _settings() -> Settings:
    """The process's settings; a bad ``KILN_*`` variable is an InvalidInput naming it, without
    the value (pydantic's own message repeats it, and a URL may carry a password)."""
    apply_privacy_env()
    try:
        return get_settings()
    except ValidationError as exc:
        problems = [
            f"KILN_{'_'.join(str(part) for part in e['loc']).upper() or 'SETTINGS'}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidInput("; ".join(problems)) from None


@dataclass(frozen=True)
class ModelRef:
    """A ``NAME[@VERSION]`` argument: the model, and the version (None: the command's default)."""

    name: str
    version: str | None


def _split_ref(ref: str) -> ModelRef:
    name, _, version = ref.partition("@")
    return ModelRef(name, version or None)
