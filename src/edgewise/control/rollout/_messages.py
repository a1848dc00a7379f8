"""What goes into a rollout step (observations) and what comes out (actions).

Observations are facts the driver gathered since the last step: each device's latest
report for the rollout's target revision, and cohort telemetry for the current phase
and for a control cohort still on the old revision. Actions are what the driver must
do, in order, in the same transaction that stores the new rollout.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgewise.control.rollout._gates import CohortTelemetry

__all__ = [
    "Action",
    "DeviceReport",
    "NotifyDevices",
    "Observations",
    "RecordEvent",
    "ReportStatus",
    "RevertDevices",
    "SetStableRevision",
    "WakeAt",
]

Revision = int | str


class ReportStatus(enum.StrEnum):
    """A device's reported status for the target revision."""

    INSTALLING = "installing"
    HEALTHY = "healthy"  # installed and passed its health gate
    FAILED = "failed"
    REJECTED = "rejected"  # refused it (e.g. signature, requirements)
    # Cannot run it (an agent too old for its specs, a missing runtime or accelerator):
    # a fact about the device, not about the revision.
    INCOMPATIBLE = "incompatible"
    ROLLED_BACK = "rolled_back"  # installed, then rolled back on the device
    # Left the rollout's target during it (the driver's observation, not a report):
    # decommissioned, or relabelled out of the deployment's selector. Neither waited
    # for nor counted, whether notified yet or not.
    DEPARTED = "departed"


@dataclass(frozen=True)
class DeviceReport:
    """One device's latest status for the target revision.

    Attributes:
        status: What the device says.
        reason: Its explanation, kept for `rollout status`.
        at: When the device reported (the driver's clock); a report at or after the
            device's timeout does not save it from TIMED_OUT.
    """

    status: ReportStatus
    reason: str = ""
    at: float | None = None


@dataclass(frozen=True)
class Observations:
    """Everything a step may learn.

    Attributes:
        reports: Device id -> its latest report for `to_revision` (others are ignored).
        phase: Telemetry of the current phase's devices on the new revision.
        control: Telemetry of devices still on the old revision, same window.
        telemetry_phase: The phase index the telemetry was gathered for; telemetry for
            another phase than the current one is ignored (None: trust it).
        last_seen: For devices whose timeout has passed without an outcome: when each
            last reached the control plane (absent: never). One not seen since it was
            notified is offline, and held back rather than timed out; None: no facts,
            every such device times out.
    """

    reports: Mapping[str, DeviceReport] = field(default_factory=dict)
    phase: CohortTelemetry | None = None
    control: CohortTelemetry | None = None
    telemetry_phase: int | None = None
    last_seen: Mapping[str, float] | None = None


@dataclass(frozen=True)
class NotifyDevices:
    """Move these devices' desired state to `revision` (each device once per rollout)."""

    ids: tuple[str, ...]
    revision: Revision


@dataclass(frozen=True)
class RevertDevices:
    """Move these devices' desired state back to `revision` (the old one)."""

    ids: tuple[str, ...]
    revision: Revision


@dataclass(frozen=True)
class SetStableRevision:
    """The rollout completed: the deployment's stable revision is now `revision`."""

    deployment: str
    revision: Revision


@dataclass(frozen=True)
class RecordEvent:
    """Write an event (audit chain, alert suppression, status history)."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WakeAt:
    """Step again at `at` even if nothing is observed (soak end, timeout, rate window)."""

    at: float


Action = NotifyDevices | RevertDevices | SetStableRevision | RecordEvent | WakeAt
