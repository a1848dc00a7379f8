"""Telemetry tables: declared with the control plane's schema (`edgewise.control._schema`).

The raw, exactly-once log is the control plane's `telemetry` table, keyed by
(device_id, seq). Window records are also written, decoded, to `telemetry_windows`
(fleet views read them by time without parsing the log), downsampled there by the
retention job. `telemetry_devices` holds per-device ingest facts (last received, drop
counters); `alert_rules` and `alerts` the alerting state, one `alerts` row per episode.
Migration `0003_telemetry` creates them.
"""

from __future__ import annotations

from edgewise.control._schema import (
    alert_rules,
    alerts,
    metadata,
    telemetry_devices,
    telemetry_windows,
)

__all__ = ["alert_rules", "alerts", "metadata", "telemetry_devices", "telemetry_windows"]
