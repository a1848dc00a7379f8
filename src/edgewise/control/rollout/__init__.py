"""The rollout engine (pure): phases, gates, states and `step`.

No I/O here: the control plane's driver loads a `Rollout`, gathers `Observations`,
calls `step(rollout, observations, now)` and carries out the returned actions in the
same transaction that stores the new rollout. Modules: `_model` (states and transition
tables), `_phases` (canary and waves), `_gates` (gate arithmetic), `_spec` (what an
operator asks), `_numbers` (the bounds on its numbers), `_state` (the rollout record),
`_messages` (observations and actions), `_engine` (`step`), `_commands` (pause, resume,
approve, abort, rollback, fail).
"""

from edgewise.control.rollout._commands import abort, approve, fail, pause, resume, rollback
from edgewise.control.rollout._engine import OFFLINE, create_rollout, step
from edgewise.control.rollout._gates import (
    CohortTelemetry,
    GateEvaluation,
    GateOutcome,
    GateResult,
    GateSpec,
    evaluate_gates,
)
from edgewise.control.rollout._messages import (
    Action,
    DeviceReport,
    NotifyDevices,
    Observations,
    RecordEvent,
    ReportStatus,
    RevertDevices,
    SetStableRevision,
    WakeAt,
)
from edgewise.control.rollout._model import (
    DEVICE_TRANSITIONS,
    PHASE_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    TERMINAL_ROLLOUT_STATES,
    DeviceRolloutState,
    IllegalTransition,
    PhaseState,
    RolloutState,
    is_valid_transition,
    transition,
)
from edgewise.control.rollout._phases import canary_size, plan_phases
from edgewise.control.rollout._spec import RolloutSpec
from edgewise.control.rollout._state import DeviceStatus, HistoryEntry, Rollout

__all__ = [
    "DEVICE_TRANSITIONS",
    "OFFLINE",
    "PHASE_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "TERMINAL_ROLLOUT_STATES",
    "Action",
    "CohortTelemetry",
    "DeviceReport",
    "DeviceRolloutState",
    "DeviceStatus",
    "GateEvaluation",
    "GateOutcome",
    "GateResult",
    "GateSpec",
    "HistoryEntry",
    "IllegalTransition",
    "NotifyDevices",
    "Observations",
    "PhaseState",
    "RecordEvent",
    "ReportStatus",
    "RevertDevices",
    "Rollout",
    "RolloutSpec",
    "RolloutState",
    "SetStableRevision",
    "WakeAt",
    "abort",
    "approve",
    "canary_size",
    "create_rollout",
    "evaluate_gates",
    "fail",
    "is_valid_transition",
    "pause",
    "plan_phases",
    "resume",
    "rollback",
    "step",
    "transition",
]
