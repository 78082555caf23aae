"""Every read and write of the registry goes through ``kiln.registry``'s functions.

Outside ``kiln/registry/`` (the stages and the CLI in ``kiln``, ``serving``, ``tasks``, ``flows``)
code opens a session with ``session_scope`` and hands it to ``kiln.registry.crud`` (or reads a
``kiln.registry.views`` document); it builds no query, runs no SQL, and neither adds, deletes nor
re-reads rows on the session itself. So a filter, an ordering or a lock lives in one named,
tested function, and a schema change is made in one package. Table classes may still be
imported (annotations, enum members, a row to hand to a CRUD function), and so may the session
type and SQLAlchemy's exceptions. Changing a row's attribute outside the registry is left to
review: an AST cannot tell a row from any other object.

The rule is checked on the syntax tree, so it needs no import of the modules it reads; the
second half of this file shows it failing on the inline queries the registry once had callers
write (the supervisor's raw SQL poll, re-optimization's ``select``, ``session.get`` lookups).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("kiln", "serving", "tasks", "flows")
EXEMPT = ROOT / "kiln" / "registry"  # the registry's own queries, backup's dump, migrations

ORM_PACKAGES = ("sqlalchemy", "sqlmodel")
# (module, name) that may be imported from the ORM packages: types and exceptions, no queries
ALLOWED_ORM_NAMES = frozenset(
    {("sqlmodel", "Session"), ("sqlalchemy.orm", "Session"), ("sqlalchemy.engine", "Engine")}
)
ALLOWED_ORM_MODULES = ("sqlalchemy.exc",)  # anything: IntegrityError and friends
# kiln.registry.db: a session, never an engine or a connection of one's own
ALLOWED_DB_NAMES = frozenset({"session_scope"})
ENGINE_FACTORIES = frozenset({"engine_for", "make_engine", "create_engine"})
# database verbs, flagged on any receiver (no other library this code uses spells them)
DB_VERBS = frozenset({"exec", "execute", "query", "scalars"})
# flagged on a session: the name ``session``, a ``with session_scope(...) as name`` target or a
# parameter annotated ``Session`` (``dict.get`` elsewhere stays legal). commit, rollback and
# expunge stay: the caller owns the transaction (kiln/registry/crud.py's module docstring).
SESSION_METHODS = frozenset(
    {
        "add",
        "add_all",
        "bulk_insert_mappings",
        "bulk_save_objects",
        "bulk_update_mappings",
        "connection",
        "delete",
        "exec",
        "execute",
        "flush",
        "get",
        "get_one",
        "merge",
        "query",
        "refresh",
        "scalar",
        "scalars",
    }
)


@dataclass(frozen=True)
class Violation:
    """One place that reaches the registry past its functions."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _is_orm(module: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in ORM_PACKAGES)


def _orm_name_allowed(module: str, name: str) -> bool:
    return (module, name) in ALLOWED_ORM_NAMES or any(
        module == m or module.startswith(f"{m}.") for m in ALLOWED_ORM_MODULES
    )


def _annotated_session(annotation: ast.expr | None) -> bool:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.split(".")[-1] == "Session"
    if isinstance(annotation, ast.Name):
        return annotation.id == "Session"
    return isinstance(annotation, ast.Attribute) and annotation.attr == "Session"


def _session_names(tree: ast.AST) -> set[str]:
    """Names that hold a registry session anywhere in the module."""
    names = {"session"}
    for node in ast.walk(tree):
        if isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                call = item.context_expr
                if (
                    isinstance(call, ast.Call)
                    and _callee(call.func) == "session_scope"
                    and isinstance(item.optional_vars, ast.Name)
                ):
                    names.add(item.optional_vars.id)
        elif isinstance(node, ast.arg) and _annotated_session(node.annotation):
            names.add(node.arg)
    return names


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def violations(source: str, path: str) -> list[Violation]:
    """Where ``source`` (the text of ``path``) builds a query, runs SQL or drives a session's
    rows itself instead of calling the registry's functions."""
    tree = ast.parse(source, filename=path)
    found: list[Violation] = []
    orm_names: set[str] = set()  # local names bound to an ORM module or query construct
    sessions = _session_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_orm(alias.name):
                    orm_names.add((alias.asname or alias.name).split(".")[0])
                    found.append(Violation(path, node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if _is_orm(node.module) and not _orm_name_allowed(node.module, alias.name):
                    orm_names.add(alias.asname or alias.name)
                    found.append(
                        Violation(path, node.lineno, f"from {node.module} import {alias.name}")
                    )
                elif node.module == "kiln.registry.db" and alias.name not in ALLOWED_DB_NAMES:
                    found.append(
                        Violation(path, node.lineno, f"from kiln.registry.db import {alias.name}")
                    )
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in orm_names:
            found.append(Violation(path, node.lineno, f"{func.id}() from the ORM"))
        elif isinstance(func, ast.Name) and func.id in ENGINE_FACTORIES:
            found.append(Violation(path, node.lineno, f"{func.id}(): an engine of its own"))
        elif isinstance(func, ast.Attribute):
            receiver = func.value
            base = receiver
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in orm_names:
                found.append(Violation(path, node.lineno, f"{ast.unparse(func)}() from the ORM"))
            elif func.attr in ENGINE_FACTORIES:
                found.append(Violation(path, node.lineno, f"{func.attr}(): an engine of its own"))
            elif isinstance(receiver, ast.Name) and receiver.id in sessions:
                if func.attr in SESSION_METHODS:
                    found.append(Violation(path, node.lineno, f"{receiver.id}.{func.attr}()"))
            elif func.attr in DB_VERBS:
                found.append(
                    Violation(path, node.lineno, f".{func.attr}() on {ast.unparse(receiver)}")
                )
    return sorted(found, key=lambda v: v.line)


def _scanned_files() -> list[Path]:
    files = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.is_relative_to(EXEMPT):
                files.append(path)
    return files


def test_nothing_outside_the_registry_queries_it() -> None:
    files = _scanned_files()
    assert len(files) > 50, "the walk found too few files: is ROOT right?"
    found = [v for path in files for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, (
        "these reach the registry past kiln.registry.crud / views (add or reuse a CRUD "
        "function there):\n" + "\n".join(map(str, found))
    )


# --- the rule bites: what callers once wrote inline, each flagged at its line
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            """
            def fingerprint(self):
                from sqlalchemy import text

                from kiln.registry.db import engine_for

                with engine_for(self.settings.db_url).connect() as conn:
                    rows = conn.execute(text("SELECT d.id FROM deployment d")).all()
                return rows
            """,
            [
                (3, "from sqlalchemy import text"),
                (5, "from kiln.registry.db import engine_for"),
                (7, "engine_for(): an engine of its own"),
                (8, ".execute() on conn"),
                (8, "text() from the ORM"),
            ],
        ),
        (
            """
            from sqlmodel import col, select

            def report(settings, model, version):
                with session_scope(settings.db_url) as s:
                    row = crud.require_version(session=s, name=model, version=version)
                    return s.exec(
                        select(OptimizationJob)
                        .where(OptimizationJob.version_id == row.id)
                        .order_by(col(OptimizationJob.id).desc())
                    ).first()
            """,
            [
                (2, "from sqlmodel import col"),
                (2, "from sqlmodel import select"),
                (7, "s.exec()"),
                (8, "select() from the ORM"),
                (10, "col() from the ORM"),
            ],
        ),
        (
            """
            def promote_now(settings, dep):
                with session_scope(settings.db_url) as session:
                    stable = session.get(ModelVersion, dep.stable_version_id)
                    stable.selected = True
                    session.add(stable)
                    session.refresh(stable)
                    session.commit()
            """,
            [(4, "session.get()"), (6, "session.add()"), (7, "session.refresh()")],
        ),
        (
            """
            import sqlalchemy as sa

            def rows(session: "Session"):
                return session.scalar(sa.select(sa.func.count()))
            """,
            [
                (2, "import sqlalchemy"),
                (5, "sa.func.count() from the ORM"),
                (5, "sa.select() from the ORM"),
                (5, "session.scalar()"),
            ],
        ),
    ],
    ids=["supervisor-raw-sql", "reoptimize-select", "session-rows", "module-alias"],
)
def test_an_inline_query_is_named_at_its_line(source: str, expected: list[tuple[int, str]]) -> None:
    found = violations(textwrap.dedent(source), "old.py")
    assert sorted((v.line, v.what) for v in found) == sorted(expected)
    assert str(found[0]).startswith(f"old.py:{found[0].line}: ")


def test_sessions_through_crud_and_type_imports_pass() -> None:
    source = """
        from sqlalchemy.exc import IntegrityError as DBIntegrityError
        from sqlmodel import Session

        from kiln.optimize.validate import select
        from kiln.registry import crud
        from kiln.registry.db import session_scope
        from kiln.registry.tables import ModelVersion

        def existing(session: Session, name: str) -> ModelVersion | None:
            return crud.get_model(session=session, name=name)

        def pick(base, reports, gates, doc: dict[str, str]):
            with session_scope("sqlite://") as session:
                crud.list_models(session=session)
                session.commit()
                session.expunge_all()
            return select(base, reports, gates), doc.get("key")
    """
    assert violations(textwrap.dedent(source), "new.py") == []
