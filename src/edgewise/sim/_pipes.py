"""A simulated device's pipelines and the report built from them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from edgewise.protocol import (
    AgentInfo,
    DesiredModelRef,
    PipelineReport,
    PipelineStatus,
    Report,
    TimelineEntry,
)
from edgewise.sim._behaviour import ModelBehaviour

__all__ = ["Pipe", "build_report", "model_ref"]

_MAX_TIMELINE = 40


@dataclass
class Pipe:
    """One pipeline on the device.

    Attributes:
        running: the model in the active slot (None: nothing installed yet).
        behaviour: how that model behaves.
        slot: the active slot.
        deployment: the deployment the pipeline comes from.
        window_started: when its open telemetry window started (monotonic).
        target: the model being installed (None: none).
        status: install status as reported.
        reason: why.
        timeline: install steps, oldest first.
        crashes: install crashes per target digest.
    """

    running: DesiredModelRef | None = None
    behaviour: ModelBehaviour | None = None
    slot: Literal["a", "b"] | None = None
    deployment: str = ""
    window_started: float = field(default_factory=time.monotonic)
    target: DesiredModelRef | None = None
    status: PipelineStatus = "pending"
    reason: str = ""
    timeline: list[TimelineEntry] = field(default_factory=list)
    crashes: Counter[str] = field(default_factory=Counter)

    def move(self, state: PipelineStatus, at: float, reason: str = "") -> None:
        """Enter `state` and record it on the timeline."""
        self.status, self.reason = state, reason
        self.timeline.append(TimelineEntry(state=state, reason=reason, at=at))
        del self.timeline[:-_MAX_TIMELINE]


def model_ref(m: DesiredModelRef) -> str:
    """`name@version` of a model reference."""
    return f"{m.name}@{m.version}"


def build_report(
    pipes: Mapping[str, Pipe], revision: int, errors: Sequence[str], agent: AgentInfo
) -> Report:
    """The report of a device with these pipelines."""
    pipelines = {}
    for name, pipe in pipes.items():
        shown = pipe.target or pipe.running
        if shown is None:
            continue
        pipelines[name] = PipelineReport(
            model=shown.name,
            version=shown.version,
            slot=pipe.slot if pipe.target is None else None,
            status=pipe.status,
            reason=pipe.reason,
            timeline=list(pipe.timeline),
        )
    return Report(revision=revision, pipelines=pipelines, errors=list(errors), agent=agent)
