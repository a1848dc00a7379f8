"""Built-in sinks: where results go.

A sink factory takes `(params, pipeline_name)`, `params` being the stage's model from
`edgewise.protocol._stages`.

Sinks run on the executor's thread right after a batch, so each `emit` only hands the
result off: the log sink formats one line, MQTT publishing is queued inside paho, the
HTTP callback sink puts it on a bounded queue drained by its own thread (dropping and
counting when full), and the summary sink adds to windowed counters that the agent
collects with its telemetry (`Runtime.summaries`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edgewise.protocol._stages import (
    HttpSinkParams,
    LogSinkParams,
    MqttSinkParams,
    NoParams,
)
from edgewise.runtime._stages import SINKS, SOURCES

__all__ = ["HttpCallbackSink", "LogSink", "MqttSink", "SummarySink"]

log = logging.getLogger("edgewise.runtime.results")


def _brief(result: Any) -> dict[str, Any]:
    return {
        "pipeline": result.pipeline,
        "model": result.model,
        "tier": result.tier,
        "labels": result.labels,
        "confidences": result.confidences,
        "escalated": result.escalated,
    }


@SOURCES.register("http", typed=True)
class HttpSource:
    """The local inference API is the source: nothing to run."""

    def __init__(self, params: NoParams, runtime: Any, pipeline: str) -> None:
        self.pipeline = pipeline

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


@SINKS.register("log", typed=True)
class LogSink:
    """One log line per result."""

    def __init__(self, params: LogSinkParams, pipeline: str) -> None:
        self.level: int = logging.getLevelName(params.level)

    def emit(self, result: Any) -> None:
        """Log the result."""
        log.log(self.level, "%s", json.dumps(_brief(result)))


@SINKS.register("mqtt", typed=True)
class MqttSink:
    """Publishes each result as JSON to `topic` with `qos`."""

    def __init__(self, params: MqttSinkParams, pipeline: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = params.topic or f"edgewise/results/{pipeline}"
        self.qos = params.qos
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.connect(params.host, params.port)
        self.client.loop_start()
        self.published = 0

    def emit(self, result: Any) -> None:
        """Queue the publish (paho sends from its own thread)."""
        self.client.publish(self.topic, json.dumps(_brief(result)), qos=self.qos)
        self.published += 1

    def close(self) -> None:
        """Flush and disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


@SINKS.register("http", typed=True)
class HttpCallbackSink:
    """POSTs each result as JSON to `url` from a background thread."""

    def __init__(self, params: HttpSinkParams, pipeline: str) -> None:
        import httpx

        self.url = params.url
        self.dropped = 0
        self.failed = 0
        self.sent = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=params.queue)
        self._client = httpx.Client(timeout=params.timeout_s)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def emit(self, result: Any) -> None:
        """Hand the result to the sender thread; drop (and count) when it is behind."""
        try:
            self._queue.put_nowait(_brief(result))
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        import httpx

        while (item := self._queue.get()) is not None:
            try:
                self._client.post(self.url, json=item).raise_for_status()
                self.sent += 1
            except httpx.HTTPError:
                self.failed += 1

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._client.close()


@SINKS.register("summary", typed=True)
class SummarySink:
    """Counts per label and tier over a window; the agent ships them with telemetry."""

    def __init__(
        self,
        params: NoParams,
        pipeline: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline = pipeline
        self._clock = clock
        self._lock = threading.Lock()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.window_start = now
        self.count = 0
        self.labels: dict[str, int] = {}
        self.tiers: dict[str, int] = {}
        self.escalated = 0
        self.confidence_sum = 0.0

    def emit(self, result: Any) -> None:
        """Add one result to the window."""
        with self._lock:
            for label, conf, esc in zip(
                result.labels, result.confidences, result.escalated, strict=True
            ):
                self.count += 1
                key = str(label)
                self.labels[key] = self.labels.get(key, 0) + 1
                self.escalated += bool(esc)
                self.confidence_sum += conf or 0.0
            self.tiers[result.tier] = self.tiers.get(result.tier, 0) + len(result.labels)

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        """The window so far; with `reset`, start a new one."""
        with self._lock:
            now = self._clock()
            snap = {
                "pipeline": self.pipeline,
                "window_start": self.window_start,
                "window_end": now,
                "count": self.count,
                "labels": dict(self.labels),
                "tiers": dict(self.tiers),
                "escalated": self.escalated,
                "mean_confidence": self.confidence_sum / self.count if self.count else None,
            }
            if reset:
                self._reset(now)
            return snap
