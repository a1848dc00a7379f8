"""The egress policy: what telemetry may leave a device, and when raw inputs may be captured.

A deployment carries an egress policy; it reaches the device in the desired state's
`egress` field (`EgressPolicy.model_validate(desired.egress)`, an empty dict meaning the
defaults). The agent applies `filter_payload` to every record *before* it is buffered,
so nothing outside the policy is ever stored on the device for upload, let alone sent.

Telemetry groups (`TELEMETRY_GROUPS`): a `window` metric record holds one section per
group (`counts`, `latency`, ...); events and samples are groups of their own. Groups not
allowed are cut out of a record (or drop the record entirely when nothing is left).

Raw input capture is off by default. When on, an input is captured when a trigger fires
(window drift score above `drift_above`, or top-1 confidence below `confidence_below`:
the hard examples) or, at random, at `rate`; always within a budget of samples per hour
and bytes per day, and with the `redact` fields removed.

Example:
    >>> policy = EgressPolicy(groups=["events", "counts"], redact=["serial"])
    >>> filter_payload(policy, "metric", "window", {"pipeline": "p", "counts": {"ok": 3},
    ...     "latency": {}, "serial": "X1"})
    {'pipeline': 'p', 'counts': {'ok': 3}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgewise.protocol._telemetry import TelemetryRecord

__all__ = [
    "DEFAULT_GROUPS",
    "TELEMETRY_GROUPS",
    "CaptureBudget",
    "CaptureDecision",
    "CapturePolicy",
    "EgressPolicy",
    "TelemetryGroup",
    "decide_capture",
    "filter_payload",
    "filter_record",
    "record_groups",
    "redact",
]

TelemetryGroup = Literal[
    "events",
    "counts",
    "latency",
    "confidence",
    "features",
    "drift",
    "resources",
    "queues",
    "uplink",
    "samples",
]
TELEMETRY_GROUPS: tuple[TelemetryGroup, ...] = (
    "events",
    "counts",
    "latency",
    "confidence",
    "features",
    "drift",
    "resources",
    "queues",
    "uplink",
    "samples",
)
# Everything but raw samples: aggregates reveal no individual input.
DEFAULT_GROUPS: tuple[TelemetryGroup, ...] = TELEMETRY_GROUPS[:-1]

# Sections of a `window` metric record and the group each belongs to. Keys not listed
# here (pipeline, model, version, window bounds) identify the record and always stay.
_SECTION_GROUP: dict[str, TelemetryGroup] = {
    "counts": "counts",
    "latency": "latency",
    "confidence": "confidence",
    "features": "features",
    "drift": "drift",
    "ks": "drift",
    "resources": "resources",
    "queues": "queues",
    "uplink": "uplink",
}
# Other metric kinds (the agent's own records) as a whole.
_KIND_GROUP: dict[str, TelemetryGroup] = {
    "agent.resources": "resources",
    "pipeline.stats": "counts",
}
_HOUR = 3600.0
_DAY = 86400.0


class CapturePolicy(BaseModel):
    """When raw inputs may be captured and sent (off unless `enabled`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    rate: float = Field(default=0.0, ge=0.0, le=1.0, description="random share of inputs")
    drift_above: float | None = Field(default=None, ge=0.0, description="window drift score")
    confidence_below: float | None = Field(default=None, ge=0.0, le=1.0)
    max_samples_per_hour: int = Field(default=60, ge=0)
    max_bytes_per_day: int = Field(default=10 * 1024 * 1024, ge=0)


class EgressPolicy(BaseModel):
    """Which telemetry groups may leave the device, what is redacted, what is captured."""

    model_config = ConfigDict(extra="forbid")

    groups: list[TelemetryGroup] = Field(default_factory=lambda: list(DEFAULT_GROUPS))
    redact: list[str] = Field(
        default_factory=list,
        description="field names (any depth) or dotted paths removed from every record",
    )
    capture: CapturePolicy = Field(default_factory=CapturePolicy)

    @field_validator("redact")
    @classmethod
    def _non_empty(cls, fields: list[str]) -> list[str]:
        if any(not f or f.startswith(".") or f.endswith(".") for f in fields):
            raise ValueError("redacted fields must be non-empty names or dotted paths")
        return fields

    def allows(self, group: TelemetryGroup) -> bool:
        """Whether a group may leave the device (samples also need capture enabled)."""
        if group == "samples":
            return "samples" in self.groups and self.capture.enabled
        return group in self.groups

    @classmethod
    def from_desired(cls, egress: Mapping[str, Any] | None) -> EgressPolicy:
        """The policy of a desired state's `egress` field (empty or None: defaults).

        Raises:
            pydantic.ValidationError: the field does not hold a valid policy.
        """
        return cls.model_validate(dict(egress or {}))


def record_groups(cls: str, kind: str, data: Mapping[str, Any]) -> set[TelemetryGroup]:
    """The groups a record's payload belongs to."""
    if cls == "event":
        return {"events"}
    if cls == "sample":
        return {"samples"}
    if kind in _KIND_GROUP:
        return {_KIND_GROUP[kind]}
    return {_SECTION_GROUP[k] for k in data if k in _SECTION_GROUP}


def _redact_value(value: Any, names: frozenset[str], paths: tuple[tuple[str, ...], ...]) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in names:
                continue
            sub = tuple(p[1:] for p in paths if p[0] == k)
            if any(not p for p in sub):
                continue
            out[k] = _redact_value(v, names, tuple(p for p in sub if p))
        return out
    if isinstance(value, list):
        return [_redact_value(v, names, paths) for v in value]
    return value


def redact(data: Mapping[str, Any], fields: list[str]) -> dict[str, Any]:
    """A copy of `data` without the given fields.

    A plain name (`serial`) removes that key at any depth; a dotted path
    (`input.face`) removes exactly that key.
    """
    if not fields:
        return dict(data)  # the common case: nothing to walk
    names = frozenset(f for f in fields if "." not in f)
    paths = tuple(tuple(f.split(".")) for f in fields if "." in f)
    out: dict[str, Any] = _redact_value(data, names, paths)
    return out


def filter_payload(
    policy: EgressPolicy, cls: str, kind: str, data: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The payload as it may leave the device, or None when none of it may.

    Args:
        policy: The egress policy in force.
        cls: Record class ("event", "metric", "sample").
        kind: Record kind ("window", "drift.alarm", ...).
        data: The payload.

    Returns:
        The filtered, redacted payload; None if the record must not be buffered at all.
    """
    if cls in ("event", "sample"):
        if not policy.allows("events" if cls == "event" else "samples"):
            return None
        return redact(data, policy.redact)
    if kind in _KIND_GROUP:
        return redact(data, policy.redact) if policy.allows(_KIND_GROUP[kind]) else None
    kept = {
        k: v for k, v in data.items() if k not in _SECTION_GROUP or policy.allows(_SECTION_GROUP[k])
    }
    if any(k in _SECTION_GROUP for k in data) and not any(k in _SECTION_GROUP for k in kept):
        return None  # only identity keys left: nothing worth sending
    return redact(kept, policy.redact)


def filter_record(policy: EgressPolicy, record: TelemetryRecord) -> TelemetryRecord | None:
    """`filter_payload` over a whole record (same seq, class, time and kind)."""
    data = filter_payload(policy, record.cls, record.kind, record.data)
    return None if data is None else record.model_copy(update={"data": data})


@dataclass(frozen=True)
class CaptureBudget:
    """What capture has spent: samples this hour, bytes this day (plain, immutable).

    The hour and the day are fixed buckets of the device clock (`now // 3600`), so the
    budget cannot be drained faster by capturing across a sliding boundary twice.
    """

    hour: int = -1
    samples_this_hour: int = 0
    day: int = -1
    bytes_this_day: int = 0

    def rolled(self, now: float) -> CaptureBudget:
        """The budget with buckets that ended before `now` reset."""
        hour, day = math.floor(now / _HOUR), math.floor(now / _DAY)
        out = self
        if hour != self.hour:
            out = replace(out, hour=hour, samples_this_hour=0)
        if day != self.day:
            out = replace(out, day=day, bytes_this_day=0)
        return out

    def spend(self, size_bytes: int) -> CaptureBudget:
        """The budget after capturing one sample of `size_bytes`."""
        return replace(
            self,
            samples_this_hour=self.samples_this_hour + 1,
            bytes_this_day=self.bytes_this_day + size_bytes,
        )


@dataclass(frozen=True)
class CaptureDecision:
    """Whether to capture one input, and why (the trigger or the refusal)."""

    capture: bool
    reason: str


def decide_capture(
    policy: EgressPolicy,
    budget: CaptureBudget,
    now: float,
    size_bytes: int,
    draw: float,
    confidence: float | None = None,
    drift_score: float | None = None,
) -> tuple[CaptureDecision, CaptureBudget]:
    """Decide whether one input is captured (pure; the random draw is passed in).

    Args:
        policy: The egress policy in force.
        budget: Capture spent so far.
        now: Device clock, seconds.
        size_bytes: Size of the sample payload if captured.
        draw: A uniform random number in [0, 1) for rate sampling.
        confidence: The input's top-1 confidence, if known.
        drift_score: The pipeline's latest window drift score, if known.

    Returns:
        The decision and the budget after it (unchanged unless captured).
    """
    cap = policy.capture
    if not policy.allows("samples"):
        return CaptureDecision(False, "capture off"), budget
    reason = ""
    low = cap.confidence_below
    if low is not None and confidence is not None and confidence < low:
        reason = "low confidence"
    high = cap.drift_above
    if not reason and high is not None and drift_score is not None and drift_score > high:
        reason = "drift"
    if not reason and draw < cap.rate:
        reason = "sampled"
    if not reason:
        return CaptureDecision(False, "not triggered"), budget
    budget = budget.rolled(now)
    if budget.samples_this_hour >= cap.max_samples_per_hour:
        return CaptureDecision(False, "hourly sample budget spent"), budget
    if budget.bytes_this_day + size_bytes > cap.max_bytes_per_day:
        return CaptureDecision(False, "daily byte budget spent"), budget
    return CaptureDecision(True, reason), budget.spend(size_bytes)
