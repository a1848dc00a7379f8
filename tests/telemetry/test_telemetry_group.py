"""Group commit: concurrent uploads share a transaction, each keeps its own exact answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import select

from edgewise.control import _schema as cs
from edgewise.control.telemetry import GroupCommit, IngestResult, TelemetryColumns, TelemetryIngest
from edgewise.control.telemetry._ingest import Upload
from edgewise.protocol import TelemetryAck, TelemetryBatch, TelemetryRecord

from .conftest import add_device


def _batch(seqs: Sequence[int]) -> TelemetryBatch:
    return TelemetryBatch(
        records=[TelemetryRecord(seq=s, cls="event", ts=float(s), kind="e") for s in seqs]
    )


class HeldIngest(TelemetryIngest):
    """The real ingest, whose first write waits until the test lets it go."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def ingest_many(
        self, items: Sequence[tuple[str, Upload]], now: float | None = None
    ) -> IngestResult:
        self.calls.append(len(items))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return super().ingest_many(items, now)


def _run_while_first_write_is_held(
    group: GroupCommit, ingest: HeldIngest, uploads: list[tuple[str, Upload]]
) -> list[TelemetryAck | BaseException]:
    out: list[TelemetryAck | BaseException] = [TimeoutError()] * len(uploads)

    def send(i: int) -> None:
        try:
            out[i] = group.submit(*uploads[i])
        except Exception as exc:
            out[i] = exc

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert ingest.entered.wait(30)
    rest = [threading.Thread(target=send, args=(i,)) for i in range(1, len(uploads))]
    for t in rest:
        t.start()
    while group.waiting() < len(rest):  # every other upload is queued behind the held write
        pass
    ingest.release.set()
    for t in [first, *rest]:
        t.join(30)
    return out


def test_uploads_arriving_during_a_write_share_the_next_transaction(store: Any) -> None:
    ingest = HeldIngest(store.engine)
    group = GroupCommit(ingest, lanes=1)
    uploads = [
        ("dev-1", _batch([1, 2])),
        ("dev-1", _batch([3, 4])),
        ("dev-2", _batch([1])),
        ("dev-1", _batch([3, 4])),  # a retry inside the same group
        ("dev-2", _batch([3])),  # a gap: stored, not acked
    ]
    acks = _run_while_first_write_is_held(group, ingest, uploads)
    assert ingest.calls == [1, 4] and group.groups == 2
    assert [(a.accepted, a.duplicates, a.acked_seq) for a in acks] == [  # type: ignore[union-attr]
        (2, 0, 2),
        (2, 0, 4),
        (1, 0, 1),
        (0, 2, 4),
        (1, 0, 1),
    ]
    with store.engine.connect() as c:
        rows = c.execute(select(cs.telemetry.c.device_id, cs.telemetry.c.seq)).all()
    assert sorted(rows) == [("dev-1", s) for s in (1, 2, 3, 4)] + [("dev-2", s) for s in (1, 3)]


def test_a_bad_upload_in_a_group_fails_only_its_own_request(store: Any) -> None:
    ingest = HeldIngest(store.engine)
    group = GroupCommit(ingest, lanes=1)
    # Validation refuses such a seq; built past it, it makes the database refuse the row.
    too_big = TelemetryColumns([2**70], ["event"], [0.0], ["e"], ["{}"])
    uploads = [("dev-1", _batch([1])), ("dev-2", too_big), ("dev-1", _batch([2]))]
    out = _run_while_first_write_is_held(group, ingest, uploads)
    assert isinstance(out[1], Exception)
    assert [(a.accepted, a.acked_seq) for a in (out[0], out[2])] == [(1, 1), (1, 2)]  # type: ignore[union-attr]


def test_an_idle_writer_writes_at_once_and_errors_reach_the_caller(store: Any) -> None:
    group = GroupCommit(TelemetryIngest(store.engine))
    ack = group.submit("dev-1", _batch([1, 2, 3]))
    assert (ack.accepted, ack.acked_seq) == (3, 3) and group.groups == 1
    with pytest.raises(Exception):  # noqa: B017 - the driver's own overflow error
        group.submit("dev-1", TelemetryColumns([2**70], ["event"], [0.0], ["e"], ["{}"]))
    assert group.submit("dev-1", _batch([4])).acked_seq == 4  # the writer is not stuck


def test_uploads_awaited_on_the_event_loop_hold_no_thread_and_share_the_next_write(
    store: Any,
) -> None:
    ingest = HeldIngest(store.engine)
    group = GroupCommit(ingest, lanes=1)
    too_big = TelemetryColumns([2**70], ["event"], [0.0], ["e"], ["{}"])
    waiting = [(f"dev-{i}", _batch([1, 2])) for i in range(40)]

    async def main() -> tuple[list[Any], TelemetryAck, int]:
        first = asyncio.create_task(group.asubmit("dev-a", _batch([1])))
        assert await asyncio.to_thread(ingest.entered.wait, 30)  # the first write is held
        threads = threading.active_count()
        rest = [asyncio.create_task(group.asubmit(*u)) for u in waiting]
        bad = asyncio.create_task(group.asubmit("dev-b", too_big))
        while group.waiting() < len(waiting) + 1:
            await asyncio.sleep(0.001)
        # A thread's upload joins the same queue (the two kinds of callers mix).
        by_thread = asyncio.create_task(asyncio.to_thread(group.submit, "dev-t", _batch([7])))
        while group.waiting() < len(waiting) + 2:
            await asyncio.sleep(0.001)
        grown = threading.active_count() - threads  # the thread caller's own, at most
        ingest.release.set()
        answers = await asyncio.gather(first, *rest, bad, return_exceptions=True)
        return answers, await by_thread, grown

    answers, threaded, grown = asyncio.run(main())
    assert grown <= 1  # 41 uploads waited on the loop without a thread each
    assert ingest.calls[:2] == [1, len(waiting) + 2]  # then one group, and the retry
    assert isinstance(answers[-1], Exception)  # the bad upload fails alone
    acks = [a for a in answers[:-1] if isinstance(a, TelemetryAck)]
    assert [(a.accepted, a.acked_seq) for a in acks] == [(1, 1)] + [(2, 2)] * len(waiting)
    assert (threaded.accepted, threaded.acked_seq) == (1, 0)  # stored; seq 7 has a gap
    with store.engine.connect() as c:
        stored = c.execute(select(cs.telemetry.c.device_id)).all()
    assert len(stored) == 1 + 2 * len(waiting) + 1


def test_two_lanes_write_at_once_and_each_device_keeps_to_its_own(store: Any) -> None:
    ingest = HeldIngest(store.engine)
    group = GroupCommit(ingest, lanes=2)
    names = [f"dev-{i}" for i in range(40)]
    assert {group.lane_of(n) for n in names} == {0, 1}  # both lanes get devices
    again = GroupCommit(ingest, lanes=2)  # a device's lane is a function of its id alone
    assert [again.lane_of(n) for n in names] == [group.lane_of(n) for n in names]
    a = next(n for n in names if group.lane_of(n) == 0)
    b = next(n for n in names if group.lane_of(n) == 1)
    for name in (a, b):
        if name not in ("dev-1", "dev-2"):
            add_device(store, name)
    out: dict[str, TelemetryAck] = {}
    held = threading.Thread(target=lambda: out.update(first=group.submit(a, _batch([1, 2]))))
    held.start()
    assert ingest.entered.wait(30)  # lane 0 is writing, and held there
    assert group.submit(b, _batch([1])).acked_seq == 1  # lane 1 writes meanwhile
    behind = threading.Thread(target=lambda: out.update(second=group.submit(a, _batch([3]))))
    behind.start()
    while group.waiting() < 1:  # the same device waits for its lane, never overtakes
        pass
    assert "second" not in out
    ingest.release.set()
    held.join(30)
    behind.join(30)
    assert (out["first"].acked_seq, out["second"].acked_seq) == (2, 3)
    assert group.groups == 3


def test_lanes_default_to_two_on_postgresql_and_one_on_sqlite(store: Any) -> None:
    group = GroupCommit(TelemetryIngest(store.engine))
    assert len(group._lanes) == (2 if store.engine.dialect.name == "postgresql" else 1)
    with pytest.raises(ValueError, match="lanes"):
        GroupCommit(TelemetryIngest(store.engine), lanes=0)
