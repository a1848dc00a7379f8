"""Group commit for concurrent telemetry uploads: one transaction for whatever is waiting.

Each HTTP upload used to be its own transaction: a commit (and its WAL flush) per
batch, and the request's thread idle while PostgreSQL wrote. With `GroupCommit`,
uploads that arrive while a write is in progress queue up; when it ends, one of the
waiting threads writes all of them in one `ingest_many` call, and so on. An idle
server still writes an upload at once (a group of one); a busy one writes fewer,
larger transactions while its event loop goes on decoding the next uploads.

Exactly-once is `ingest_many`'s: every upload gets the acknowledgement it would have
had alone. If a group's transaction fails, its uploads are written one by one, so a
bad upload fails only its own request.

On the event loop, `asubmit` waits without a thread: an upload waiting for its group
used to hold one of the server's worker threads, and a wave's first telemetry windows
(hundreds a second) filled the pool, so every other route that needs a thread (an
operator's `rollout status` among them) queued behind them; 28.7 s for one status view
at 10,000 devices. Its writes still run on a worker thread, one group at a time, and
the two kinds of callers share the queue.

On PostgreSQL the uploads go down two lanes, each with its own queue and writer: a
device always takes the same lane (by a hash of its id), so one device's uploads are
never in two transactions at once, and the lanes touch disjoint rows. While one lane
waits for PostgreSQL to store its COPY, the other builds its own; one lane left both
processes idle about 40 % of the time, each waiting for the other (bench/telemetry.py).
SQLite has one writer, so it gets one lane.

Usage::

    group = GroupCommit(TelemetryIngest(engine))
    ack = group.submit("dev-1", columns)         # from any thread; blocks until committed
    ack = await group.asubmit("dev-1", columns)  # from the event loop
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread

from edgewise.control.telemetry._decode import TelemetryColumns
from edgewise.control.telemetry._ingest import TelemetryIngest, Upload
from edgewise.protocol import TelemetryAck

__all__ = ["GroupCommit"]


class _Lane:
    """A queue of uploads with at most one writer at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: deque[_Slot] = deque()
        self.writing = False


@dataclass(eq=False)
class _Slot:
    device_id: str
    batch: Upload
    records: int
    lane: _Lane
    done: Any = field(default_factory=threading.Event)  # threading.Event or _LoopWake
    lead: bool = False  # woken to write the next group rather than with a result
    ack: TelemetryAck | None = None
    error: BaseException | None = None


class GroupCommit:
    """Writes concurrent uploads together, one group per transaction; thread-safe."""

    def __init__(
        self, ingest: TelemetryIngest, max_records: int = 20_000, lanes: int | None = None
    ) -> None:
        """Group uploads for `ingest`, up to about `max_records` records per transaction.

        `lanes`: concurrent writers, each for its own share of the devices (default: 2
        on PostgreSQL, 1 on SQLite).
        """
        if lanes is None:
            lanes = 2 if ingest.postgres else 1
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        self.ingest = ingest
        self.max_records = max_records
        self.groups = 0  # transactions written (a figure for tests and benchmarks)
        self._lanes = [_Lane() for _ in range(lanes)]
        self._count = threading.Lock()

    def lane_of(self, device_id: str) -> int:
        """The lane `device_id`'s uploads always take."""
        n = len(self._lanes)
        return zlib.crc32(device_id.encode()) % n if n > 1 else 0

    def waiting(self) -> int:
        """Uploads queued behind a write, over every lane."""
        return sum(len(lane.queue) for lane in self._lanes)

    def submit(self, device_id: str, batch: Upload) -> TelemetryAck:
        """Store one upload (with whatever else is waiting) and return its acknowledgement.

        Raises:
            Exception: whatever storing this upload alone raised.
        """
        slot = self._enqueue(device_id, batch)
        if not slot.lead:
            slot.done.wait()  # a result, or the lead handed over by the last writer
        if slot.lead:
            self._write_next(slot.lane)  # the leader's slot heads the queue: it is in this group
        if slot.error is not None:
            raise slot.error
        assert slot.ack is not None
        return slot.ack

    async def asubmit(self, device_id: str, batch: Upload) -> TelemetryAck:
        """`submit` for the event loop: waits on a future, writes on a worker thread.

        Raises:
            Exception: whatever storing this upload alone raised.
        """
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        slot = self._enqueue(device_id, batch, lambda s: _LoopWake(self, s, loop, answered))
        if slot.lead:
            slot.done.set()  # write now, as a waiting upload handed the lead does
        # Shielded: a request that goes away leaves the writing (and the hand-over to
        # the next upload) to go on without it.
        await asyncio.shield(answered)
        if slot.error is not None:
            raise slot.error
        assert slot.ack is not None
        return slot.ack

    def _enqueue(
        self,
        device_id: str,
        batch: Upload,
        wake: Callable[[_Slot], _LoopWake] | None = None,
    ) -> _Slot:
        """Queue an upload on its lane; it leads (writes the next group) if nobody writes.

        `wake` makes the slot's `done` for a caller on an event loop.
        """
        slot = _Slot(device_id, batch, _records(batch), self._lanes[self.lane_of(device_id)])
        if wake is not None:
            slot.done = wake(slot)
        lane = slot.lane
        with lane.lock:
            lane.queue.append(slot)
            if not lane.writing:  # invariant: nobody writing => the queue was empty
                lane.writing = True
                slot.lead = True
        return slot

    def _write_next(self, lane: _Lane) -> None:
        """Write the lane's queued group, then hand the lead to its next waiting upload."""
        with lane.lock:
            group: list[_Slot] = []
            total = 0
            while lane.queue and (not group or total + lane.queue[0].records <= self.max_records):
                s = lane.queue.popleft()
                group.append(s)
                total += s.records
        try:
            self._write(group)
        except BaseException as exc:  # not even an answer: every upload of the group fails
            for s in group:
                if s.ack is None and s.error is None:
                    s.error = exc
            raise
        finally:
            # Whatever happened, the waiting uploads are never left without a writer.
            with lane.lock:
                nxt = lane.queue[0] if lane.queue else None
                if nxt is None:
                    lane.writing = False
                else:
                    nxt.lead = True
            for s in group:
                s.done.set()
            if nxt is not None:
                nxt.done.set()

    def _write(self, group: list[_Slot]) -> None:
        try:
            result = self.ingest.ingest_many([(s.device_id, s.batch) for s in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            for s in group:  # one by one: a bad upload fails only itself
                try:
                    s.ack = self.ingest.ingest(s.device_id, s.batch)
                except Exception as one:
                    s.error = one
            return
        finally:
            with self._count:
                self.groups += 1
        for s, ack in zip(group, result.acks, strict=True):
            s.ack = ack


def _records(batch: Upload) -> int:
    return len(batch) if isinstance(batch, TelemetryColumns) else len(batch.records)


class _LoopWake:
    """A slot's `done` for an upload awaited on an event loop; `set` from any thread.

    Set once the slot has its answer, or earlier when the slot is handed the lead: then
    a task of the loop writes the next group on a worker thread (as a waiting thread
    would) and the answer follows.
    """

    def __init__(
        self,
        group: GroupCommit,
        slot: _Slot,
        loop: asyncio.AbstractEventLoop,
        answered: asyncio.Future[None],
    ) -> None:
        self.group = group
        self.slot = slot
        self.loop = loop
        self.answered = answered
        self.writer: asyncio.Task[None] | None = None

    def set(self) -> None:
        # A closed loop: the server stopped and nobody waits for the answer.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        slot = self.slot
        if slot.ack is None and slot.error is None:
            if slot.lead and self.writer is None:
                self.writer = self.loop.create_task(self._write())
            return
        if not self.answered.done():
            self.answered.set_result(None)

    async def _write(self) -> None:
        try:
            await to_thread.run_sync(self.group._write_next, self.slot.lane)
        except BaseException as exc:  # every slot of the group has its error already
            if self.slot.error is None and self.slot.ack is None:
                self.slot.error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
            if not self.answered.done():
                self.answered.set_result(None)
            if not isinstance(exc, Exception):
                raise
