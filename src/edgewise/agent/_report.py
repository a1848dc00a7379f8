"""What the agent tells others: the report to the control plane and the local status.

Both are pure functions of the durable `AgentState`, so what a restart reports is what
was committed, and tests check them without servers.
"""

from __future__ import annotations

from typing import Any

from edgewise.agent._state import AgentState
from edgewise.protocol import AgentInfo, PipelineReport, Report, TimelineEntry

__all__ = ["build_report", "status_document"]


def build_report(state: AgentState, agent: AgentInfo, sent_at: float | None = None) -> Report:
    """The `POST /device/v1/report` body, built at `sent_at` (unix seconds).

    Each pipeline reports the install its status is about (the target), with the slot
    only when that target is the committed model.
    """
    pipelines: dict[str, PipelineReport] = {}
    for name, rec in state.pipelines.items():
        c = rec.committed or {}
        ref = rec.target or c.get("model") or {}
        slot = None
        if c and ref.get("sha256") == c["model"]["sha256"]:
            slot = c["model"]["slot"]
        pipelines[name] = PipelineReport(
            model=str(ref.get("name", "")),
            version=str(ref.get("version", "")),
            slot=slot,
            status=str(rec.tracker.state),
            reason=rec.tracker.reason,
            timeline=[
                TimelineEntry(state=str(e.state), reason=e.reason, at=e.at, progress=e.progress)
                for e in rec.tracker.timeline
            ],
        )
    return Report(
        revision=state.revision or 0,
        pipelines=pipelines,
        errors=list(state.errors),
        agent=agent,
        sent_at=sent_at,
    )


def status_document(state: AgentState, running: dict[str, str]) -> dict[str, Any]:
    """The local `/status` body, less the live counters the agent adds."""
    pipelines = {}
    for name, rec in list(state.pipelines.items()):
        m = (rec.committed or {}).get("model") or {}
        pipelines[name] = {
            "model": m.get("name"),
            "version": m.get("version"),
            "slot": m.get("slot"),
            "serving": running.get(name),
            "status": str(rec.tracker.state),
            "reason": rec.tracker.reason,
            "target": rec.target,
        }
    return {
        "revision": state.revision,
        "last_sync": state.last_sync,
        "pipelines": pipelines,
        "errors": list(state.errors),
    }
