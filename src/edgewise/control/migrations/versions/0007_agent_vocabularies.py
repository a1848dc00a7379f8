"""Agents' spec vocabularies, stored once per distinct set of terms.

An agent reports which pipeline-spec terms it understands once per start, and their
digest in every report; devices running one agent build share one row here, and a
device's stored report keeps only the digest.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply."""
    op.create_table(
        "agent_vocabularies",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("terms", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Revert."""
    op.drop_table("agent_vocabularies")
