"""The rollout engine: `step(rollout, observations, now) -> (rollout, actions)`, pure.

A driver loads the rollout, gathers observations, calls `step`, and in one transaction
stores the returned rollout and carries out the actions (`NotifyDevices` moves desired
state, `RevertDevices` moves it back, `RecordEvent` goes to the audit chain, `WakeAt`
says when to step again). Operator commands live in `_commands` and return the same
pair.

One step, in order: apply device reports; time out devices past `device_timeout_s`;
start the rollout if pending; then, while running: notify the current phase's pending
devices within the rate limit; once all are notified start the soak; evaluate the
gates: a failed install gate breaches at once (it cannot recover), quality gates are
judged when the soak is over; a passed phase starts the next one (or waits for
approval, or completes the rollout) within the same step. A breach pauses the rollout
or rolls it back, per `spec.on_breach`.

Usage::

    rollout = create_rollout("r1", "dep-1", 3, 4, snapshot, RolloutSpec(), now=clock())
    while not rollout.terminal:
        rollout, actions = step(rollout, driver.observe(rollout), clock())
        driver.apply(rollout, actions)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgewise.control.rollout._gates import GateEvaluation, evaluate_gates
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
    DeviceRolloutState,
    PhaseState,
    RolloutState,
    is_valid_transition,
    transition,
)
from edgewise.control.rollout._phases import plan_phases
from edgewise.control.rollout._spec import RolloutSpec
from edgewise.control.rollout._state import DeviceStatus, HistoryEntry, Revision, Rollout

__all__ = ["create_rollout", "step"]

_D, _P, _R = DeviceRolloutState, PhaseState, RolloutState
_IN_FLIGHT = frozenset({_D.NOTIFIED, _D.INSTALLING})
#: The reason of a device held back at its timeout for not having been seen since it
#: was notified (the gates tell such devices from those that cannot run the revision).
OFFLINE = "offline: not seen since it was notified"
_REPORT_TO_STATE = {
    ReportStatus.INSTALLING: _D.INSTALLING,
    ReportStatus.HEALTHY: _D.SUCCEEDED,
    ReportStatus.FAILED: _D.FAILED,
    ReportStatus.REJECTED: _D.FAILED,
    ReportStatus.ROLLED_BACK: _D.FAILED,
    ReportStatus.INCOMPATIBLE: _D.HELD_BACK,
    ReportStatus.DEPARTED: _D.HELD_BACK,
}


def create_rollout(
    rollout_id: str,
    deployment: str,
    from_revision: Revision,
    to_revision: Revision,
    devices: Sequence[tuple[str, Mapping[str, str]]],
    spec: RolloutSpec,
    now: float,
    seed: int = 0,
) -> Rollout:
    """A pending rollout over a snapshot of devices, its phases planned.

    Raises:
        ValueError: on duplicate device ids or an invalid spec.
    """
    phases = plan_phases(devices, spec.canary, spec.waves, spec.strata_keys, seed)
    statuses = {d: DeviceStatus(_D.PENDING, i) for i, ids in enumerate(phases) for d in ids}
    return Rollout(
        id=rollout_id,
        deployment=deployment,
        from_revision=from_revision,
        to_revision=to_revision,
        spec=spec,
        phases=tuple(tuple(p) for p in phases),
        state=_R.PENDING,
        phase_index=0,
        phase_states=tuple(_P.PENDING for _ in phases),
        devices=statuses,
        created_at=now,
        history=(HistoryEntry(now, "rollout.created", "engine", {"devices": len(statuses)}),),
    )


class _Work:
    """A mutable working copy for one pure call; `done()` freezes it again."""

    def __init__(self, rollout: Rollout, now: float) -> None:
        self.r = rollout
        self.now = now
        self.state = rollout.state
        self.phase_index = rollout.phase_index
        self.phase_states = list(rollout.phase_states)
        self.devices = dict(rollout.devices)
        self.phase_started_at = rollout.phase_started_at
        self.soak_deadline = rollout.soak_deadline
        self.gates = rollout.gates
        self.reason = rollout.reason
        self.history = list(rollout.history)
        self.actions: list[Action] = []

    # -------------------------------------------------------------- bookkeeping

    def event(self, kind: str, actor: str = "engine", **detail: Any) -> None:
        detail = {"rollout": self.r.id, **detail}
        self.history.append(HistoryEntry(self.now, kind, actor, detail))
        self.actions.append(RecordEvent(kind, {**detail, "actor": actor, "at": self.now}))

    def set_state(self, new: RolloutState) -> None:
        self.state = transition(self.state, new)

    def set_phase(self, index: int, new: PhaseState) -> None:
        self.phase_states[index] = transition(self.phase_states[index], new)

    def set_device(self, dev: str, new: DeviceRolloutState, reason: str, **extra: Any) -> None:
        old = self.devices[dev]
        self.devices[dev] = dataclasses.replace(
            old, state=transition(old.state, new), updated_at=self.now, reason=reason, **extra
        )

    def done(self) -> tuple[Rollout, list[Action]]:
        rollout = dataclasses.replace(
            self.r,
            state=self.state,
            phase_index=self.phase_index,
            phase_states=tuple(self.phase_states),
            devices=self.devices,
            phase_started_at=self.phase_started_at,
            soak_deadline=self.soak_deadline,
            gates=self.gates,
            reason=self.reason,
            history=tuple(self.history),
        )
        return rollout, self.actions

    # -------------------------------------------------------------- device facts

    def apply_reports(self, reports: Mapping[str, DeviceReport]) -> None:
        timeout = self.r.spec.device_timeout_s
        for dev, report in reports.items():
            status = self.devices.get(dev)
            new = _REPORT_TO_STATE.get(report.status) if status else None
            if status is None or new is None:
                continue
            if report.status is ReportStatus.DEPARTED and status.reason == OFFLINE:
                # Offline, then gone for good: no longer awaited by the reporting quorum.
                reason = report.reason or "departed"
                self.devices[dev] = dataclasses.replace(status, updated_at=self.now, reason=reason)
                continue
            if new is status.state:
                continue
            if not is_valid_transition(status.state, new):
                continue  # a terminal or backward move
            if report.status is not ReportStatus.DEPARTED:  # gone, notified or not
                if status.notified_at is None:
                    continue  # not moved by this rollout
                if report.at is not None and report.at < status.notified_at:
                    # Said before this rollout moved it: about an earlier move to the same
                    # models (a rollout of this revision aborted while the device was
                    # off), not about this one. Its next report counts.
                    continue
                late = report.at is not None and report.at >= status.notified_at + timeout
                if late and status.state in _IN_FLIGHT:
                    continue  # arrived after its timeout: TIMED_OUT wins
            reason = report.reason or f"device reported {report.status.value}"
            self.set_device(dev, new, reason)

    def apply_timeouts(self, last_seen: Mapping[str, float] | None) -> None:
        """In-flight devices past their timeout: offline ones held back, the rest timed out.

        A device not seen since it was notified never had the chance to install: it is
        switched off or out of reach, which says nothing about the revision (it installs,
        and counts, once back). One that was seen and still has no outcome is stuck.
        """
        timeout = self.r.spec.device_timeout_s
        due = [
            (dev, s.notified_at)
            for dev, s in self.devices.items()
            if s.state in _IN_FLIGHT
            and s.notified_at is not None
            and self.now >= s.notified_at + timeout
        ]
        offline = sorted(
            dev
            for dev, notified_at in due
            if last_seen is not None and last_seen.get(dev, -math.inf) < notified_at
        )
        gone = set(offline)
        timed_out = sorted(dev for dev, _ in due if dev not in gone)
        for dev in offline:
            self.set_device(dev, _D.HELD_BACK, OFFLINE)
        for dev in timed_out:
            self.set_device(dev, _D.TIMED_OUT, f"no outcome within {timeout:g} s")
        if offline:
            self.event("devices.offline", count=len(offline), devices=offline[:20])
        if timed_out:
            self.event("devices.timed_out", count=len(timed_out), devices=timed_out[:20])

    # -------------------------------------------------------------- phases

    def phase_devices(self) -> tuple[str, ...]:
        return self.r.phases[self.phase_index]

    def start_phase(self) -> None:
        self.set_phase(self.phase_index, _P.RUNNING)
        self.phase_started_at, self.soak_deadline = self.now, None
        self.event("phase.started", phase=self.phase_index, devices=len(self.phase_devices()))

    def rate_allowance(self) -> int | None:
        rate = self.r.spec.rate_per_min
        if rate is None:
            return None
        started = self.phase_started_at if self.phase_started_at is not None else self.now
        minutes = math.floor(max(0.0, self.now - started) / 60.0)
        current = rate * self.r.spec.rate_ramp ** min(minutes, 64)
        recent = sum(
            1
            for s in self.devices.values()
            if s.notified_at is not None and s.notified_at > self.now - 60.0
        )
        return max(0, math.floor(current + 1e-9) - recent)

    def notify(self) -> None:
        pending = [d for d in self.phase_devices() if self.devices[d].state is _D.PENDING]
        allowance = self.rate_allowance()
        batch = pending if allowance is None else pending[:allowance]
        for dev in batch:
            self.set_device(dev, _D.NOTIFIED, "notified", notified_at=self.now)
        if batch:
            self.actions.append(NotifyDevices(tuple(batch), self.r.to_revision))

    def evaluate(self, obs: Observations) -> GateEvaluation:
        fresh = obs.telemetry_phase is None or obs.telemetry_phase == self.phase_index
        offline = sum(
            1
            for d in self.phase_devices()
            if self.devices[d].state is _D.HELD_BACK and self.devices[d].reason == OFFLINE
        )
        evaluation = evaluate_gates(
            self.r.spec.gates,
            {d: s.state for d, s in self.devices.items()},
            self.phase_devices(),
            obs.phase if fresh else None,
            obs.control if fresh else None,
            offline,
        )
        self.gates = evaluation.results
        return evaluation

    def finish_phase(self) -> None:
        """The current phase passed (or was overridden): complete, wait, or go on."""
        i = self.phase_index
        if i == len(self.r.phases) - 1:
            self.set_state(_R.COMPLETED)
            self.reason = ""
            self.actions.append(SetStableRevision(self.r.deployment, self.r.to_revision))
            held = sorted(d for d, s in self.devices.items() if s.state is _D.HELD_BACK)
            extra: dict[str, Any] = (
                {"held_back": len(held), "held_back_devices": held[:20]} if held else {}
            )
            self.event("rollout.completed", revision=self.r.to_revision, **extra)
        elif self.r.spec.approval_after(i):
            self.set_state(_R.AWAITING_APPROVAL)
            self.reason = f"phase {i + 1} needs approval"
            self.event("rollout.awaiting_approval", phase=i + 1)
        else:
            self.phase_index = i + 1
            self.start_phase()

    def breach(self, why: str, evaluation: GateEvaluation | None) -> None:
        i = self.phase_index
        self.set_phase(i, _P.BREACHED)
        gates = [g.to_dict() for g in evaluation.failed] if evaluation else []
        self.event("phase.breached", phase=i, reason=why, gates=gates)
        if self.r.spec.on_breach == "pause":
            self.set_state(_R.PAUSED)
            self.reason = f"phase {i} breached: {why}"
            self.event("rollout.paused", reason=self.reason)
        else:
            self.end(_R.ROLLED_BACK, f"phase {i} breached: {why}", "engine")

    def end(self, state: RolloutState, why: str, actor: str) -> None:
        """Stop for good; every device this rollout moved goes back (unless completed)."""
        self.set_state(state)
        self.reason = why
        for index, phase_state in enumerate(self.phase_states):
            if is_valid_transition(phase_state, _P.CANCELLED):
                self.set_phase(index, _P.CANCELLED)
        moved = sorted(d for d, s in self.devices.items() if s.notified_at is not None)
        if moved:
            self.actions.append(RevertDevices(tuple(moved), self.r.from_revision))
        for dev in moved:
            # TIMED_OUT is terminal and stays so, but its device is sent back all the same.
            if is_valid_transition(self.devices[dev].state, _D.ROLLED_BACK):
                self.set_device(dev, _D.ROLLED_BACK, f"sent back: {why}")
        self.event(f"rollout.{state.value}", actor, reason=why, reverted=len(moved))

    def advance(self, obs: Observations) -> None:
        """Move the running rollout as far as the facts allow."""
        for _ in range(2 * len(self.r.phases) + 2):
            if self.state is not _R.RUNNING:
                return
            i = self.phase_index
            if self.phase_states[i] in (_P.PASSED, _P.OVERRIDDEN):
                self.finish_phase()
                continue
            if self.phase_states[i] is _P.PENDING:
                self.start_phase()
            if self.phase_states[i] is _P.RUNNING:
                self.notify()
                if all(self.devices[d].state is not _D.PENDING for d in self.phase_devices()):
                    self.set_phase(i, _P.SOAKING)
                    self.soak_deadline = self.now + (
                        self.r.spec.soak_s if self.phase_devices() else 0.0
                    )
            evaluation = self.evaluate(obs)
            if evaluation.install_failed:
                names = ", ".join(_describe(g) for g in evaluation.install_failed)
                self.breach(names, evaluation)
                return
            if self.phase_states[i] is not _P.SOAKING or self.soak_deadline is None:
                return
            if self.now < self.soak_deadline:
                return
            if not self.phase_devices() or evaluation.passed:
                self.set_phase(i, _P.PASSED)
                self.event("phase.passed", phase=i, gates=[g.to_dict() for g in evaluation.results])
                continue
            if evaluation.failed:
                self.breach(", ".join(_describe(g) for g in evaluation.failed), evaluation)
                return
            grace = self.r.spec.gate_timeout_s
            if grace is not None and self.now >= self.soak_deadline + grace:
                self.breach(f"gates still without enough data after {grace:g} s", evaluation)
            return

    def wake_at(self) -> None:
        """When the next step is due without new observations."""
        if self.state not in (_R.RUNNING, _R.PAUSED, _R.AWAITING_APPROVAL):
            return
        times = [
            s.notified_at + self.r.spec.device_timeout_s
            for s in self.devices.values()
            if s.state in _IN_FLIGHT and s.notified_at is not None
        ]
        if self.state is _R.RUNNING:
            if self.soak_deadline is not None and self.soak_deadline > self.now:
                times.append(self.soak_deadline)
            elif self.soak_deadline is not None and self.r.spec.gate_timeout_s is not None:
                times.append(self.soak_deadline + self.r.spec.gate_timeout_s)
            waiting = any(self.devices[d].state is _D.PENDING for d in self.phase_devices())
            if waiting and self.r.spec.rate_per_min is not None:
                recent = [
                    s.notified_at
                    for s in self.devices.values()
                    if s.notified_at is not None and s.notified_at > self.now - 60.0
                ]
                times.append(min(recent) + 60.0 if recent else self.now + 60.0)
                if self.phase_started_at is not None and self.r.spec.rate_ramp > 1:
                    minutes = math.floor((self.now - self.phase_started_at) / 60.0) + 1
                    times.append(self.phase_started_at + 60.0 * minutes)
        future = [t for t in times if t > self.now]
        if future:
            self.actions.append(WakeAt(min(future)))


def _describe(gate: Any) -> str:
    value = "n/a" if gate.value is None else f"{gate.value:.4g}"
    return f"{gate.name} {value} vs {gate.threshold:g}"


def step(rollout: Rollout, observations: Observations, now: float) -> tuple[Rollout, list[Action]]:
    """Advance a rollout by what was observed, at time `now` (pure).

    Args:
        rollout: The stored rollout.
        observations: Device reports and cohort telemetry gathered since the last step.
        now: The driver's clock (seconds).

    Returns:
        The next rollout value and the actions to carry out, in order.
    """
    if rollout.terminal:
        return rollout, []
    work = _Work(rollout, now)
    work.apply_reports(observations.reports)
    work.apply_timeouts(observations.last_seen)
    if work.state is _R.PENDING:
        work.set_state(_R.RUNNING)
        work.event("rollout.started", devices=len(work.devices), to_revision=rollout.to_revision)
    if work.state is _R.RUNNING:
        work.advance(observations)
    elif work.phase_states[work.phase_index] not in (_P.PENDING, _P.CANCELLED):
        work.evaluate(observations)  # for `rollout status` only
    work.wake_at()
    return work.done()
