from __future__ import annotations

import pytest

import edgewise.control.rollout as rollout_pkg
from edgewise.control.rollout import (
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


@pytest.mark.parametrize(
    ("enum", "table"),
    [
        (RolloutState, ROLLOUT_TRANSITIONS),
        (PhaseState, PHASE_TRANSITIONS),
        (DeviceRolloutState, DEVICE_TRANSITIONS),
    ],
)
def test_every_state_has_a_row_and_no_self_loops(enum: type, table: dict) -> None:  # type: ignore[type-arg]
    assert set(table) == set(enum)
    for state, targets in table.items():
        assert state not in targets
        assert all(isinstance(t, enum) for t in targets)


def test_terminal_rollout_states() -> None:
    assert {
        RolloutState.COMPLETED,
        RolloutState.ROLLED_BACK,
        RolloutState.ABORTED,
        RolloutState.FAILED,
    } == TERMINAL_ROLLOUT_STATES


def test_timed_out_device_is_terminal() -> None:
    for target in DeviceRolloutState:
        assert not is_valid_transition(DeviceRolloutState.TIMED_OUT, target)


def test_transition_returns_legal_target_and_raises_on_illegal() -> None:
    assert transition(RolloutState.PENDING, RolloutState.RUNNING) is RolloutState.RUNNING
    with pytest.raises(IllegalTransition, match="completed -> running"):
        transition(RolloutState.COMPLETED, RolloutState.RUNNING)
    with pytest.raises(IllegalTransition):
        transition(DeviceRolloutState.PENDING, DeviceRolloutState.SUCCEEDED)


def test_states_of_different_kinds_never_transition() -> None:
    assert not is_valid_transition(RolloutState.PENDING, PhaseState.RUNNING)


def test_string_values_are_stable() -> None:
    assert [s.value for s in RolloutState] == [
        "pending",
        "running",
        "paused",
        "awaiting_approval",
        "completed",
        "rolled_back",
        "aborted",
        "failed",
    ]
    assert [s.value for s in DeviceRolloutState] == [
        "pending",
        "notified",
        "installing",
        "succeeded",
        "failed",
        "timed_out",
        "rolled_back",
        "held_back",
    ]


def test_package_exports_once_and_all_exist() -> None:
    names = rollout_pkg.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(rollout_pkg, n) for n in names)
