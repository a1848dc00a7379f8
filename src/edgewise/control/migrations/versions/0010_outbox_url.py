"""The outbox's `url` column, on databases migrated by 0009 as it first shipped.

Migration 0009 was changed after release to add `outbox.url` (alert notifications carry
their own receiver). A database migrated by the first 0009 is at revision 0009 without
the column, and every rollout event and alert then failed to be written ("no such
column: url"). This adds it where it is missing and does nothing elsewhere.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply."""
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("outbox")}
    if "url" not in columns:
        with op.batch_alter_table("outbox") as batch:
            batch.add_column(sa.Column("url", sa.String(length=2000), nullable=True))


def downgrade() -> None:
    """Revert: nothing (the column belongs to 0009 as it ships now)."""
