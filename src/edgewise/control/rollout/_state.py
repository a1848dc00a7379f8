"""The rollout record: an immutable value the engine maps to its next value.

A driver stores `Rollout.to_dict()` (JSON) and reads it back with `Rollout.from_dict`;
everything the engine needs lives here, so a restarted control plane resumes exactly
where the last committed step left it. Invariants, kept by the engine:

- `phases` partition the snapshot; `devices` holds exactly the snapshot's ids;
- a device has `notified_at` iff it was notified, which happens at most once;
- `phase_states[i]` is PENDING for every i > `phase_index` until the rollout ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgewise.control.rollout._gates import GateOutcome, GateResult
from edgewise.control.rollout._model import (
    TERMINAL_ROLLOUT_STATES,
    DeviceRolloutState,
    PhaseState,
    RolloutState,
)
from edgewise.control.rollout._spec import RolloutSpec

__all__ = ["DeviceStatus", "HistoryEntry", "Rollout"]

Revision = int | str


@dataclass(frozen=True)
class DeviceStatus:
    """One device of the snapshot.

    Attributes:
        state: Where it stands.
        phase: Index of its phase.
        notified_at: When it was moved to the new revision (None: never).
        updated_at: When its state last changed.
        reason: Why it is where it is (device report, timeout, revert).
    """

    state: DeviceRolloutState
    phase: int
    notified_at: float | None = None
    updated_at: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    """A rollout-level event (never per device: the history stays small)."""

    at: float
    kind: str
    actor: str = "engine"
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """A rollout at one instant. Never mutated: the engine returns new values.

    Attributes:
        id: Rollout id.
        deployment: Deployment id.
        from_revision: The revision devices leave (the stable one at creation).
        to_revision: The revision devices move to.
        spec: Plan and policy.
        phases: Device ids per phase: canary first, then the waves.
        state: Rollout state.
        phase_index: The current phase.
        phase_states: State per phase.
        devices: Device id -> status, for every device of the snapshot.
        created_at: Creation time (driver's clock).
        phase_started_at: When the current phase started.
        soak_deadline: When the current phase's soak ends (set once all are notified).
        gates: The current phase's last gate evaluation (for status).
        reason: Why the rollout is paused or ended, if it is.
        history: Rollout-level events, oldest first.
    """

    id: str
    deployment: str
    from_revision: Revision
    to_revision: Revision
    spec: RolloutSpec
    phases: tuple[tuple[str, ...], ...]
    state: RolloutState
    phase_index: int
    phase_states: tuple[PhaseState, ...]
    devices: Mapping[str, DeviceStatus]
    created_at: float
    phase_started_at: float | None = None
    soak_deadline: float | None = None
    gates: tuple[GateResult, ...] = ()
    reason: str = ""
    history: tuple[HistoryEntry, ...] = ()

    @property
    def terminal(self) -> bool:
        """Whether the rollout has ended."""
        return self.state in TERMINAL_ROLLOUT_STATES

    @property
    def moved(self) -> list[str]:
        """Devices this rollout notified (what a rollback sends back), sorted."""
        return sorted(d for d, s in self.devices.items() if s.notified_at is not None)

    def device_counts(self, phase: int | None = None) -> dict[str, int]:
        """Devices per state, for one phase or the whole rollout."""
        counts = Counter(
            s.state.value for s in self.devices.values() if phase is None or s.phase == phase
        )
        return {state.value: counts.get(state.value, 0) for state in DeviceRolloutState}

    def desired_revision(self, device_id: str) -> Revision | None:
        """The revision a device of the snapshot should run now (None: not in it).

        Moved devices run `to_revision` until the rollout is rolled back or aborted;
        after completion every device of the snapshot runs `to_revision`.
        """
        status = self.devices.get(device_id)
        if status is None:
            return None
        if self.state is RolloutState.COMPLETED:
            return self.to_revision
        if self.state in (RolloutState.ROLLED_BACK, RolloutState.ABORTED, RolloutState.FAILED):
            return self.from_revision
        return self.to_revision if status.notified_at is not None else self.from_revision

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inverse of `from_dict`).

        Devices are compact rows `[state, phase, notified_at, updated_at, reason]`: a
        10,000-device rollout stays a small document.
        """
        return {
            "id": self.id,
            "deployment": self.deployment,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "spec": self.spec.to_dict(),
            "phases": [list(p) for p in self.phases],
            "state": self.state.value,
            "phase_index": self.phase_index,
            "phase_states": [p.value for p in self.phase_states],
            "devices": {
                d: [s.state.value, s.phase, s.notified_at, s.updated_at, s.reason]
                for d, s in self.devices.items()
            },
            "created_at": self.created_at,
            "phase_started_at": self.phase_started_at,
            "soak_deadline": self.soak_deadline,
            "gates": [g.to_dict() for g in self.gates],
            "reason": self.reason,
            "history": [
                {"at": h.at, "kind": h.kind, "actor": h.actor, "detail": dict(h.detail)}
                for h in self.history
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        """Inverse of `to_dict`.

        Raises:
            ValueError: if the document is not a stored rollout.
        """
        try:
            return cls(
                id=str(data["id"]),
                deployment=str(data["deployment"]),
                from_revision=data["from_revision"],
                to_revision=data["to_revision"],
                spec=RolloutSpec.from_dict(data["spec"]),
                phases=tuple(tuple(p) for p in data["phases"]),
                state=RolloutState(data["state"]),
                phase_index=int(data["phase_index"]),
                phase_states=tuple(PhaseState(p) for p in data["phase_states"]),
                devices={
                    d: DeviceStatus(DeviceRolloutState(row[0]), int(row[1]), row[2], row[3], row[4])
                    for d, row in data["devices"].items()
                },
                created_at=float(data["created_at"]),
                phase_started_at=data.get("phase_started_at"),
                soak_deadline=data.get("soak_deadline"),
                gates=tuple(
                    GateResult(
                        g["name"],
                        g["value"],
                        g["threshold"],
                        GateOutcome(g["outcome"]),
                        g["detail"],
                    )
                    for g in data.get("gates", ())
                ),
                reason=str(data.get("reason", "")),
                history=tuple(
                    HistoryEntry(h["at"], h["kind"], h["actor"], h["detail"])
                    for h in data.get("history", ())
                ),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            detail = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"not a stored rollout: {detail}") from None
