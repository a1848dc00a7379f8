"""Exactly-once telemetry ingest, written in batches (COPY on PostgreSQL, executemany on SQLite).

One call stores any number of batches from any number of devices in one transaction:

1. read each device's `telemetry_acked` (every seq up to it is stored): records at or
   below it are duplicates without touching the log;
2. insert the rest into the `telemetry` log, skipping (device, seq) pairs already there
   (PostgreSQL: COPY into a temporary table, then `INSERT ... ON CONFLICT DO NOTHING
   RETURNING`, so concurrent replicas never double-store; SQLite: one writer at a time,
   existing seqs read by range, then one executemany);
3. decode the newly stored `window` records into `telemetry_windows`;
4. advance `telemetry_acked` over the contiguous prefix and note per-device facts.

Usage::

    ingest = TelemetryIngest(store.engine)
    ack = ingest.ingest("dev-1", batch)             # HTTP: one batch
    acks = ingest.ingest_many([(id, batch), ...])   # MQTT: whatever arrived meanwhile
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Connection, Engine, bindparam, select, text, update

from edgewise.control import _schema as cs
from edgewise.protocol import TelemetryAck, TelemetryBatch

__all__ = ["IngestResult", "TelemetryIngest"]

_COLUMNS = ("device_id", "seq", "cls", "ts", "kind", "data", "received_at")
_WINDOW_COLUMNS = (
    "device_id",
    "seq",
    "pipeline",
    "model",
    "version",
    "deployment",
    "start",
    "end",
    "downsampled",
    "data",
)


def _dumps(data: Any) -> str:
    # pydantic-core's serialiser: about six times json.dumps, and ingest is mostly this.
    return to_json(data, fallback=str).decode()


def _num(value: Any, default: float = 0.0) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    )


@dataclass(frozen=True)
class IngestResult:
    """What one ingest call stored."""

    acks: list[TelemetryAck]
    inserted: int
    windows: int


@dataclass
class _Rec:
    seq: int
    cls: str
    ts: float
    kind: str
    data: dict[str, Any]
    item: int  # index of the batch it came in (for per-batch accepted counts)


class TelemetryIngest:
    """Stores telemetry batches exactly once per (device, seq); thread-safe."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        """Write through `engine` (the control plane's store engine)."""
        self.engine = engine
        self.clock = clock
        self.postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer; serialising here avoids SQLITE_BUSY on lock upgrades.
        self._sqlite_lock = threading.Lock()

    def ingest(
        self, device_id: str, batch: TelemetryBatch, now: float | None = None
    ) -> TelemetryAck:
        """Store one batch; returns its acknowledgement."""
        return self.ingest_many([(device_id, batch)], now).acks[0]

    def ingest_many(
        self, items: Sequence[tuple[str, TelemetryBatch]], now: float | None = None
    ) -> IngestResult:
        """Store several batches (any devices, duplicates and reordering allowed) at once."""
        now = self.clock() if now is None else now
        if not items:
            return IngestResult([], 0, 0)
        if self.postgres:
            return self._run(items, now)
        with self._sqlite_lock:
            return self._run(items, now)

    # -- the transaction ------------------------------------------------------------

    def _run(self, items: Sequence[tuple[str, TelemetryBatch]], now: float) -> IngestResult:
        per_device: dict[str, dict[int, _Rec]] = {}
        dropped: dict[str, dict[str, int]] = {}
        for i, (device_id, batch) in enumerate(items):
            recs = per_device.setdefault(device_id, {})
            for r in batch.records:
                if r.seq not in recs:
                    recs[r.seq] = _Rec(r.seq, r.cls, r.ts, r.kind, r.data, i)
            have = dropped.setdefault(device_id, {})
            for k, v in batch.dropped.items():
                have[k] = max(have.get(k, 0), int(v))
        with self.engine.begin() as conn:
            acked = self._acked(conn, list(per_device))
            fresh = {
                d: [r for s, r in sorted(recs.items()) if s > acked.get(d, 0)]
                for d, recs in per_device.items()
            }
            inserted = self._insert_log(conn, fresh, now)
            windows = self._insert_windows(conn, inserted)
            new_acked = {
                d: self._advance(conn, d, acked.get(d, 0), [r.seq for r in fresh[d]])
                for d in per_device
            }
            self._note_devices(conn, new_acked, acked, inserted, dropped, now)
        accepted = [0] * len(items)
        for stored in inserted.values():
            for rec in stored:
                accepted[rec.item] += 1
        acks = [
            TelemetryAck(
                accepted=accepted[i],
                duplicates=len(batch.records) - accepted[i],
                acked_seq=new_acked[device_id],
            )
            for i, (device_id, batch) in enumerate(items)
        ]
        return IngestResult(acks, sum(accepted), windows)

    def _acked(self, conn: Connection, device_ids: list[str]) -> dict[str, int]:
        dev = cs.devices
        rows = conn.execute(select(dev.c.id, dev.c.telemetry_acked).where(dev.c.id.in_(device_ids)))
        return {str(row[0]): int(row[1] or 0) for row in rows}

    def _insert_log(
        self, conn: Connection, fresh: Mapping[str, list[_Rec]], now: float
    ) -> dict[str, list[_Rec]]:
        if not any(fresh.values()):
            return {}
        if self.postgres:
            return self._insert_log_postgres(conn, fresh, now)
        return self._insert_log_sqlite(conn, fresh, now)

    def _insert_log_sqlite(
        self, conn: Connection, fresh: Mapping[str, list[_Rec]], now: float
    ) -> dict[str, list[_Rec]]:
        tel = cs.telemetry
        out: dict[str, list[_Rec]] = {}
        rows = []
        for device_id, recs in fresh.items():
            if not recs:
                continue
            present: set[int] = set(
                conn.execute(
                    select(tel.c.seq).where(
                        tel.c.device_id == device_id,
                        tel.c.seq >= recs[0].seq,
                        tel.c.seq <= recs[-1].seq,
                    )
                ).scalars()
            )
            new = [r for r in recs if r.seq not in present]
            out[device_id] = new
            rows += [(device_id, r.seq, r.cls, r.ts, r.kind, _dumps(r.data), now) for r in new]
        if rows:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            cur.executemany(
                f"INSERT INTO telemetry ({', '.join(_COLUMNS)}) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT DO NOTHING",
                rows,
            )
            cur.close()
        return out

    def _insert_log_postgres(
        self, conn: Connection, fresh: Mapping[str, list[_Rec]], now: float
    ) -> dict[str, list[_Rec]]:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _telemetry_in "
                "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY _telemetry_in ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
                for device_id, recs in fresh.items():
                    for r in recs:
                        copy.write_row((device_id, r.seq, r.cls, r.ts, r.kind, _dumps(r.data), now))
            cur.execute(
                f"INSERT INTO telemetry ({', '.join(_COLUMNS)}) "
                f"SELECT {', '.join(_COLUMNS)} FROM _telemetry_in "
                "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq"
            )
            stored = {(str(d), int(s)) for d, s in cur.fetchall()}
        return {d: [r for r in recs if (d, r.seq) in stored] for d, recs in fresh.items() if recs}

    def _insert_windows(self, conn: Connection, inserted: Mapping[str, list[_Rec]]) -> int:
        rows = []
        for device_id, recs in inserted.items():
            for r in recs:
                if r.cls != "metric" or r.kind != "window":
                    continue
                d = r.data
                rows.append(
                    (
                        device_id,
                        r.seq,
                        str(d.get("pipeline", ""))[:200],
                        str(d.get("model", ""))[:200],
                        str(d.get("version", ""))[:64],
                        str(d.get("deployment", ""))[:200],
                        _num(d.get("start"), r.ts),
                        _num(d.get("end"), r.ts),
                        False,
                        _dumps(d),
                    )
                )
        if not rows:
            return 0
        cols = ", ".join(f'"{c}"' for c in _WINDOW_COLUMNS)
        raw = conn.connection.driver_connection
        assert raw is not None
        if self.postgres:
            sql = f"COPY telemetry_windows ({cols}) FROM STDIN"
            with raw.cursor() as pg, pg.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur = raw.cursor()
            cur.executemany(
                f"INSERT INTO telemetry_windows ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
            )
            cur.close()
        return len(rows)

    def _advance(self, conn: Connection, device_id: str, acked: int, seqs: Iterable[int]) -> int:
        """The highest seq stored contiguously from 1 (every seq in `seqs` is stored now)."""
        cur = acked
        for s in seqs:  # ascending
            if s != cur + 1:
                return cur  # a gap inside this batch: nothing beyond it can be contiguous
            cur = s
        tel = cs.telemetry
        while True:  # records that arrived earlier, out of order, may extend the prefix
            later: list[int] = list(
                conn.execute(
                    select(tel.c.seq)
                    .where(tel.c.device_id == device_id, tel.c.seq > cur)
                    .order_by(tel.c.seq)
                    .limit(1000)
                ).scalars()
            )
            start = cur
            for s in later:
                if s != cur + 1:
                    break
                cur = int(s)
            if cur == start or len(later) < 1000:
                return cur

    def _note_devices(
        self,
        conn: Connection,
        new_acked: Mapping[str, int],
        old_acked: Mapping[str, int],
        inserted: Mapping[str, list[_Rec]],
        dropped: Mapping[str, Mapping[str, int]],
        now: float,
    ) -> None:
        dev = cs.devices
        moved = [{"d": d, "a": a} for d, a in new_acked.items() if a > old_acked.get(d, 0)]
        if moved:
            conn.execute(
                update(dev)
                .where(dev.c.id == bindparam("d"), dev.c.telemetry_acked < bindparam("a"))
                .values(telemetry_acked=bindparam("a")),
                moved,
            )
        rows = []
        for device_id in new_acked:
            ends = [
                _num(r.data.get("end"), r.ts)
                for r in inserted.get(device_id, [])
                if r.kind == "window"
            ]
            rows.append(
                {
                    "device_id": device_id,
                    "last_received": now,
                    "last_window_end": max(ends) if ends else None,
                    "dropped": _dumps(dict(dropped.get(device_id, {}))),
                }
            )
        # One statement for both dialects: both speak INSERT ... ON CONFLICT DO UPDATE.
        conn.execute(
            text(
                "INSERT INTO telemetry_devices (device_id, last_received, last_window_end, "
                "dropped) VALUES (:device_id, :last_received, :last_window_end, :dropped) "
                "ON CONFLICT (device_id) DO UPDATE SET last_received = excluded.last_received, "
                "last_window_end = CASE WHEN excluded.last_window_end IS NULL "
                "THEN telemetry_devices.last_window_end "
                "WHEN telemetry_devices.last_window_end IS NULL "
                "OR excluded.last_window_end > telemetry_devices.last_window_end "
                "THEN excluded.last_window_end ELSE telemetry_devices.last_window_end END, "
                "dropped = excluded.dropped"
            ),
            rows,
        )
