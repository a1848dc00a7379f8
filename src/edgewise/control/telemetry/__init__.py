"""Telemetry on the control plane: window figures, fleet views, alerts, retention.

The pure cores: `WindowFigures` (a stored window record read back), `fleet_view` and
`cohort_figures` (what operators and rollout gates see), `evaluate_rules` (alerts),
`plan_retention` and `merge_window_data` (downsampling).
"""

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
from edgewise.control.telemetry._figures import (
    WindowFigures,
    histogram_quantile,
    merge_counts,
    merge_latency,
)
from edgewise.control.telemetry._retention import (
    MergeGroup,
    RetentionPlan,
    RetentionPolicy,
    WindowMeta,
    merge_window_data,
    plan_retention,
)
from edgewise.control.telemetry._views import (
    FleetRow,
    cohort_figures,
    fleet_view,
    group_key,
    merged_drift,
)

__all__ = [
    "ALERT_TRANSITIONS",
    "ActiveRollout",
    "AlertChange",
    "AlertFigures",
    "AlertRule",
    "AlertState",
    "BurnRateRule",
    "DriftRule",
    "FleetRow",
    "FreshnessRule",
    "IllegalAlertTransition",
    "MergeGroup",
    "RetentionPlan",
    "RetentionPolicy",
    "WindowFigures",
    "WindowMeta",
    "cohort_figures",
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
    "transition",
]
