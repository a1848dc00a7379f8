"""Schema migrations (Alembic, shipped inside the package) applied at start.

Several replicas may start at once on one PostgreSQL database: the upgrade runs under a
PostgreSQL advisory lock so exactly one of them migrates and the others wait and find the
schema current.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

__all__ = ["alembic_config", "migrate"]

_MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_ID = 0x65647765  # "edwe": an arbitrary constant shared by all replicas


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to `revision`."""
    cfg = alembic_config()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_ID})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_ID})
                conn.commit()
