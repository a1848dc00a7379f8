"""The install state machine of one pipeline and its explainable timeline.

The table below is the documentation: an install starts `pending`, may be `downloading`
(repeatedly, with progress), is `verifying` the bundle against the trust root, is
`installing` into the inactive slot, is `health_checking` the loaded model, and ends
`active`, `failed` (the old model keeps serving) or `rolled_back` (the new model was
switched to and then abandoned). Any terminal state may start a new install (`pending`).

Every transition carries a reason a human can act on ("insufficient disk",
"signature invalid", "health check failed: 3/10 outputs out of tolerance").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "INSTALL_TRANSITIONS",
    "IllegalTransition",
    "InstallState",
    "InstallTracker",
    "TimelineEntry",
    "is_valid_transition",
]

TIMELINE_LIMIT = 50


class InstallState(StrEnum):
    """Where one pipeline's install is."""

    PENDING = "pending"  # a new model is wanted; nothing fetched yet
    DOWNLOADING = "downloading"  # fetching the bundle; progress in [0, 1]
    VERIFYING = "verifying"  # digest and signatures against the trust root
    INSTALLING = "installing"  # extracting into the inactive slot
    HEALTH_CHECKING = "health_checking"  # loaded, warmed up, running the health samples
    ACTIVE = "active"  # switched and committed: serving
    FAILED = "failed"  # refused; the previous model (if any) keeps serving
    ROLLED_BACK = "rolled_back"  # was switched to, then the previous slot was restored


_S = InstallState
INSTALL_TRANSITIONS: frozenset[tuple[InstallState, InstallState]] = frozenset(
    {
        (_S.PENDING, _S.DOWNLOADING),
        (_S.PENDING, _S.VERIFYING),  # already in the artifact cache
        (_S.PENDING, _S.FAILED),  # e.g. insufficient disk, incompatible
        (_S.DOWNLOADING, _S.DOWNLOADING),  # progress
        (_S.DOWNLOADING, _S.VERIFYING),
        (_S.DOWNLOADING, _S.FAILED),
        (_S.VERIFYING, _S.INSTALLING),
        (_S.VERIFYING, _S.FAILED),
        (_S.INSTALLING, _S.HEALTH_CHECKING),
        (_S.INSTALLING, _S.FAILED),
        (_S.HEALTH_CHECKING, _S.ACTIVE),
        (_S.HEALTH_CHECKING, _S.FAILED),
        (_S.HEALTH_CHECKING, _S.ROLLED_BACK),
        (_S.ACTIVE, _S.PENDING),
        (_S.ACTIVE, _S.ROLLED_BACK),
        (_S.FAILED, _S.PENDING),
        (_S.ROLLED_BACK, _S.PENDING),
    }
)


_IN_PROGRESS = frozenset({_S.DOWNLOADING, _S.VERIFYING, _S.INSTALLING, _S.HEALTH_CHECKING})


def is_valid_transition(src: InstallState, dst: InstallState) -> bool:
    """Whether the table allows `src -> dst`."""
    return (src, dst) in INSTALL_TRANSITIONS


class IllegalTransition(ValueError):
    """An install tried a transition the table does not allow."""


@dataclass(frozen=True)
class TimelineEntry:
    """One transition: the new state, why, when, and download progress if any."""

    state: InstallState
    reason: str
    at: float
    progress: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire form used in reports."""
        return {
            "state": str(self.state),
            "reason": self.reason,
            "at": self.at,
            "progress": self.progress,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimelineEntry:
        """Parse the wire form."""
        return cls(
            InstallState(data["state"]),
            str(data.get("reason", "")),
            float(data["at"]),
            None if data.get("progress") is None else float(data["progress"]),
        )


@dataclass
class InstallTracker:
    """The current state and bounded timeline of one pipeline's installs."""

    state: InstallState = InstallState.PENDING
    reason: str = ""
    timeline: list[TimelineEntry] = field(default_factory=list)

    def move(self, to: InstallState, reason: str, at: float, progress: float | None = None) -> None:
        """Take a transition and record it.

        Raises:
            IllegalTransition: the table does not allow it.
        """
        if self.timeline and not is_valid_transition(self.state, to):
            raise IllegalTransition(f"install cannot go from {self.state} to {to}")
        if (
            to is InstallState.DOWNLOADING
            and self.state is InstallState.DOWNLOADING
            and (self.timeline and self.timeline[-1].state is InstallState.DOWNLOADING)
        ):
            # Progress ticks replace each other so the timeline stays readable.
            self.timeline[-1] = TimelineEntry(to, reason, at, progress)
        else:
            self.timeline.append(TimelineEntry(to, reason, at, progress))
        del self.timeline[:-TIMELINE_LIMIT]
        self.state, self.reason = to, reason

    def restart(self, reason: str, at: float) -> None:
        """Begin a new install; an install still in progress is first marked `failed`.

        An install found in progress can only mean the agent died during it (the
        durable tracker is written at each step), so it is closed as interrupted.
        """
        if self.timeline and self.state in _IN_PROGRESS:
            self.move(InstallState.FAILED, "interrupted: agent restarted mid-install", at)
        if not self.timeline or self.state is not InstallState.PENDING:
            self.move(InstallState.PENDING, reason, at)

    def to_json(self) -> dict[str, Any]:
        """Durable / wire form."""
        return {
            "state": str(self.state),
            "reason": self.reason,
            "timeline": [e.to_json() for e in self.timeline],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstallTracker:
        """Parse the durable form."""
        return cls(
            InstallState(data.get("state", "pending")),
            str(data.get("reason", "")),
            [TimelineEntry.from_json(e) for e in data.get("timeline", [])],
        )
