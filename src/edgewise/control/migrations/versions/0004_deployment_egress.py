"""Deployments and their revisions carry an optional egress policy (issue 7).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply."""
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.add_column(sa.Column("egress", sa.JSON(), nullable=True))
    with op.batch_alter_table("deployment_revisions") as batch_op:
        batch_op.add_column(sa.Column("egress", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table("deployment_revisions") as batch_op:
        batch_op.drop_column("egress")
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.drop_column("egress")
