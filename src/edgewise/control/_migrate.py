"""Schema migrations (Alembic, shipped inside the package) applied at start.

Before touching anything, `migrate` reads which revision the database is at and refuses,
with a `SchemaError` that says what to do, a database this edgewise must not migrate:

- one a newer edgewise already migrated (a revision this build does not know: the binary
  was rolled back): running old code on it would miss columns the newer code relies on,
  and downgrading would drop data, so nothing is changed;
- one that holds other tables but no edgewise revision (a wrong --db URL): edgewise
  would otherwise create its tables among someone else's.

The upgrade is one transaction on both databases, so a start killed half-way (or a
migration that fails on existing data) leaves the database at the revision it started
from, and the next start simply runs it again:

- PostgreSQL DDL is transactional. Several replicas may start at once on one database:
  the upgrade runs under a PostgreSQL advisory lock so exactly one of them migrates and
  the others wait and then find the schema current.
- SQLite DDL is transactional too, but Python's sqlite3 module only opens a transaction
  before INSERT/UPDATE/DELETE, so Alembic's CREATE/ALTER/DROP statements were each
  committed on their own (a failure at 0009 left 0002-0008 committed; a kill inside a
  batch table rebuild left a half-built `_alembic_tmp_*` table that stopped every later
  start). Here the upgrade opens the transaction itself (`BEGIN IMMEDIATE`, which also
  makes a second process on the same file wait rather than migrate alongside).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

__all__ = [
    "SchemaError",
    "alembic_config",
    "head_revision",
    "known_revisions",
    "migrate",
    "schema_problem",
    "schema_revision",
    "schema_status",
]

_MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_ID = 0x65647765  # "edwe": an arbitrary constant shared by all replicas
_VERSION_TABLE = "alembic_version"
_EDGEWISE_TABLES = frozenset({"meta", "devices", "tokens", "audit"})  # since 0001


class SchemaError(Exception):
    """The database is not one this edgewise may migrate; the message says what to do."""


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The schema revision this edgewise builds (its newest migration)."""
    head = _scripts().get_current_head()
    assert head is not None  # the package ships at least one migration
    return head


def known_revisions() -> frozenset[str]:
    """Every schema revision this edgewise's migrations know."""
    return frozenset(s.revision for s in _scripts().walk_revisions())


def schema_revision(conn: Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    return MigrationContext.configure(conn).get_current_revision()


def schema_problem(
    found: str | None, tables: Collection[str], known: Collection[str], head: str
) -> str | None:
    """Why a database at revision `found` holding `tables` must not be migrated (pure).

    None when it may: an empty database, or one at a revision this edgewise knows.
    """
    if found is None:
        others = sorted(t for t in tables if t != _VERSION_TABLE)
        if not others:
            return None
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        return (
            f"the database holds {len(others)} table(s) ({shown}) but no edgewise schema "
            "revision: it is not an edgewise database. Point --db at an empty database "
            "(or a new SQLite file) or at an existing edgewise database; nothing was changed"
        )
    if found in known:
        return None
    if not _EDGEWISE_TABLES.issubset(tables):  # another application's Alembic revision
        return (
            f"the database is at schema revision {found} of another application (it has "
            "no edgewise tables): it is not an edgewise database. Point --db at an empty "
            "database or at an existing edgewise database; nothing was changed"
        )
    return (
        f"the database schema is at revision {found}, newer than this edgewise knows "
        f"(its newest is {head}): a newer edgewise migrated it. Run that newer edgewise "
        "again, or restore the backup taken before the upgrade to run this one; nothing "
        "was changed"
    )


def _status(conn: Connection) -> tuple[str | None, str | None]:
    found = schema_revision(conn)
    tables = inspect(conn).get_table_names()
    return found, schema_problem(found, tables, known_revisions(), head_revision())


def schema_status(engine: Engine) -> tuple[str | None, str | None]:
    """The database's revision (None: never migrated) and why it must not be migrated.

    Reads only; the second item is None when `migrate` may proceed.
    """
    with engine.connect() as conn:
        return _status(conn)


def _check(conn: Connection) -> str | None:
    """The database's revision; raises `SchemaError` when it must not be migrated."""
    found, problem = _status(conn)
    if problem is not None:
        raise SchemaError(problem)
    return found


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to `revision`, in one transaction.

    Raises:
        SchemaError: a newer edgewise migrated the database, or it is not an edgewise
            database (see the module docstring); nothing was changed.
    """
    cfg = alembic_config()
    target = head_revision() if revision == "head" else revision
    with engine.connect() as conn:
        # A database already current needs no lock: no write at all (a SQLite file
        # another process is writing, or a replica starting beside a busy one).
        if _check(conn) == target:
            return
        conn.rollback()
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_ID})
            conn.commit()
        try:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # see the module docstring
            _check(conn)  # again: another process may have migrated meanwhile
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            conn.rollback()
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_ID})
                conn.commit()
