"""Telemetry on the control plane: window figures, fleet views, alerts, retention.

The pure cores: `WindowFigures` (a stored window record read back), `fleet_view` and
`cohort_figures` (what operators and rollout gates see), `evaluate_rules` (alerts),
`plan_retention` and `merge_window_data` (downsampling).

The shell around them: `decode_upload` (upload bodies to `TelemetryColumns`),
`TelemetryIngest` (exactly-once batched writes), `GroupCommit` (concurrent HTTP uploads
share transactions), `MqttIngest` (the shared-subscription MQTT consumer),
`TelemetryService` (views, alerts, webhooks, retention over SQL) and `FleetCollector`
(the `/metrics` fleet gauges). The HTTP routes are in `_api` (`router`), included by
the application.
"""

from edgewise.control.telemetry._admission import IngestBudget
from edgewise.control.telemetry._alerts import (
    ALERT_TRANSITIONS,
    ActiveRollout,
    AlertChange,
    AlertFigures,
    AlertRule,
    AlertState,
    BurnRateRule,
    DriftRule,
    FreshnessRule,
    IllegalAlertTransition,
    evaluate_rules,
    parse_rule,
    transition,
)
from edgewise.control.telemetry._decode import TelemetryColumns, decode_upload
from edgewise.control.telemetry._figures import (
    WindowFigures,
    histogram_quantile,
    merge_counts,
    merge_latency,
)
from edgewise.control.telemetry._group import GroupCommit
from edgewise.control.telemetry._ingest import IngestResult, TelemetryIngest
from edgewise.control.telemetry._metrics import FleetCollector
from edgewise.control.telemetry._mqtt import (
    ACK_TOPIC,
    SHARED_SUBSCRIPTION,
    TELEMETRY_TOPIC,
    MqttIngest,
    MqttIngestStats,
)
from edgewise.control.telemetry._reference import reference_of
from edgewise.control.telemetry._retention import (
    MergeGroup,
    RetentionPlan,
    RetentionPolicy,
    WindowMeta,
    merge_window_data,
    plan_retention,
)
from edgewise.control.telemetry._service import TelemetryService, post_webhook
from edgewise.control.telemetry._views import (
    FleetRow,
    cohort_figures,
    fleet_view,
    group_key,
    merged_drift,
)

__all__ = [
    "ACK_TOPIC",
    "ALERT_TRANSITIONS",
    "SHARED_SUBSCRIPTION",
    "TELEMETRY_TOPIC",
    "ActiveRollout",
    "AlertChange",
    "AlertFigures",
    "AlertRule",
    "AlertState",
    "BurnRateRule",
    "DriftRule",
    "FleetCollector",
    "FleetRow",
    "FreshnessRule",
    "GroupCommit",
    "IllegalAlertTransition",
    "IngestBudget",
    "IngestResult",
    "MergeGroup",
    "MqttIngest",
    "MqttIngestStats",
    "RetentionPlan",
    "RetentionPolicy",
    "TelemetryColumns",
    "TelemetryIngest",
    "TelemetryService",
    "WindowFigures",
    "WindowMeta",
    "cohort_figures",
    "decode_upload",
    "evaluate_rules",
    "fleet_view",
    "group_key",
    "histogram_quantile",
    "merge_counts",
    "merge_latency",
    "merge_window_data",
    "merged_drift",
    "parse_rule",
    "plan_retention",
    "post_webhook",
    "reference_of",
    "transition",
]
