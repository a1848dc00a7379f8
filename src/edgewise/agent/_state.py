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
from edgewise.protocol import SignedDesiredState

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
        """Parse the durable form.

        Raises:
            ValueError: a field of the wrong type (a damaged file, not a torn one).
        """
        committed = _typed(data.get("committed"), dict, "committed")
        if committed is not None:
            model = committed.get("model")
            if not isinstance(model, dict) or not all(
                isinstance(model.get(k), str) for k in ("name", "slot")
            ):
                raise ValueError("committed.model must name its model and slot")
            _typed(committed.get("spec"), dict, "committed.spec")
            _typed(committed.get("companions"), dict, "committed.companions")
        return cls(
            committed=committed,
            target=_typed(data.get("target"), dict, "target"),
            tracker=InstallTracker.from_json(_typed(data.get("tracker"), dict, "tracker") or {}),
            refused=str(data.get("refused", "")),
            retry_at=_typed(data.get("retry_at"), float, "retry_at"),
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
    def from_json(cls, data: Any) -> AgentState:
        """Parse the durable form.

        Raises:
            ValueError: not an object, or a field of the wrong type (a damaged file): the
                accepted document must still read as a signed desired state.
        """
        if not isinstance(data, dict):
            raise ValueError("state must be an object")
        desired = _typed(data.get("desired"), dict, "desired")
        if desired is not None:
            SignedDesiredState.model_validate(desired)  # a ValidationError is a ValueError
        pipelines = _typed(data.get("pipelines"), dict, "pipelines") or {}
        for name, record in pipelines.items():
            _typed(record, dict, f"pipelines.{name}")
        errors = _typed(data.get("errors"), list, "errors") or []
        try:  # (an install tracker's timeline reads its entries by key)
            records = {k: PipelineRecord.from_json(v) for k, v in pipelines.items()}
        except (KeyError, AttributeError, IndexError) as exc:
            raise ValueError(f"state.json: a pipeline record does not read: {exc!r}") from None
        return cls(
            revision=_typed(data.get("revision"), int, "revision"),
            desired=desired,
            etag=_typed(data.get("etag"), str, "etag"),
            pipelines=records,
            errors=[str(e) for e in errors],
            last_sync=_typed(data.get("last_sync"), float, "last_sync"),
        )


def _typed(value: Any, kind: type, where: str) -> Any:
    """`value` when None or of `kind` (an int counts as a float, a bool as neither)."""
    kinds: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    raise ValueError(f"state.json: {where} is not a {kind.__name__}")


class StateFile:
    """Load and commit `AgentState` crash-safely."""

    def __init__(self, path: Path) -> None:
        # A file whose fields have the wrong types counts as torn: `.prev`, else fresh.
        self._file = DurableJson(path, check=AgentState.from_json)

    @property
    def recovered_from_prev(self) -> bool:
        """Whether the last load found a torn file and used the previous commit."""
        return self._file.recovered_from_prev

    def load(self) -> AgentState:
        """The last committed state (a fresh one if neither commit is usable)."""
        state = self._file.load(default=None)
        return state if isinstance(state, AgentState) else AgentState()

    def save(self, state: AgentState) -> None:
        """Commit durably."""
        self._file.commit(state.to_json())
