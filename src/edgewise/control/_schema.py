"""The control plane's SQL tables (SQLAlchemy Core), the current shape of the schema.

Migrations under `migrations/versions/` are the history that builds this shape; a test
checks that a migrated database matches these tables. JSON columns hold plain dicts.
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

__all__ = [
    "agent_vocabularies",
    "alert_rules",
    "alerts",
    "audit",
    "audit_head",
    "deployment_revisions",
    "deployments",
    "device_pipelines",
    "devices",
    "enroll_tokens",
    "meta",
    "metadata",
    "models",
    "publisher_keys",
    "rollout_assignments",
    "rollout_notifications",
    "rollouts",
    "telemetry",
    "telemetry_devices",
    "telemetry_windows",
    "tokens",
]

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("scope", String(1000), nullable=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("revoked_at", Float, nullable=True),
)

publisher_keys = Table(
    "publisher_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("public_key", String(100), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

enroll_tokens = Table(
    "enroll_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("labels", JSON, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("max_uses", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("revoked", Boolean, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("public_key", String(100), nullable=False, unique=True),
    Column("labels", JSON, nullable=False),
    Column("capabilities", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("enrolled_at", Float, nullable=False),
    Column("last_seen", Float, nullable=True),
    # Every change another replica must notice (labels, status, desired) bumps changed_at.
    Column("changed_at", Float, nullable=False),
    Column("desired_revision", Integer, nullable=False),
    Column("desired_hash", String(64), nullable=False),
    Column("desired_signed", JSON, nullable=True),
    Column("report_revision", Integer, nullable=True),
    Column("report_errors", JSON, nullable=True),
    Column("report_agent", JSON, nullable=True),
    Column("reported_at", Float, nullable=True),
    # The stored report's `sent_at`: a report older than it is ignored (newest wins).
    Column("report_sent_at", Float, nullable=True),
    Column("telemetry_acked", BigInteger, nullable=False),
    Index("ix_devices_changed_at", "changed_at"),
)

# The pipeline-spec terms agents reported they understand, once per distinct set (the
# devices of one agent build share a row); a device's `report_agent` holds the digest.
agent_vocabularies = Table(
    "agent_vocabularies",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("terms", JSON, nullable=False),
    Column("first_seen", Float, nullable=False),
    # When a report last carried these terms (an agent sends them once per start); rows
    # stored before migration 0008 have none: first_seen stands in.
    Column("last_seen", Float, nullable=True),
)

device_pipelines = Table(
    "device_pipelines",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("pipeline", String(200), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("version", String(64), nullable=False),
    Column("slot", String(1), nullable=True),
    Column("status", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("timeline", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("signers", JSON, nullable=False),
    Column("yanked", Boolean, nullable=False),
    Column("pushed_at", Float, nullable=False),
    Column("pushed_by", String(200), nullable=False),
    Index("ix_models_sha256", "sha256"),
)

deployments = Table(
    "deployments",
    metadata,
    # seq orders deployments by creation: newer wins ties in the layered merge.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("selector", String(2000), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("pipelines", JSON, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    # The revision devices outside a rollout get (its pipelines are the row's).
    Column("stable_revision", Integer, nullable=False, server_default="1"),
    # The stable revision's egress policy; NULL: the server's default applies.
    Column("egress", JSON, nullable=True),
)

audit = Table(
    "audit",
    metadata,
    # seq is the record's chain id: consecutive from 1.
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Float, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("object", String(500), nullable=False),
    Column("request_digest", String(64), nullable=False),
    Column("result", String(200), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# One row (id=1): the chain head, locked while appending so replicas append in turn.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("cls", String(8), nullable=False),
    Column("ts", Float, nullable=False),
    Column("kind", String(200), nullable=False),
    Column("data", JSON, nullable=False),
    Column("received_at", Float, nullable=False),
    # Retention reads the log by received_at; a BRIN index, nearly free to keep up as
    # it grows in insertion order (migration 0005 says why not (device_id, ts)).
    Index("ix_telemetry_received_at", "received_at", postgresql_using="brin"),
)

# ---------------------------------------------------------------- rollouts
# Every update of a deployment is an immutable revision; deployments.stable_revision
# names the one devices outside a rollout get (the deployments row holds its pipelines).
deployment_revisions = Table(
    "deployment_revisions",
    metadata,
    Column("deployment_id", String(32), primary_key=True),
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("pipelines", JSON, nullable=False),
    Column("egress", JSON, nullable=True),
    Column("content_hash", String(64), nullable=False),
    Column("note", String(500), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("deployment_id", String(32), nullable=False),
    # = deployment_id while the rollout is active, NULL after: one active per deployment.
    Column("active_key", String(32), nullable=True, unique=True),
    Column("from_revision", Integer, nullable=False),
    Column("to_revision", Integer, nullable=False),
    Column("state", String(24), nullable=False),
    Column("document", JSON, nullable=False),
    # Compare-and-set counter: every committed step or command bumps it.
    Column("version", Integer, nullable=False),
    Column("wake_at", Float, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_rollouts_state", "state"),
)

# Devices a rollout moved: their desired state uses this revision of the deployment.
rollout_assignments = Table(
    "rollout_assignments",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("deployment_id", String(32), primary_key=True),
    Column("rollout_id", String(32), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_rollout_assignments_rollout", "rollout_id"),
)

# One row per notification; the primary key makes a second notify of a device in the
# same rollout impossible to commit.
rollout_notifications = Table(
    "rollout_notifications",
    metadata,
    Column("rollout_id", String(32), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),
    Column("revision", Integer, nullable=False),
    Column("at", Float, nullable=False),
)

# Notifications for operators (rollout events, alert changes), written in the
# transaction that made them happen and posted by whichever replica claims them first.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(64), nullable=False),
    Column("url", String(2000), nullable=True),  # None: the server's rollout webhook
    Column("payload", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("due_at", Float, nullable=False),  # next attempt; a claim moves it on
    Column("attempts", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | dropped
    Column("done_at", Float, nullable=True),
    Column("last_error", String(500), nullable=True),
    Index("ix_outbox_state_due", "state", "due_at"),
)

# Telemetry (issue 7; read and written by `edgewise.control.telemetry`). Window records
# decoded for fleet views and downsampled by retention; per-device ingest facts; alerting.
# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id.
_TELEMETRY_ID = BigInteger().with_variant(Integer, "sqlite")

telemetry_windows = Table(
    "telemetry_windows",
    metadata,
    Column("id", _TELEMETRY_ID, primary_key=True, autoincrement=True),
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
    Column("id", _TELEMETRY_ID, primary_key=True, autoincrement=True),
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
