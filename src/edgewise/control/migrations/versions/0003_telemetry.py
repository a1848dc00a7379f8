"""Telemetry: decoded windows, per-device ingest facts, alert rules and alerts (issue 7).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Apply."""
    op.create_table(
        "telemetry_windows",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("deployment", sa.String(200), nullable=False),
        sa.Column("start", sa.Float(), nullable=False),
        sa.Column("end", sa.Float(), nullable=False),
        sa.Column("downsampled", sa.Boolean(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_telemetry_windows_end", "telemetry_windows", ["end"])
    op.create_index(
        "ix_telemetry_windows_device", "telemetry_windows", ["device_id", "pipeline", "start"]
    )
    op.create_table(
        "telemetry_devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("last_received", sa.Float(), nullable=False),
        sa.Column("last_window_end", sa.Float(), nullable=True),
        sa.Column("dropped", sa.JSON(), nullable=False),
    )
    op.create_table(
        "alert_rules",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("rule", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("notified", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_alerts_rule_scope", "alerts", ["rule", "scope"])
    op.create_index("ix_alerts_state", "alerts", ["state"])


def downgrade() -> None:
    """Revert."""
    op.drop_index("ix_alerts_state", "alerts")
    op.drop_index("ix_alerts_rule_scope", "alerts")
    op.drop_table("alerts")
    op.drop_table("alert_rules")
    op.drop_table("telemetry_devices")
    op.drop_index("ix_telemetry_windows_device", "telemetry_windows")
    op.drop_index("ix_telemetry_windows_end", "telemetry_windows")
    op.drop_table("telemetry_windows")
