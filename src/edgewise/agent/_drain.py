"""The telemetry drain: upload the durable buffer in gzip batches, shaped and backed off.

After a reconnect a device may hold hours of records; the token bucket spreads them at
`rate` records per second so a fleet coming back together does not flood ingest, and a
429/503 `Retry-After` from the control plane slows the drain further through the shared
backoff policy. Records leave the buffer only once acknowledged, so a crash between
upload and ack re-sends them and the control plane's (device, seq) dedup keeps ingest
exactly-once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from edgewise.agent._backoff import Backoff, RetryableError
from edgewise.agent._buffer import TelemetryBuffer
from edgewise.agent._ratelimit import TokenBucket
from edgewise.protocol import TelemetryAck, TelemetryBatch

__all__ = ["TelemetryDrain"]


class TelemetryDrain:
    """Moves records from the buffer to the control plane until stopped."""

    def __init__(
        self,
        buffer: TelemetryBuffer,
        send: Callable[[TelemetryBatch], TelemetryAck],
        bucket: TokenBucket,
        backoff: Backoff,
        max_batch: int = 500,
        idle_s: float = 2.0,
    ) -> None:
        self.buffer = buffer
        self.send = send
        self.bucket = bucket
        self.backoff = backoff
        self.max_batch = max_batch
        self.idle_s = idle_s
        self.wake = threading.Event()
        self.uploaded = 0
        self.last_error = ""
        self._attempt = 0

    def step(self, sleep: Callable[[float], bool]) -> bool:
        """Upload one batch if any; returns False when the buffer was empty.

        `sleep(seconds)` waits and returns True if the drain should stop.
        """
        batch = self.buffer.peek(max_records=self.max_batch)
        if not batch.records:
            return False
        wait = self.bucket.take(len(batch.records))
        if wait > 0 and sleep(wait):
            return True
        try:
            self.send(batch)
        except RetryableError as exc:
            self.last_error = str(exc)
            delay = self.backoff.delay(self._attempt, exc.retry_after)
            self._attempt += 1
            sleep(delay)
            return True
        except Exception as exc:  # a refused batch: keep it, retry later, do not spin
            self.last_error = f"{type(exc).__name__}: {exc}"
            if getattr(exc, "status", 0) == 413 and self.max_batch > 1:
                self.max_batch //= 2
            sleep(self.backoff.delay(self._attempt))
            self._attempt += 1
            return True
        # Only an ack that reached the disk ends the backoff (see `run`).
        self.buffer.ack([r.seq for r in batch.records])
        self._attempt = 0
        self.last_error = ""
        self.uploaded += len(batch.records)
        return True

    def run(self, stop: threading.Event) -> None:
        """Drain until `stop` is set."""

        def sleep(seconds: float) -> bool:
            return stop.wait(seconds)

        while not stop.is_set():
            try:
                busy = self.step(sleep)
            except Exception as exc:  # the buffer's disk (full, damaged): never fatal
                # The batch stays; sent again it is stored once ((device, seq) dedup).
                self.last_error = f"buffer: {type(exc).__name__}: {exc}"
                sleep(self.backoff.delay(self._attempt))
                self._attempt += 1
                continue
            if not busy:
                self.wake.wait(self.idle_s)
                self.wake.clear()
