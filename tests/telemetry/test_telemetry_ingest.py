"""Exactly-once ingest into SQLite and PostgreSQL under duplicated and reordered batches."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from edgewise.control import _schema as cs
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._decode import TelemetryColumns
from edgewise.control.telemetry._ingest import TelemetryIngest
from edgewise.protocol import TelemetryBatch, TelemetryRecord

from .conftest import add_device


def _rec(seq: int, kind: str = "e", cls: str = "event", **data: Any) -> TelemetryRecord:
    return TelemetryRecord(seq=seq, cls=cls, ts=float(seq), kind=kind, data=data)  # type: ignore[arg-type]


def _batch(seqs: list[int]) -> TelemetryBatch:
    return TelemetryBatch(records=[_rec(s) for s in seqs])


def _stored(store: Any, device: str) -> list[int]:
    tel = cs.telemetry
    with store.engine.connect() as c:
        return list(
            c.execute(
                select(tel.c.seq).where(tel.c.device_id == device).order_by(tel.c.seq)
            ).scalars()
        )


def test_duplicates_and_reordering_store_each_seq_once(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    a1 = ingest.ingest("dev-1", _batch([1, 2, 3]))
    a2 = ingest.ingest("dev-1", _batch([6, 7]))  # arrives before 4-5
    a3 = ingest.ingest("dev-1", _batch([1, 2, 3]))  # a retry of the first
    a4 = ingest.ingest("dev-1", _batch([4, 5, 6]))
    assert (a1.accepted, a1.duplicates, a1.acked_seq) == (3, 0, 3)
    assert (a2.accepted, a2.acked_seq) == (2, 3)  # a gap: ack stays
    assert (a3.accepted, a3.duplicates, a3.acked_seq) == (0, 3, 3)
    assert (a4.accepted, a4.duplicates, a4.acked_seq) == (2, 1, 7)
    assert _stored(store, "dev-1") == [1, 2, 3, 4, 5, 6, 7]


def test_random_shuffled_and_repeated_batches_converge_exactly_once(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    rng = random.Random(4)
    batches = [list(range(i, i + 10)) for i in range(1, 200, 10)]
    sends = batches * 3
    rng.shuffle(sends)
    total = 0
    for seqs in sends:
        total += ingest.ingest("dev-2", _batch(seqs)).accepted
    assert total == 200
    assert _stored(store, "dev-2") == list(range(1, 201))
    with store.engine.connect() as c:
        acked = c.execute(
            select(cs.devices.c.telemetry_acked).where(cs.devices.c.id == "dev-2")
        ).scalar()
    assert acked == 200


def test_many_devices_in_one_call_and_windows_decoded(store: Any) -> None:
    ingest = TelemetryIngest(store.engine, clock=lambda: 1000.0)
    window = _rec(
        1,
        "window",
        "metric",
        pipeline="p",
        model="m",
        version="1",
        start=0.0,
        end=10.0,
        counts={"ok": 5},
    )
    b1 = TelemetryBatch(records=[window, _rec(2)], dropped={"sample": 3})
    result = ingest.ingest_many([("dev-1", b1), ("dev-2", _batch([1])), ("dev-1", b1)])
    assert [a.accepted for a in result.acks] == [2, 1, 0]
    assert [a.acked_seq for a in result.acks] == [2, 1, 2]
    assert result.windows == 1
    with store.engine.connect() as c:
        rows = c.execute(select(tt.telemetry_windows)).mappings().all()
        dev = (
            c.execute(
                select(tt.telemetry_devices).where(tt.telemetry_devices.c.device_id == "dev-1")
            )
            .mappings()
            .one()
        )
    assert len(rows) == 1 and rows[0]["pipeline"] == "p" and rows[0]["data"]["counts"] == {"ok": 5}
    assert rows[0]["seq"] == 1 and rows[0]["end"] == 10.0
    assert dev["last_received"] == 1000.0 and dev["last_window_end"] == 10.0
    assert dev["dropped"]["sample"] == 3


def test_records_below_the_ack_are_duplicates_even_after_log_cleanup(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    ingest.ingest("dev-1", _batch([1, 2, 3]))
    with store.engine.begin() as c:  # retention removed the old log rows
        c.execute(cs.telemetry.delete())
    ack = ingest.ingest("dev-1", _batch([2, 3, 4]))
    assert (ack.accepted, ack.duplicates, ack.acked_seq) == (1, 2, 4)
    with store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(cs.telemetry)).scalar() == 1


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_concurrent_replica_conflict_falls_back_to_on_conflict_path(store: Any) -> None:
    # Another replica stored seq 2 between our pre-check and our COPY: the COPY fails on
    # the key, and the fallback stores only what is missing.
    ingest = TelemetryIngest(store.engine)
    ingest.ingest("dev-1", _batch([2]))
    cols = {"dev-1": TelemetryColumns.of(_batch([1, 2, 3]))}
    with store.engine.begin() as conn:
        stored = ingest._insert_log(conn, cols, 5.0)
    assert stored["dev-1"].seq == [1, 3]
    assert _stored(store, "dev-1") == [1, 2, 3]


def test_migration_0005_swaps_the_log_index_and_keeps_the_rows(store: Any) -> None:
    from alembic import command
    from sqlalchemy import inspect, text

    from edgewise.control._migrate import alembic_config, migrate

    def indexes() -> dict[str, list[str | None]]:
        return {
            i["name"]: i["column_names"] for i in inspect(store.engine).get_indexes("telemetry")
        }

    TelemetryIngest(store.engine).ingest("dev-1", _batch([1, 2, 3]))
    assert indexes() == {"ix_telemetry_received_at": ["received_at"]}
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as c:
            ddl = c.execute(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_telemetry_received_at'")
            ).scalar_one()
        assert "USING brin" in ddl
    cfg = alembic_config()
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
        conn.commit()
    assert indexes() == {"ix_telemetry_device_ts": ["device_id", "ts"]}
    migrate(store.engine)
    assert indexes() == {"ix_telemetry_received_at": ["received_at"]}
    assert _stored(store, "dev-1") == [1, 2, 3]


def test_telemetry_batches_and_last_seen_flushes_of_the_same_devices_never_deadlock(
    store: Any, in_threads: Callable[..., list[BaseException]]
) -> None:
    # A group of uploads (devices in arrival order) and a last-seen flush (id order) both
    # update device rows; locked in different orders they deadlock on PostgreSQL.
    ids = [f"dev-{i:03d}" for i in range(3, 63)]
    for device_id in ids:
        add_device(store, device_id)
    ingest = TelemetryIngest(store.engine)

    def uploads(round_: int) -> None:
        order = ids[::-1] if round_ % 2 == 0 else ids
        ingest.ingest_many([(d, _batch([round_ + 1])) for d in order])

    def seen(round_: int) -> None:
        store.touch_last_seen({d: 100.0 + round_ for d in ids})

    assert in_threads(uploads, seen) == []
    assert _stored(store, ids[0]) == list(range(1, 16))
