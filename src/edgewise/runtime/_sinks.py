"""Built-in sinks: where results go.

A sink factory takes `(params, pipeline_name)`, `params` being the stage's model from
`edgewise.protocol._stages`.

Sinks run on the executor's thread right after a batch, so each `emit` only hands the
result off: the log sink formats one line, MQTT publishing is queued inside paho, the
HTTP callback sink puts it on a bounded queue drained by its own thread (dropping and
counting when full), and the summary sink adds to windowed counters that the agent
collects with its telemetry (`Runtime.summaries`).

Results leave as JSON (`encode`), as the local inference API writes them: a confidence
that is not a number (a model's NaN) is `null`. A sink whose far end is down or hostile
counts what it could not deliver and stays bounded: in memory (queues of fixed size) and
in time (closing waits `close_grace_s` at most).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from edgewise.protocol._stages import (
    HttpSinkParams,
    LogSinkParams,
    MqttSinkParams,
    NoParams,
)
from edgewise.runtime._stages import SINKS, SOURCES

__all__ = ["HttpCallbackSink", "LogSink", "MqttSink", "SummarySink", "encode"]

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


def encode(result: Any) -> bytes:
    """A result's summary as JSON: NaN and infinities are null, other values text."""
    return orjson.dumps(_brief(result), default=str)


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
        """Log the result (one line: JSON escapes line breaks and control characters)."""
        log.log(self.level, "%s", encode(result).decode())


@SINKS.register("mqtt", typed=True)
class MqttSink:
    """Publishes each result as JSON to `topic` with `qos`.

    A broker that is down (at start, or later) is retried by paho in its thread. Until it
    is back, results of qos 0 are dropped and those of qos 1 and 2 wait in paho, at most
    `QUEUE` of them; what is dropped is counted in `dropped`, the rest in `published`.
    Closing flushes for `close_grace_s` at most: a broker that stopped reading (hung,
    not gone) cannot hold a pipeline's stop until the keepalive gives up on it.
    """

    QUEUE = 10_000

    def __init__(self, params: MqttSinkParams, pipeline: str, close_grace_s: float = 10.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

        self.topic = params.topic or f"edgewise/results/{pipeline}"
        self.qos = params.qos
        self.close_grace_s = close_grace_s
        self.published = 0
        self.dropped = 0
        # What publish() answers for a result that paho sends or keeps for the broker.
        self._kept = {MQTTErrorCode.MQTT_ERR_SUCCESS}
        if self.qos:
            self._kept.add(MQTTErrorCode.MQTT_ERR_NO_CONN)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.max_queued_messages_set(self.QUEUE)
        where = (params.host, params.port)
        try:  # connected before the first result, when the broker is up
            self.client.connect(*where)
        except OSError as exc:  # paho's thread keeps trying
            log.warning("mqtt sink %s: no broker at %s:%s (retrying): %s", self.topic, *where, exc)
        self.client.loop_start()

    def emit(self, result: Any) -> None:
        """Queue the publish (paho sends from its own thread)."""
        info = self.client.publish(self.topic, encode(result), qos=self.qos)
        if info.rc in self._kept:
            self.published += 1
        else:  # qos 0 without a broker, or paho's queue is full
            self.dropped += 1

    def close(self) -> None:
        """Flush (for `close_grace_s` at most) and disconnect."""
        # paho's thread ends once it has written what it holds; past the grace, the
        # connection is cut under it, which ends it too.
        cut = threading.Timer(self.close_grace_s, self._cut)
        cut.start()
        try:
            self.client.loop_stop()
        finally:
            cut.cancel()
        self.client.disconnect()

    def _cut(self) -> None:
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # (TCP, TLS; paho's websocket is not one)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _read_some(response: Any, limit: int, until: float) -> None:
    """Read a response's body up to `limit` bytes and until `until` (monotonic time)."""
    got = 0
    for chunk in response.iter_raw():
        got += len(chunk)
        if got > limit or time.monotonic() > until:
            return


@SINKS.register("http", typed=True)
class HttpCallbackSink:
    """POSTs each result as JSON to `url` from a background thread.

    Of an answer's body, `BODY_BYTES` at most are read (so that a usual answer leaves the
    connection for the next result), and for no longer than the timeout: a server that
    answers with an endless body holds the sender no longer than one that answers at
    all. Closing sends what is queued for `close_grace_s` at most, then drops (and
    counts) the rest, so that a server that hangs cannot hold a pipeline's stop.
    """

    BODY_BYTES = 65_536

    def __init__(self, params: HttpSinkParams, pipeline: str, close_grace_s: float = 10.0) -> None:
        import httpx

        self.url = params.url
        self.timeout_s = params.timeout_s
        self.close_grace_s = close_grace_s
        self.dropped = 0
        self.failed = 0
        self.sent = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=params.queue)
        self._client = httpx.Client(timeout=params.timeout_s)
        self._deadline: float | None = None  # set by close(): the sender's last moment
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def emit(self, result: Any) -> None:
        """Hand the result to the sender thread; drop (and count) when it is behind."""
        try:
            self._queue.put_nowait(encode(result))
        except queue.Full:
            self.dropped += 1

    def _next(self) -> bytes | None:
        """The next result to send; None to stop (closed, and nothing left or no time).

        What is left when the time is up stays queued: close() counts it.
        """
        deadline = self._deadline
        if deadline is None:
            return self._queue.get()
        if time.monotonic() >= deadline:
            return None
        try:
            return self._queue.get_nowait()  # closing: no waiting for more
        except queue.Empty:
            return None

    def _discard(self) -> int:
        """Empty the queue; how many results it held."""
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            n += item is not None

    def _loop(self) -> None:
        import httpx

        try:
            while (body := self._next()) is not None:
                timeout = self.timeout_s
                if self._deadline is not None:
                    timeout = max(0.001, min(timeout, self._deadline - time.monotonic()))
                try:
                    with self._client.stream(
                        "POST",
                        self.url,
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=timeout,
                    ) as response:
                        _read_some(response, self.BODY_BYTES, time.monotonic() + timeout)
                        response.raise_for_status()
                    self.sent += 1
                except httpx.HTTPError:
                    self.failed += 1
                except Exception as exc:  # the sender must outlive any one result
                    self.failed += 1
                    log.warning("http sink %s: %r", self.url, exc)
        finally:
            self._client.close()

    def close(self) -> None:
        """Send what is queued, for `close_grace_s` at most, then stop.

        What could not be sent by then is dropped and counted. A request still on its
        way then finishes in the background (within its timeout), uncounted until it does.
        """
        self._deadline = time.monotonic() + self.close_grace_s
        with contextlib.suppress(queue.Full):  # (full: the sender sees the deadline next)
            self._queue.put_nowait(None)  # wakes a sender waiting on an empty queue
        self._thread.join(timeout=self.close_grace_s)
        self.dropped += self._discard()
        with contextlib.suppress(queue.Full):  # for a sender that had yet to look
            self._queue.put_nowait(None)


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
        # Over the rows with a confidence that is a number: a model without scores gives
        # None, and one NaN would make the window's mean NaN.
        self.confidence_sum = 0.0
        self.confidence_count = 0

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
                if conf is not None and math.isfinite(conf):
                    self.confidence_sum += conf
                    self.confidence_count += 1
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
                "mean_confidence": (
                    self.confidence_sum / self.confidence_count if self.confidence_count else None
                ),
            }
            if reset:
                self._reset(now)
            return snap
