"""Telemetry tables beside the control plane's own (`edgewise.control._schema`).

The raw, exactly-once log stays the control plane's `telemetry` table, keyed by
(device_id, seq). Window records are also written, decoded, to `telemetry_windows`
(fleet views read them by time without parsing the log), downsampled there by the
retention job. `telemetry_devices` holds per-device ingest facts (last received, drop
counters); `alert_rules` and `alerts` the alerting state, one `alerts` row per episode.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_ID = BigInteger().with_variant(Integer, "sqlite")

__all__ = ["alert_rules", "alerts", "metadata", "telemetry_devices", "telemetry_windows"]

metadata = MetaData()

telemetry_windows = Table(
    "telemetry_windows",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=True),  # null once downsampled
    Column("pipeline", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(64), nullable=False),
    Column("deployment", String(200), nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("downsampled", Boolean, nullable=False),
    Column("data", JSON, nullable=False),
    Index("ix_telemetry_windows_end", "end"),
    Index("ix_telemetry_windows_device", "device_id", "pipeline", "start"),
)

telemetry_devices = Table(
    "telemetry_devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("last_received", Float, nullable=False),
    Column("last_window_end", Float, nullable=True),
    Column("dropped", JSON, nullable=False),
)

alert_rules = Table(
    "alert_rules",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("rule", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("rule", String(100), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("scope", String(300), nullable=False),
    Column("state", String(16), nullable=False),
    Column("value", Float, nullable=True),
    Column("message", Text, nullable=False),
    Column("devices", JSON, nullable=False),
    Column("opened_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("notified", Boolean, nullable=False),
    Index("ix_alerts_rule_scope", "rule", "scope"),
    Index("ix_alerts_state", "state"),
)
