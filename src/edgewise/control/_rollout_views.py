"""How a rollout reads to an operator (pure): phases, gates, devices by state, and why.

`rollout_view` is what `GET /api/v1/rollouts/{id}` and `edgewise rollout status` show;
`device_why` turns one device's status into a sentence an operator can act on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from edgewise.control.rollout import DeviceRolloutState, PhaseState, Rollout, RolloutState

__all__ = ["device_why", "phase_name", "rollout_summary", "rollout_view", "unreadable_summary"]

_D = DeviceRolloutState


def phase_name(index: int) -> str:
    """The phase's name: canary for phase 0, wave N after it."""
    return "canary" if index == 0 else f"wave {index}"


def rollout_summary(row: Mapping[str, Any], rollout: Rollout) -> dict[str, Any]:
    """One line of `rollout list`."""
    counts = rollout.device_counts()
    return {
        "id": rollout.id,
        "deployment": rollout.deployment,
        "from_revision": rollout.from_revision,
        "to_revision": rollout.to_revision,
        "state": rollout.state.value,
        "reason": rollout.reason,
        "phase_index": rollout.phase_index,
        "phase_name": phase_name(rollout.phase_index),
        "phase_count": len(rollout.phases),
        "devices": len(rollout.devices),
        "counts": {k: v for k, v in counts.items() if v},
        "succeeded": counts[_D.SUCCEEDED.value],
        "failed": counts[_D.FAILED.value] + counts[_D.TIMED_OUT.value],
        "held_back": counts[_D.HELD_BACK.value],
        "created_at": rollout.created_at,
        "created_by": row.get("created_by"),
        "updated_at": row.get("updated_at"),
    }


def unreadable_summary(row: Mapping[str, Any], why: str) -> dict[str, Any]:
    """A `rollout list` line for a rollout whose document this build cannot read.

    Its row's own columns still say which rollout it is and its state; what only the
    document holds (phases, device counts) is unknown (None), and `unreadable` says why.
    """
    return {
        "id": row["id"],
        "deployment": row["deployment_id"],
        "from_revision": row["from_revision"],
        "to_revision": row["to_revision"],
        "state": row["state"],
        "reason": why,
        "phase_index": None,
        "phase_name": None,
        "phase_count": None,
        "devices": None,
        "counts": {},
        "succeeded": None,
        "failed": None,
        "held_back": None,
        "created_at": row.get("created_at"),
        "created_by": row.get("created_by"),
        "updated_at": row.get("updated_at"),
        "unreadable": why,
    }


def rollout_view(
    row: Mapping[str, Any], rollout: Rollout, devices: str | None = None
) -> dict[str, Any]:
    """The full status: every phase, every gate against its threshold, devices by state.

    Args:
        row: the stored row (lease, creator).
        rollout: its value.
        devices: None (counts only), "all", or a device state to list those devices.
    """
    view = rollout_summary(row, rollout)
    phases = []
    for i, ids in enumerate(rollout.phases):
        phases.append(
            {
                "index": i,
                "name": phase_name(i),
                "state": rollout.phase_states[i].value,
                "size": len(ids),
                "counts": {k: v for k, v in rollout.device_counts(i).items() if v},
            }
        )
    view.update(
        {
            "spec": rollout.spec.to_dict(),
            "phases": phases,
            "gates": [g.to_dict() for g in rollout.gates],
            "soak_deadline": rollout.soak_deadline,
            "phase_started_at": rollout.phase_started_at,
            "lease_owner": row.get("lease_owner"),
            "history": [
                {"at": h.at, "kind": h.kind, "actor": h.actor, "detail": dict(h.detail)}
                for h in rollout.history[-50:]
            ],
        }
    )
    # Why devices are held back, the commonest first: one agent build's devices share a
    # reason, so a thousand of them read as one line.
    held = Counter(s.reason for s in rollout.devices.values() if s.state is _D.HELD_BACK)
    if held:
        view["held_back_reasons"] = [
            {"reason": reason, "devices": n} for reason, n in held.most_common(5)
        ]
    if devices is not None:
        view["device_list"] = [
            {
                "id": d,
                "state": s.state.value,
                "phase": s.phase,
                "notified_at": s.notified_at,
                "updated_at": s.updated_at,
                "reason": s.reason,
            }
            for d, s in sorted(rollout.devices.items())
            if devices == "all" or s.state.value == devices
        ]
    return view


def device_why(rollout: Rollout, device_id: str) -> dict[str, Any] | None:
    """Where one device stands in the rollout, and why (None: not in the snapshot)."""
    status = rollout.devices.get(device_id)
    if status is None:
        return None
    phase_state = rollout.phase_states[status.phase]
    where = f"{phase_name(status.phase)} (phase {status.phase}, {phase_state.value})"
    state = status.state
    if state is _D.PENDING:
        if rollout.terminal:
            why = f"never moved: the rollout ended {rollout.state.value} before its phase"
        elif status.phase > rollout.phase_index:
            why = f"waiting: its phase starts after {phase_name(rollout.phase_index)} passes"
        elif rollout.state is RolloutState.PAUSED:
            why = f"waiting: the rollout is paused ({rollout.reason})"
        elif phase_state is PhaseState.RUNNING:
            why = "waiting for its turn under the notification rate limit"
        else:
            why = "waiting to be notified"
    elif state is _D.NOTIFIED:
        deadline = (status.notified_at or 0.0) + rollout.spec.device_timeout_s
        why = f"notified; no report yet (times out at {deadline:.0f})"
    elif state is _D.INSTALLING:
        why = f"installing: {status.reason}"
    elif state is _D.SUCCEEDED:
        why = f"installed and healthy: {status.reason}"
    elif state is _D.FAILED:
        why = f"failed: {status.reason}"
    elif state is _D.TIMED_OUT:
        why = f"timed out: {status.reason} (counts as failed; later reports are ignored)"
    elif state is _D.HELD_BACK:
        why = (
            f"held back: {status.reason} (keeps revision {rollout.from_revision}; not "
            "waited for nor counted; counts if it reports the new revision later)"
        )
    else:
        why = f"sent back to revision {rollout.from_revision}: {status.reason}"
    return {
        "device": device_id,
        "rollout": rollout.id,
        "state": state.value,
        "phase": status.phase,
        "where": where,
        "why": why,
        "notified_at": status.notified_at,
        "updated_at": status.updated_at,
        "revision": rollout.desired_revision(device_id),
    }
