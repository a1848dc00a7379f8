"""Alembic environment: runs on the connection the control plane hands over."""

from __future__ import annotations

from alembic import context

from edgewise.control._schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` CLI use, not supported
    raise RuntimeError("run migrations through edgewise.control.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
