"""Rollout cards: what the rollout pages show, read tolerantly from the rollout API.

The console reads rollouts through `/api/v1/rollouts` (in process, with the signed-in
token), so the same RBAC and scope apply and the console never depends on how the
driver stores them. A document may be the engine's own `Rollout.to_dict()` shape
(phases as lists of device ids, `phase_states`, compact device rows) or a status view
(phases as objects with their own state, size, device counts and gates); both map to
one `RolloutCard`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgewise.control.rollout import ROLLOUT_TRANSITIONS, RolloutState

__all__ = ["ACTIONS", "GateRow", "PhaseRow", "RolloutCard", "allowed_actions", "rollout_card"]

# Operator commands the console offers, and the state each one moves a rollout to.
# The engine's transition table decides which states offer a button, so a button is
# never shown that the engine would refuse (the API still has the last word).
_TARGETS: dict[str, RolloutState] = {
    "pause": RolloutState.PAUSED,
    "resume": RolloutState.RUNNING,
    "approve": RolloutState.RUNNING,
    "abort": RolloutState.ABORTED,
}
_FROM: dict[str, frozenset[RolloutState]] = {
    "resume": frozenset({RolloutState.PAUSED}),
    "approve": frozenset({RolloutState.AWAITING_APPROVAL}),
}
ACTIONS: dict[str, frozenset[str]] = {
    action: frozenset(
        old.value
        for old, news in ROLLOUT_TRANSITIONS.items()
        if target in news and old in _FROM.get(action, frozenset(RolloutState))
    )
    for action, target in _TARGETS.items()
}
_TERMINAL = frozenset({"completed", "rolled_back", "aborted", "failed"})
_DONE_DEVICE = frozenset({"succeeded", "failed", "timed_out", "rolled_back", "held_back"})


@dataclass(frozen=True)
class GateRow:
    """One gate: its value against its threshold."""

    name: str
    value: Any
    threshold: Any
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class PhaseRow:
    """One phase (canary or wave)."""

    index: int
    name: str
    state: str
    size: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutCard:
    """A rollout as the console shows it."""

    id: str
    deployment: str
    from_revision: str
    to_revision: str
    state: str
    phase_index: int
    phases: list[PhaseRow]
    gates: list[GateRow]
    counts: dict[str, int]
    reason: str = ""
    created_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    current_phase: str = ""  # the API's own name for it, when phases are not listed
    # Why devices are held back (they cannot run the revision): (devices, reason).
    held_back: list[tuple[int, str]] = field(default_factory=list)
    # Why this control plane cannot read the rollout's stored state (a newer one wrote it).
    unreadable: str = ""

    @property
    def phase_name(self) -> str:
        """The current phase's name."""
        for phase in self.phases:
            if phase.index == self.phase_index:
                return phase.name
        return self.current_phase or _phase_name(self.phase_index)

    @property
    def total(self) -> int:
        """Devices in the rollout's snapshot."""
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Devices with a final outcome in this rollout."""
        return sum(n for s, n in self.counts.items() if s in _DONE_DEVICE)

    @property
    def progress_pct(self) -> int:
        """Share of the snapshot with an outcome, in whole percent."""
        if self.state == "completed":
            return 100
        return round(100 * self.done / self.total) if self.total else 0

    @property
    def terminal(self) -> bool:
        """Whether the rollout has ended (no more polling needed)."""
        return self.state in _TERMINAL


def _gate(raw: Mapping[str, Any]) -> GateRow:
    return GateRow(
        name=str(raw.get("name", "?")),
        value=raw.get("value"),
        threshold=raw.get("threshold"),
        outcome=str(raw.get("outcome", "")),
        detail=str(raw.get("detail", "")),
    )


def _phase_name(index: int) -> str:
    return "canary" if index == 0 else f"wave {index}"


def _device_rows(devices: Any) -> list[tuple[str, int]]:
    """(state, phase) per device from compact rows or objects; [] for counts-only views."""
    out: list[tuple[str, int]] = []
    if isinstance(devices, Mapping):
        for row in devices.values():
            if isinstance(row, Sequence) and not isinstance(row, str) and len(row) >= 2:
                out.append((str(row[0]), int(row[1])))
            elif isinstance(row, Mapping) and "state" in row:
                out.append((str(row["state"]), int(row.get("phase", 0))))
    return out


def rollout_card(doc: Mapping[str, Any]) -> RolloutCard:
    """Map a rollout document from the API to a card (missing fields become blanks)."""
    if "rollout" in doc and isinstance(doc["rollout"], Mapping):
        doc = {**doc["rollout"], **{k: v for k, v in doc.items() if k != "rollout"}}
    rows = _device_rows(doc.get("devices"))
    raw_phases = doc.get("phases") or []
    states = list(doc.get("phase_states") or [])
    phases: list[PhaseRow] = []
    for i, raw in enumerate(raw_phases):
        if isinstance(raw, Mapping):
            counts = raw.get("counts") or raw.get("devices_by_state") or {}
            size = raw.get("size", raw.get("devices"))
            if not isinstance(size, int):
                size = len(size) if isinstance(size, Sequence) else sum(counts.values())
            phases.append(
                PhaseRow(
                    index=int(raw.get("index", i)),
                    name=str(raw.get("name") or _phase_name(i)),
                    state=str(raw.get("state", states[i] if i < len(states) else "")),
                    size=size,
                    counts={str(k): int(v) for k, v in counts.items() if v},
                )
            )
        else:
            ids = list(raw) if isinstance(raw, Sequence) else []
            per = Counter(s for s, p in rows if p == i)
            phases.append(
                PhaseRow(
                    index=i,
                    name=_phase_name(i),
                    state=str(states[i]) if i < len(states) else "",
                    size=len(ids),
                    counts=dict(per),
                )
            )
    counts_raw = doc.get("counts") or doc.get("device_counts")
    if isinstance(counts_raw, Mapping):
        counts = {str(k): int(v) for k, v in counts_raw.items() if v}
    elif rows:
        counts = dict(Counter(s for s, _ in rows))
    else:
        counts = {}
        for p in phases:
            for state, n in p.counts.items():
                counts[state] = counts.get(state, 0) + n
    gates_raw = doc.get("gates") or []
    history = [dict(h) for h in doc.get("history") or [] if isinstance(h, Mapping)]
    return RolloutCard(
        id=str(doc.get("id", "?")),
        deployment=str(doc.get("deployment", doc.get("deployment_id", ""))),
        from_revision=str(doc.get("from_revision", "")),
        to_revision=str(doc.get("to_revision", "")),
        state=str(doc.get("state", "unknown")),
        phase_index=int(doc.get("phase_index", 0) or 0),
        phases=phases,
        gates=[_gate(g) for g in gates_raw if isinstance(g, Mapping)],
        counts=counts,
        reason=str(doc.get("reason") or ""),
        created_at=doc.get("created_at") if isinstance(doc.get("created_at"), float) else None,
        history=history[-20:],
        current_phase=str(doc.get("phase_name") or ""),
        held_back=[
            (int(h.get("devices") or 0), str(h.get("reason") or ""))
            for h in doc.get("held_back_reasons") or []
            if isinstance(h, Mapping)
        ],
        unreadable=str(doc.get("unreadable") or ""),
    )


def allowed_actions(card: RolloutCard, can_act: bool) -> list[str]:
    """The buttons to show: none for a viewer, only applicable ones for an operator."""
    if not can_act:
        return []
    return [a for a, states in ACTIONS.items() if card.state in states]
