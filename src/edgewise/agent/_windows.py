"""Per-pipeline telemetry windows: the glue between the runtime and the telemetry buffer.

The agent's `TelemetryHub` (edgewise.agent.telemetry) holds one window per running
pipeline. This loop keeps it in step with the device:

- `configure` whenever the accepted egress policy or the served models change (a hot
  swap closes the window of the old model first, so no window mixes two versions), with
  the drift reference and labels read from the served bundle's manifest;
- the inputs the runtime sampled (`Runtime.sampled_inputs`, at the pipeline's sample
  rate) are recorded, so windows carry feature histograms and drift scores of the inputs
  actually served; the confidence histogram comes from the runtime's counters, which
  see every request;
- `tick` closes the due windows; their records, already filtered by the egress policy,
  go to the durable buffer.

With no pipeline running nothing is imported and nothing is recorded: an idle agent
stays small and quiet.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.agent._host import Host

if TYPE_CHECKING:
    from edgewise.agent.telemetry import PipelineInfo, TelemetryHub

__all__ = ["TelemetryWindows"]

NewRecord = tuple[str, str, dict[str, Any], float]
# While pipelines run, sampled inputs are pulled this often: the runtime keeps only the
# last few dozen, so pulling once per window would lose most of a busy pipeline's.
_SAMPLE_POLL_S = 1.0


class TelemetryWindows:
    """Feeds the telemetry hub from the runtime and buffers every closed window."""

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
        self.hub: TelemetryHub | None = None
        self._infos: dict[str, tuple[str, PipelineInfo]] = {}  # name -> (model key, info)
        self._configured: tuple[str, dict[str, str]] | None = None
        self._good_egress: dict[str, Any] = {}
        self._last_sample: dict[str, Any] = {}  # name -> last sampled entry recorded
        self.errors = 0
        self.policy_errors = 0

    # -- configuration ----------------------------------------------------------------

    def _info(self, name: str, model_key: str) -> PipelineInfo:
        from edgewise.agent.telemetry import PipelineInfo

        cached = self._infos.get(name)
        if cached is not None and cached[0] == model_key:
            return cached[1]
        model, _, version = model_key.partition("@")
        manifest: dict[str, Any] | None = None
        deployment = ""
        found = self.bundle_dir(name)
        if found is not None:
            directory, deployment = found
            try:
                loaded = json.loads((directory / "manifest.json").read_text())
                manifest = loaded if isinstance(loaded, dict) else None
            except (OSError, ValueError):
                manifest = None
        info = PipelineInfo(model, version, deployment, manifest)
        self._infos[name] = (model_key, info)
        return info

    def _configure(self, hub: TelemetryHub, running: dict[str, str]) -> None:
        egress = self.egress()
        key = (json.dumps(egress, sort_keys=True, default=str), dict(running))
        if key == self._configured:
            return
        for name in list(self._infos):
            if name not in running:
                del self._infos[name]
                self._last_sample.pop(name, None)
        pipelines = {name: self._info(name, mk) for name, mk in running.items()}
        try:
            hub.configure(egress, pipelines)
            self._good_egress = egress
        except ValueError:
            # An invalid policy must not open the gates: keep the last valid one.
            self.policy_errors += 1
            hub.configure(self._good_egress, pipelines)
        self._configured = key

    # -- sampled inputs ---------------------------------------------------------------

    def _record_samples(self, hub: TelemetryHub, running: dict[str, str]) -> None:
        sampled = getattr(self.host, "sampled_inputs", None)
        if sampled is None:  # a host without a runtime (the simulator's) samples nothing
            return
        for name in running:
            entries: list[Any] = sampled(name)
            if not entries:
                continue
            last = self._last_sample.get(name)
            start = 0
            if last is not None:
                # The runtime keeps a bounded deque; what follows the entry recorded
                # last is new (identity is safe: this object holds that entry).
                for i in range(len(entries) - 1, -1, -1):
                    if entries[i] is last:
                        start = i + 1
                        break
            fresh = entries[start:]
            self._last_sample[name] = entries[-1]
            if fresh:
                hub.observe_sampled(name, [e[0] for e in fresh], [e[1] for e in fresh])

    # -- the tick ---------------------------------------------------------------------

    def _ensure_hub(self) -> TelemetryHub:
        if self.hub is None:
            from edgewise.agent.telemetry import TelemetryHub

            self.hub = TelemetryHub(window_s=self.window_s(), clock=self.clock)
        return self.hub

    def tick(self) -> int:
        """Sync the hub with the device, close due windows; returns records buffered."""
        running = self.host.running()
        if not running and (self.hub is None or not self.hub.windows):
            return 0
        hub = self._ensure_hub()
        hub.window_s = self.window_s()
        stats = self.host.stats() if running else {}
        for name, s in stats.items():
            agg = hub.windows.get(name)
            if agg is not None:  # a swap below closes the old window with these counts
                agg.observe_stats(s)
        fresh = [name for name in running if name not in hub.windows]
        self._configure(hub, running)
        for name in fresh:
            if name in hub.windows:
                # A pipeline seen for the first time counts from its start, not from
                # this tick (requests may already have been served).
                hub.windows[name].observe_stats({})
        self._record_samples(hub, running)
        records = hub.tick(stats, uplink=self._uplink())
        if records:
            self.append(records)
        return len(records)

    def _uplink(self) -> dict[str, Any]:
        return {"state": "online" if self.online() else "offline"}

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set; a failing tick is counted, never fatal."""
        while True:
            wait = max(0.5, self.window_s() / 2)
            if self.hub is not None and self.hub.windows:
                wait = min(wait, _SAMPLE_POLL_S)
            if stop.wait(wait):
                return
            try:
                self.tick()
            except Exception:  # telemetry must never take the agent down
                self.errors += 1
