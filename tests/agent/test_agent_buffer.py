"""The durable telemetry buffer against its real SQLite files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.agent._buffer import TelemetryBuffer
from edgewise.protocol import TelemetryBatch, decode_batch, encode_batch


def test_seq_is_strictly_increasing_across_reopen(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db")
    first = buf.append([("metric", "m", {"v": i}, float(i)) for i in range(3)])
    buf.ack([r.seq for r in first])
    buf.close()
    buf = TelemetryBuffer(tmp_path / "t.db")
    again = buf.append([("event", "e", {}, 9.0)])
    assert [r.seq for r in first] == [1, 2, 3]
    assert again[0].seq == 4


def test_records_survive_reopen_until_acked(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db")
    buf.append([("event", "e", {"i": i}, 0.0) for i in range(100)])
    buf.close()
    buf = TelemetryBuffer(tmp_path / "t.db")
    batch = buf.peek(max_records=60)
    assert [r.seq for r in batch.records] == list(range(1, 61))
    buf.ack([r.seq for r in batch.records])
    assert buf.depth() == 40
    assert buf.peek().records[0].seq == 61


def test_budget_evicts_samples_then_metrics_and_keeps_events(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", budget_bytes=20_000)
    pad = {"pad": "x" * 50}
    buf.append([("event", "e", pad, 0.0) for _ in range(100)])
    buf.append([("sample", "s", pad, 0.0) for _ in range(100)])
    buf.append([("metric", "m", pad, 0.0) for _ in range(200)])
    kinds = [r.cls for r in buf.peek(max_records=10_000, max_bytes=10**9).records]
    assert kinds.count("event") == 100
    assert kinds.count("sample") == 0
    assert 0 < kinds.count("metric") < 200
    dropped = buf.dropped()
    assert dropped["sample"] == 100
    assert dropped["metric"] == 200 - kinds.count("metric")
    assert dropped["event"] == 0
    assert buf.stored_bytes() <= 20_000
    assert buf.peek().dropped == dropped


def test_drop_counters_are_durable(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", budget_bytes=1000)
    buf.append([("sample", "s", {"pad": "x" * 100}, 0.0) for _ in range(50)])
    before = buf.dropped()
    buf.close()
    assert TelemetryBuffer(tmp_path / "t.db", budget_bytes=1000).dropped() == before
    assert before["sample"] > 0


def test_unknown_class_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db")
    with pytest.raises(ValueError):
        buf.append([("event", "ok", {}, 0.0), ("bogus", "x", {}, 0.0)])
    assert buf.depth() == 0
    assert buf.last_seq() == 0


def test_batches_round_trip_through_gzip(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db")
    buf.append([("metric", "cpu", {"pct": 3.5}, 1.0), ("event", "boot", {}, 2.0)])
    batch = buf.peek()
    body = encode_batch(batch)
    assert body[:2] == b"\x1f\x8b"
    assert decode_batch(body) == batch
    assert encode_batch(batch) == body  # deterministic: a retry signs the same bytes


@pytest.mark.parametrize(
    "body",
    [b"not gzip", b"\x1f\x8b\x08\x00garbage"],
)
def test_decode_refuses_bad_bodies(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_batch(body)


def test_batch_refuses_out_of_order_seq_and_unknown_classes() -> None:
    rec = {"cls": "event", "ts": 0.0, "kind": "k", "data": {}}
    with pytest.raises(ValueError):
        TelemetryBatch.model_validate({"records": [{**rec, "seq": 2}, {**rec, "seq": 1}]})
    with pytest.raises(ValueError):
        TelemetryBatch.model_validate({"records": [], "dropped": {"bogus": 1}})
    with pytest.raises(ValueError):
        TelemetryBatch.model_validate({"records": [{**rec, "seq": 0}]})
