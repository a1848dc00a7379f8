"""Rollout, phase and device states, and their transition tables.

The tables are the documentation: a pair not listed is illegal, and `transition()` raises
`IllegalTransition` for it. Terminal states have no way out.

Rollout::

    pending ──> running ──> completed
                 │  ^  ├──> awaiting_approval ──(approve)──> running
                 │  │  └──> paused ──(resume)──> running
                 │  └───────────┘
                 └──> rolled_back | aborted | failed      (also from paused/awaiting)

Phase::

    pending ──> running ──> soaking ──> passed
       │           │           └──────> breached ──(resume: operator override)──> overridden
       └─> cancelled <──────────┘ (pending/running/soaking end as cancelled)

Device (for this rollout)::

    pending ──> notified ──> installing ──> succeeded ──> failed ──> rolled_back
                   │             │  └──────> timed_out (terminal: late reports ignored)
                   └─────────────┴─> succeeded | failed | timed_out | rolled_back
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "DEVICE_TRANSITIONS",
    "PHASE_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "TERMINAL_ROLLOUT_STATES",
    "DeviceRolloutState",
    "IllegalTransition",
    "PhaseState",
    "RolloutState",
    "is_valid_transition",
    "transition",
]


class IllegalTransition(ValueError):
    """A state change that the transition table does not allow."""


class RolloutState(enum.StrEnum):
    """Lifecycle of a rollout."""

    PENDING = "pending"  # created, no device notified yet
    RUNNING = "running"  # a phase is notifying devices or soaking
    PAUSED = "paused"  # stopped by a breach (on_breach=pause) or an operator
    AWAITING_APPROVAL = "awaiting_approval"  # a phase passed; the next needs approval
    COMPLETED = "completed"  # every phase passed: to_revision is the stable revision
    ROLLED_BACK = "rolled_back"  # every moved device sent back to from_revision
    ABORTED = "aborted"  # stopped by an operator; moved devices sent back too
    FAILED = "failed"  # the driver could not carry it on (e.g. revision gone)


class PhaseState(enum.StrEnum):
    """Lifecycle of one phase (canary or wave)."""

    PENDING = "pending"
    RUNNING = "running"  # notifying its devices, within the rate limit
    SOAKING = "soaking"  # every device notified; waiting out soak_s before the gates
    PASSED = "passed"
    BREACHED = "breached"  # a gate failed
    OVERRIDDEN = "overridden"  # breached, then an operator resumed: counts as passed
    CANCELLED = "cancelled"  # the rollout ended before this phase finished


class DeviceRolloutState(enum.StrEnum):
    """Where one device of the snapshot stands in this rollout."""

    PENDING = "pending"  # not notified yet: still on from_revision
    NOTIFIED = "notified"  # desired state moved to to_revision
    INSTALLING = "installing"  # the device reported an install in progress
    SUCCEEDED = "succeeded"  # installed and healthy on to_revision
    FAILED = "failed"  # failed, rejected, or rolled back on the device
    TIMED_OUT = "timed_out"  # no outcome within timeout_s; counts as failed, terminal
    ROLLED_BACK = "rolled_back"  # this rollout sent it back to from_revision
    # The device cannot run to_revision (its agent is too old for the specs, or it lacks
    # a runtime or accelerator) and keeps serving from_revision: not counted against
    # the gates, and not waited for. It installs once upgraded, and may still fail then.
    # So is a device that left the target during the rollout (decommissioned, or
    # relabelled out of the selector).
    HELD_BACK = "held_back"


_R, _P, _D = RolloutState, PhaseState, DeviceRolloutState
_ENDINGS = {_R.ROLLED_BACK, _R.ABORTED, _R.FAILED}

ROLLOUT_TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = {
    _R.PENDING: frozenset({_R.RUNNING, _R.ABORTED, _R.FAILED}),
    _R.RUNNING: frozenset({_R.PAUSED, _R.AWAITING_APPROVAL, _R.COMPLETED, *_ENDINGS}),
    _R.PAUSED: frozenset({_R.RUNNING, *_ENDINGS}),
    _R.AWAITING_APPROVAL: frozenset({_R.RUNNING, *_ENDINGS}),
    _R.COMPLETED: frozenset(),
    _R.ROLLED_BACK: frozenset(),
    _R.ABORTED: frozenset(),
    _R.FAILED: frozenset(),
}

PHASE_TRANSITIONS: Mapping[PhaseState, frozenset[PhaseState]] = {
    _P.PENDING: frozenset({_P.RUNNING, _P.CANCELLED}),
    _P.RUNNING: frozenset({_P.SOAKING, _P.BREACHED, _P.CANCELLED}),
    _P.SOAKING: frozenset({_P.PASSED, _P.BREACHED, _P.CANCELLED}),
    _P.BREACHED: frozenset({_P.OVERRIDDEN}),
    _P.PASSED: frozenset(),
    _P.OVERRIDDEN: frozenset(),
    _P.CANCELLED: frozenset(),
}

DEVICE_TRANSITIONS: Mapping[DeviceRolloutState, frozenset[DeviceRolloutState]] = {
    # HELD_BACK from PENDING: it left the target before its turn (not waited for).
    _D.PENDING: frozenset({_D.NOTIFIED, _D.HELD_BACK}),
    _D.NOTIFIED: frozenset(
        {_D.INSTALLING, _D.SUCCEEDED, _D.FAILED, _D.TIMED_OUT, _D.ROLLED_BACK, _D.HELD_BACK}
    ),
    _D.INSTALLING: frozenset({_D.SUCCEEDED, _D.FAILED, _D.TIMED_OUT, _D.ROLLED_BACK, _D.HELD_BACK}),
    # Not back to INSTALLING: its timeout ran from the notification, long past by then.
    _D.HELD_BACK: frozenset({_D.SUCCEEDED, _D.FAILED, _D.ROLLED_BACK}),
    # A healthy device may still fail later (crash, on-device rollback) or be sent back.
    _D.SUCCEEDED: frozenset({_D.FAILED, _D.ROLLED_BACK}),
    _D.FAILED: frozenset({_D.ROLLED_BACK}),
    _D.TIMED_OUT: frozenset(),
    _D.ROLLED_BACK: frozenset(),
}

_TABLES: dict[type[enum.StrEnum], Mapping[object, frozenset[object]]] = {
    RolloutState: ROLLOUT_TRANSITIONS,  # type: ignore[dict-item]
    PhaseState: PHASE_TRANSITIONS,  # type: ignore[dict-item]
    DeviceRolloutState: DEVICE_TRANSITIONS,  # type: ignore[dict-item]
}

TERMINAL_ROLLOUT_STATES = frozenset(s for s, nxt in ROLLOUT_TRANSITIONS.items() if not nxt)


def is_valid_transition(old: enum.StrEnum, new: enum.StrEnum) -> bool:
    """Whether the table of `old`'s kind allows `old -> new` (staying put is not a move)."""
    if type(old) is not type(new) or type(old) not in _TABLES:
        return False
    return new in _TABLES[type(old)][old]


S = TypeVar("S", RolloutState, PhaseState, DeviceRolloutState)


def transition(old: S, new: S) -> S:
    """Return `new` if `old -> new` is legal.

    Raises:
        IllegalTransition: naming both states.
    """
    if not is_valid_transition(old, new):
        raise IllegalTransition(f"{type(old).__name__}: {old.value} -> {new.value} is not allowed")
    return new
