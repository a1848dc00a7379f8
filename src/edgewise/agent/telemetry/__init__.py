"""On-device telemetry: windows of counts, latency, confidence, drift and resources.

The agent keeps one `WindowAggregator` per pipeline, feeds it served batches
(`observe`) and the runtime's cumulative stats (`observe_stats`), and buffers what
`close()` returns each window: records that already passed the egress policy.
`ResourceReaders` reads CPU, memory, temperature and throttling (injectable);
`reference_from_manifest` turns a bundle's `reference` into the drift baseline.
`TelemetryHub` holds the windows of every pipeline for the agent loop,
`EgressGate` holds records from local apps to the same policy, and
`MqttTelemetryUplink` uploads batches over MQTT instead of HTTP.
"""

from edgewise.agent.telemetry._capture import SampleCapture
from edgewise.agent.telemetry._drift import (
    DriftTracker,
    DriftWindow,
    KsTracker,
    reference_from_manifest,
)
from edgewise.agent.telemetry._gate import EgressGate
from edgewise.agent.telemetry._hub import PipelineInfo, TelemetryHub
from edgewise.agent.telemetry._mqtt import MqttTelemetryUplink
from edgewise.agent.telemetry._resources import ResourceReaders, read_memory, read_throttled
from edgewise.agent.telemetry._window import (
    COUNT_KEYS,
    FLEET_CONFIDENCE_EDGES,
    WindowAggregator,
    stats_delta,
)

__all__ = [
    "COUNT_KEYS",
    "FLEET_CONFIDENCE_EDGES",
    "DriftTracker",
    "DriftWindow",
    "EgressGate",
    "KsTracker",
    "MqttTelemetryUplink",
    "PipelineInfo",
    "ResourceReaders",
    "SampleCapture",
    "TelemetryHub",
    "WindowAggregator",
    "read_memory",
    "read_throttled",
    "reference_from_manifest",
    "stats_delta",
]
