"""Per-pipeline telemetry windows: the glue between the runtime and the telemetry buffer.

Every `window_s` the agent notes each running pipeline's cumulative runtime stats in its
`edgewise.agent.telemetry.WindowAggregator` and buffers the closed window (counts,
latency per stage, confidence, resources, uplink state), already filtered by the egress
policy of the accepted desired state. A hot swap closes the window of the old model
first, so no window mixes two versions. With no pipeline running nothing is imported
and nothing is recorded: an idle agent stays small and quiet.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgewise.agent._host import Host

__all__ = ["TelemetryWindows"]

NewRecord = tuple[str, str, dict[str, Any], float]


class TelemetryWindows:
    """Closes one telemetry window per running pipeline every `window_s()` seconds."""

    def __init__(
        self,
        host: Host,
        append: Callable[[list[NewRecord]], object],
        bundle_dir: Callable[[str], tuple[Path, str] | None],
        egress: Callable[[], dict[str, Any]],
        online: Callable[[], bool],
        window_s: Callable[[], float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args are the agent's views: `bundle_dir(pipeline)` -> (slot dir, deployment)."""
        self.host = host
        self.append = append
        self.bundle_dir = bundle_dir
        self.egress = egress
        self.online = online
        self.window_s = window_s
        self.clock = clock
        self._aggs: dict[str, Any] = {}
        self._served: dict[str, str] = {}  # pipeline -> model key its window describes
        self._readers: Any = None
        self.errors = 0

    def _make(self, name: str, model_key: str) -> Any:
        from edgewise.agent.telemetry import WindowAggregator, reference_from_manifest
        from edgewise.protocol import EgressPolicy

        model, _, version = model_key.partition("@")
        reference, labels, deployment = None, [], ""
        found = self.bundle_dir(name)
        if found is not None:
            directory, deployment = found
            try:
                manifest = json.loads((directory / "manifest.json").read_text())
                labels = list(manifest.get("labels") or [])
                if manifest.get("reference"):
                    reference = reference_from_manifest(manifest["reference"])
            except (OSError, ValueError):
                reference = None
        agg = WindowAggregator(
            name,
            model=model,
            version=version,
            deployment=deployment,
            reference=reference,
            labels=labels,
            policy=EgressPolicy.from_desired(self.egress()),
            window_s=self.window_s(),
            clock=self.clock,
        )
        self._served[name] = model_key
        return agg

    def tick(self) -> int:
        """Note stats, close due windows; returns how many records were buffered."""
        running = self.host.running()
        records: list[NewRecord] = []
        for name in list(self._aggs):
            if name not in running:  # stopped: flush its last window
                records += self._aggs.pop(name).close(uplink=self._uplink())
        if not running:
            self._flush(records)
            return len(records)
        if self._readers is None:
            from edgewise.agent.telemetry import ResourceReaders

            self._readers = ResourceReaders()
        stats = self.host.stats()
        resources: dict[str, Any] | None = None
        for name, model_key in running.items():
            agg = self._aggs.get(name)
            fresh = agg is None
            if agg is not None and self._served.get(name) != model_key:  # hot swap
                records += agg.close(uplink=self._uplink())
                agg = None
            if agg is None:
                agg = self._aggs[name] = self._make(name, model_key)
                if fresh:
                    # A pipeline seen for the first time counts from its start, not from
                    # this tick (requests may already have been served).
                    agg.observe_stats({})
            if name in stats:
                agg.observe_stats(stats[name])
            if agg.due():
                resources = resources if resources is not None else self._readers.read()
                records += agg.close(resources=resources, uplink=self._uplink())
        self._flush(records)
        return len(records)

    def _uplink(self) -> dict[str, Any]:
        return {"state": "online" if self.online() else "offline"}

    def _flush(self, records: list[NewRecord]) -> None:
        if records:
            self.append(records)

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set; a failing tick is counted, never fatal."""
        while not stop.wait(max(0.5, self.window_s() / 2)):
            try:
                self.tick()
            except Exception:  # telemetry must never take the agent down
                self.errors += 1
