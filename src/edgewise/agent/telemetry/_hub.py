"""One object for the agent loop: every pipeline's window, one egress policy, one clock.

Usage (in the agent)::

    hub = TelemetryHub(window_s=settings["telemetry_window_s"])
    hub.configure(desired.egress, {name: PipelineInfo(model, version, deployment, manifest)})
    hub.record("digits", x, result)                      # per served request (cheap)
    hub.observe_sampled("digits", [x1, x2], ["7", "1"])  # or the runtime's sampled inputs
    buffer.append(hub.tick(host.stats(), uplink={"state": "online", "buffer_depth": n}))
    buffer.append(hub.event("install.failed", {...}))    # any event, through the policy

`tick` closes the windows that are due and returns their records, already filtered by
the egress policy; a pipeline that disappeared from the desired state gets its last
window closed on the next `configure`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgewise.agent.telemetry._drift import reference_from_manifest
from edgewise.agent.telemetry._resources import ResourceReaders
from edgewise.agent.telemetry._window import NewRecord, WindowAggregator
from edgewise.protocol import EgressPolicy, filter_payload

__all__ = ["PipelineInfo", "TelemetryHub"]


@dataclass(frozen=True)
class PipelineInfo:
    """What a window needs to know of the pipeline's model."""

    model: str
    version: str
    deployment: str = ""
    manifest: Mapping[str, Any] | None = None  # for the drift reference and labels


class TelemetryHub:
    """Telemetry windows of all pipelines on one device."""

    def __init__(
        self,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        readers: ResourceReaders | None = None,
    ) -> None:
        """Windows of `window_s` seconds by `clock`; resources from `readers`."""
        self.window_s = window_s
        self.clock = clock
        self.readers = readers or ResourceReaders()
        self.policy = EgressPolicy()
        self.windows: dict[str, WindowAggregator] = {}
        self._info: dict[str, PipelineInfo] = {}
        self._closing: list[NewRecord] = []

    def configure(
        self, egress: Mapping[str, Any] | None, pipelines: Mapping[str, PipelineInfo]
    ) -> None:
        """Apply a desired state's egress policy and pipeline set.

        Raises:
            pydantic.ValidationError: the egress policy is invalid (keep the old one).
        """
        self.policy = EgressPolicy.from_desired(egress)
        for name in list(self.windows):
            if name not in pipelines:
                self._closing += self.windows.pop(name).close()
                self._info.pop(name, None)
        for name, info in pipelines.items():
            agg = self.windows.get(name)
            if agg is None:
                agg = self.windows[name] = WindowAggregator(
                    name, window_s=self.window_s, clock=self.clock, policy=self.policy
                )
            agg.set_policy(self.policy)
            if self._info.get(name) != info:
                if name in self._info:  # a model swap ends the window on the old model
                    self._closing += agg.close()
                manifest = info.manifest or {}
                ref = manifest.get("reference")
                agg.deployment = info.deployment
                agg.set_model(
                    info.model,
                    info.version,
                    reference_from_manifest(ref) if isinstance(ref, Mapping) else None,
                    list(manifest.get("labels") or []),
                )
                self._info[name] = info

    def record(self, pipeline: str, inputs: Any, result: Any) -> None:
        """Offer one served request (`result` has `confidences` and `labels`)."""
        agg = self.windows.get(pipeline)
        if agg is not None:
            agg.record(inputs, result.confidences, result.labels)

    def observe_sampled(
        self, pipeline: str, inputs: Sequence[Any], labels: Sequence[str | None]
    ) -> None:
        """Offer inputs the runtime sampled, with their labels but no confidences.

        Each entry is one request's model input; its first row is the one the label
        belongs to, so only that row is counted. Rows count towards feature and
        class-prior drift; the confidence histogram comes from the runtime's counters.
        """
        agg = self.windows.get(pipeline)
        if agg is None or not inputs:
            return
        rows = []
        for entry in inputs:
            a = np.asarray(entry)
            rows.append(a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)[:1])
        width = rows[0].shape[1]
        keep = [i for i, r in enumerate(rows) if r.shape[1] == width]  # a swap may mix shapes
        x = np.concatenate([rows[i] for i in keep])
        agg.record(x, [None] * len(keep), [labels[i] for i in keep])

    def tick(
        self,
        stats: Mapping[str, Mapping[str, Any]] | None = None,
        uplink: Mapping[str, Any] | None = None,
    ) -> list[NewRecord]:
        """Close the windows that are due; returns their records (egress applied)."""
        out, self._closing = self._closing, []
        now = self.clock()
        due = [a for a in self.windows.values() if a.due(now)]
        if not due:
            return out
        resources = self.readers.read()
        for agg in due:
            s = (stats or {}).get(agg.pipeline)
            if s is not None:
                agg.observe_stats(s)
            out += agg.close(now, resources=resources, uplink=uplink)
        return out

    def event(self, kind: str, data: Mapping[str, Any]) -> list[NewRecord]:
        """An event record through the egress policy ([] when events may not leave)."""
        kept = filter_payload(self.policy, "event", kind, data)
        return [] if kept is None else [("event", kind, kept, self.clock())]
