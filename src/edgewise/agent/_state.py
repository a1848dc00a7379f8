"""The agent's durable state: the last accepted desired state and each pipeline's record.

One JSON document (`DIR/state.json`, committed with `DurableJson`) holds everything the
agent needs to serve after a restart with no control plane: the last accepted signed
desired-state document, and per pipeline the committed model (the commit point of an
install) plus the install tracker that explains what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.agent._durable import DurableJson
from edgewise.agent._install import InstallTracker

__all__ = ["AgentState", "PipelineRecord", "StateFile"]

MAX_ERRORS = 20


@dataclass
class PipelineRecord:
    """One pipeline on this device.

    Attributes:
        committed: what serves after a restart: {"model", "version", "sha256", "slot",
            "spec", "deployment", "fingerprint", "companions": {role: {..., "slot"}}};
            None until the first install commits.
        target: the model ref ({"name", "version", "sha256", "fingerprint"}) of the
            install in progress or last attempted.
        tracker: the install state machine and its timeline.
        refused: fingerprint of a refused install; `retry_at` None means never retry.
    """

    committed: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    tracker: InstallTracker = field(default_factory=InstallTracker)
    refused: str = ""
    retry_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Durable form."""
        return {
            "committed": self.committed,
            "target": self.target,
            "tracker": self.tracker.to_json(),
            "refused": self.refused,
            "retry_at": self.retry_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineRecord:
        """Parse the durable form."""
        return cls(
            committed=data.get("committed"),
            target=data.get("target"),
            tracker=InstallTracker.from_json(data.get("tracker") or {}),
            refused=str(data.get("refused", "")),
            retry_at=data.get("retry_at"),
        )


@dataclass
class AgentState:
    """Everything the agent keeps across restarts (besides identity, slots and telemetry)."""

    revision: int | None = None
    desired: dict[str, Any] | None = None  # the accepted SignedDesiredState, as JSON
    etag: str | None = None
    pipelines: dict[str, PipelineRecord] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    last_sync: float | None = None

    def add_error(self, message: str) -> None:
        """Remember a refusal to report (bounded, newest last, no repeats in a row)."""
        if not self.errors or self.errors[-1] != message:
            self.errors.append(message)
        del self.errors[:-MAX_ERRORS]

    def to_json(self) -> dict[str, Any]:
        """Durable form."""
        return {
            "revision": self.revision,
            "desired": self.desired,
            "etag": self.etag,
            "pipelines": {k: v.to_json() for k, v in self.pipelines.items()},
            "errors": self.errors,
            "last_sync": self.last_sync,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        """Parse the durable form."""
        return cls(
            revision=data.get("revision"),
            desired=data.get("desired"),
            etag=data.get("etag"),
            pipelines={
                k: PipelineRecord.from_json(v) for k, v in (data.get("pipelines") or {}).items()
            },
            errors=list(data.get("errors") or []),
            last_sync=data.get("last_sync"),
        )


class StateFile:
    """Load and commit `AgentState` crash-safely."""

    def __init__(self, path: Path) -> None:
        self._file = DurableJson(path)

    @property
    def recovered_from_prev(self) -> bool:
        """Whether the last load found a torn file and used the previous commit."""
        return self._file.recovered_from_prev

    def load(self) -> AgentState:
        """The last committed state (a fresh one if none)."""
        doc = self._file.load(default=None)
        if not isinstance(doc, dict):
            return AgentState()
        try:
            return AgentState.from_json(doc)
        except (KeyError, TypeError, ValueError):
            return AgentState()

    def save(self, state: AgentState) -> None:
        """Commit durably."""
        self._file.commit(state.to_json())
