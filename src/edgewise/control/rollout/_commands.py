"""Operator commands on a rollout, pure like `step`: each returns (rollout, actions).

`pause` and `resume` stop and restart notifying (resuming a breached phase is the
operator's override: it counts as passed); `approve` lets the next phase start;
`abort`, `rollback` and `fail` end the rollout and send every moved device back.
A command that does not fit the rollout's state raises `IllegalTransition`.
"""

from __future__ import annotations

from edgewise.control.rollout._engine import _Work
from edgewise.control.rollout._messages import Action
from edgewise.control.rollout._model import IllegalTransition, PhaseState, RolloutState
from edgewise.control.rollout._state import Rollout

__all__ = ["abort", "approve", "fail", "pause", "resume", "rollback"]

_P, _R = PhaseState, RolloutState


def _require(rollout: Rollout, state: RolloutState, command: str) -> None:
    # The table allows paused -> running and awaiting_approval -> running; which
    # command may take that edge is decided here.
    if rollout.state is not state:
        raise IllegalTransition(f"{command}: rollout is {rollout.state.value}, not {state.value}")


def pause(
    rollout: Rollout, now: float, actor: str, why: str = "", *, unstarted: bool = False
) -> tuple[Rollout, list[Action]]:
    """Stop notifying and advancing until `resume`; `why` becomes the reason shown.

    With `unstarted`, a pending rollout is started and paused at once, no device moved:
    the driver's way to hold one that must not start (its revision pins a model yanked
    since it was created). Operators pause running rollouts only.

    Raises:
        IllegalTransition: unless the rollout is running (or pending, with `unstarted`).
    """
    work = _Work(rollout, now)
    if unstarted and work.state is _R.PENDING:
        work.set_state(_R.RUNNING)
        work.event("rollout.started", devices=len(work.devices), to_revision=rollout.to_revision)
    work.set_state(_R.PAUSED)
    work.reason = why or f"paused by {actor}"
    work.event("rollout.paused", actor, reason=work.reason)
    return work.done()


def resume(rollout: Rollout, now: float, actor: str) -> tuple[Rollout, list[Action]]:
    """Carry on after a pause; a breached phase counts as passed (operator override).

    Raises:
        IllegalTransition: unless the rollout is paused.
    """
    _require(rollout, _R.PAUSED, "resume")
    work = _Work(rollout, now)
    work.set_state(_R.RUNNING)
    work.reason = ""
    if work.phase_states[work.phase_index] is _P.BREACHED:
        work.set_phase(work.phase_index, _P.OVERRIDDEN)
        work.event("phase.overridden", actor, phase=work.phase_index)
    work.event("rollout.resumed", actor)
    return work.done()


def approve(rollout: Rollout, now: float, actor: str) -> tuple[Rollout, list[Action]]:
    """Let the next phase start (the next `step` starts it).

    Raises:
        IllegalTransition: unless the rollout awaits an approval.
    """
    _require(rollout, _R.AWAITING_APPROVAL, "approve")
    work = _Work(rollout, now)
    work.set_state(_R.RUNNING)
    work.reason = ""
    work.phase_index += 1
    work.event("rollout.approved", actor, phase=work.phase_index)
    return work.done()


def abort(rollout: Rollout, now: float, actor: str) -> tuple[Rollout, list[Action]]:
    """Stop for good and send every moved device back to the old revision.

    Raises:
        IllegalTransition: if the rollout already ended.
    """
    work = _Work(rollout, now)
    work.end(_R.ABORTED, f"aborted by {actor}", actor)
    return work.done()


def rollback(rollout: Rollout, now: float, actor: str) -> tuple[Rollout, list[Action]]:
    """Roll back by hand: like a breach with on_breach=rollback.

    Raises:
        IllegalTransition: if the rollout already ended.
    """
    work = _Work(rollout, now)
    work.end(_R.ROLLED_BACK, f"rolled back by {actor}", actor)
    return work.done()


def fail(rollout: Rollout, now: float, reason: str) -> tuple[Rollout, list[Action]]:
    """The driver cannot carry the rollout on (e.g. the revision is gone).

    Raises:
        IllegalTransition: if the rollout already ended.
    """
    work = _Work(rollout, now)
    work.end(_R.FAILED, reason, "engine")
    return work.done()
