"""``kiln keys``: create, list and revoke API keys (only a key's sha256 is stored; the key itself
is printed once)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli._common import (
    JsonOpt,
    _emit,
    _settings,
    app,
    err,
    handled,
    out,
)

keys_app = typer.Typer(
    help="Create, list and revoke API keys for the gateway.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _key_doc(row: Any) -> dict[str, Any]:
    """A key's public fields (never its hash)."""
    return {
        "prefix": row.prefix,
        "scopes": list(row.scopes),
        "models": row.models,
        "rate_per_second": row.rate_per_second,
        "revoked": row.revoked,
        "created_at": row.created_at,
    }


@keys_app.command("create")
@handled
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", help="infer | deploy | admin (repeatable; admin implies all, deploy infer)."
        ),
    ],
    rate: Annotated[
        float | None,
        typer.Option(
            help="Requests per second (also 60x per minute); default: the gateway's default "
            "(KILN_DEFAULT_RATE_PER_SECOND, unlimited when unset)."
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated model names the key may reach; default: every model."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; it is shown once (only its sha256 is stored)."""
    from kiln.errors import InvalidInput
    from kiln.registry import crud
    from kiln.registry.db import session_scope

    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise InvalidInput(
            f"--rate {rate:g} is not a rate: give requests per second above 0, "
            "or leave it out for the default"
        )
    names = None if models is None else [m.strip() for m in models.split(",") if m.strip()]
    if names is not None and not names:
        raise InvalidInput(
            "--models is empty: give model names such as digits,minilm, or leave "
            "it out for every model"
        )
    with session_scope(_settings().db_url) as session:
        issued = crud.create_api_key(
            session=session, scopes=scope, models=names, rate_per_second=rate
        )
        key, row = issued.key, issued.row
    if as_json:
        _emit({"key": key, **_key_doc(row)})
        return
    out.print(
        f"key [bold]{row.prefix}[/bold] scopes {', '.join(row.scopes)}, models "
        f"{', '.join(row.models) if row.models else 'all'}, rate "
        f"{f'{row.rate_per_second:g}/s' if row.rate_per_second else 'default'}",
        highlight=False,
    )
    out.print(key, highlight=False, soft_wrap=True, markup=False)
    err.print("store it now: it is not shown again (send it as 'Authorization: Bearer <key>')")


@keys_app.command("list")
@handled
def keys_list(as_json: JsonOpt = False) -> None:
    """List keys by prefix: scopes, models, rate, revoked (never the key or its hash)."""
    from kiln.registry import crud
    from kiln.registry.db import session_scope

    with session_scope(_settings().db_url) as session:
        docs = [_key_doc(row) for row in crud.list_api_keys(session=session)]
    if as_json:
        _emit({"keys": docs})
        return
    table = Table("prefix", "scopes", "models", "rate/s", "revoked", "created")
    for d in docs:
        table.add_row(
            d["prefix"],
            ", ".join(d["scopes"]),
            ", ".join(d["models"]) if d["models"] else "all",
            f"{d['rate_per_second']:g}" if d["rate_per_second"] else "default",
            "[red]yes[/red]" if d["revoked"] else "",
            str(d["created_at"])[:19],
        )
    out.print(table)


@keys_app.command("revoke")
@handled
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(help="The key's prefix, e.g. kiln_1a2b3c4d (`kiln keys list`).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; running gateways refuse it within KILN_AUTH_CACHE_S (default 1 s)."""
    from kiln.registry import crud
    from kiln.registry.db import session_scope

    settings = _settings()
    with session_scope(settings.db_url) as session:
        row = crud.revoke_api_key(session=session, prefix=prefix)
    if as_json:
        _emit({"prefix": row.prefix, "revoked": True})
        return
    out.print(
        f"revoked {row.prefix}; gateways refuse it within {settings.auth_cache_s:g} s",
        highlight=False,
    )
