"""Agents' spec vocabularies remember when they were last sent (`last_seen`).

The retention job forgets a vocabulary no device's stored report names once it has not
been sent for a day, so a device making up vocabularies cannot grow the table for ever.
Rows from before this revision count as last sent when first seen.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply."""
    with op.batch_alter_table("agent_vocabularies") as batch:
        batch.add_column(sa.Column("last_seen", sa.Float(), nullable=True))


def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table("agent_vocabularies") as batch:
        batch.drop_column("last_seen")
