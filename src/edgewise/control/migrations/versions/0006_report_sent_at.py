"""Devices remember when their stored report was built (`report_sent_at`).

A report that arrives after a newer one of the same device (a slow retry, or a replay
to another replica inside the signature's time window) no longer overwrites it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("report_sent_at", sa.Float(), nullable=True))


def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("report_sent_at")
