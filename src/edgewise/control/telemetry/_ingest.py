"""Exactly-once telemetry ingest, written in batches (PostgreSQL COPY, SQLite multi-row).

Batches arrive as `TelemetryColumns` (`decode_upload` makes them from an upload body
without a pydantic object per record) or as protocol `TelemetryBatch`es, which are
turned into columns first. One call stores any number of batches from any number of
devices in one transaction:

1. read each device's `telemetry_acked` (every seq up to it is stored): records at or
   below it are duplicates without touching the log;
2. insert the rest into the `telemetry` log, skipping (device, seq) pairs already there
   (PostgreSQL: COPY into a temporary table, then `INSERT ... ON CONFLICT DO NOTHING
   RETURNING`, so concurrent replicas never double-store; SQLite: one writer at a time,
   existing seqs read by range, then multi-row INSERTs);
3. decode the newly stored `window` records into `telemetry_windows`;
4. advance `telemetry_acked` over the contiguous prefix and note per-device facts.

Usage::

    ingest = TelemetryIngest(store.engine)
    ack = ingest.ingest("dev-1", decode_upload(body))      # one batch
    acks = ingest.ingest_many([(id, columns), ...])        # MQTT / group commit: many
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Connection, Engine, bindparam, select, text, update
from sqlalchemy.exc import IntegrityError

from edgewise.control import _schema as cs
from edgewise.control.telemetry._decode import TelemetryColumns
from edgewise.control.telemetry._figures import finite, window_name
from edgewise.protocol import MAX_SKEW_S, TelemetryAck, TelemetryBatch

__all__ = ["IngestResult", "TelemetryIngest"]

_COLUMNS = ("device_id", "seq", "cls", "ts", "kind", "data", "received_at")
# Rows per multi-row INSERT on SQLite: 7 columns x 4,000 stays under SQLite's default
# limit of 32,766 bound parameters (999 before SQLite 3.32).
_SQLITE_ROWS = 4000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 140
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


# A window's data as `telemetry_windows` keeps it, which every fleet view, alert round
# and scrape reads back: a digits window is about 4 kB, one of a model with thousands
# of input features a few hundred. Past this, its largest parts are left out there (the
# log keeps the record whole): one compressed upload of 40 kB had held a window of ten
# million latency buckets, and every view of the fleet took seconds longer per copy.
MAX_WINDOW_CHARS = 1024 * 1024


def _dumps(data: Any) -> str:
    # pydantic-core's serialiser: about six times json.dumps, and ingest is mostly this.
    # NaN and infinities as null: PostgreSQL's json type refuses the bare literals.
    return to_json(data, fallback=str, inf_nan_mode="null").decode()


_SQLITE_STORED_IN = "SELECT seq FROM telemetry WHERE device_id = ? AND seq BETWEEN ? AND ?"


def _num(value: Any, default: float) -> float:
    out = finite(value)  # 10**400 had raised here and failed the whole transaction
    return default if out is None else out


def _window_times(data: Mapping[str, Any], ts: float, latest: float) -> tuple[float, float]:
    """A window's (start, end) columns: finite, the end no later than `latest`.

    The columns are what the views select by and retention expires by. A device clock
    may run ahead by the signature's skew bound; a window said to end later than that
    (past `latest`) ends then instead (an end of 1e18 had kept a window in every fleet
    view and burn-rate alert, as the newest, for ever, and out of retention's reach).
    """
    end = min(_num(data.get("end"), ts), latest)
    return min(_num(data.get("start"), end), end), end


def _bounded(data: Mapping[str, Any], text: str) -> str:
    """A window's data text for `telemetry_windows`: at most `MAX_WINDOW_CHARS`.

    Largest parts are left out first, and any part with no JSON form (nested past the
    serialiser's depth); `trimmed` names them (cut short, at most 20).
    """
    if len(text) <= MAX_WINDOW_CHARS:
        return text
    parts: dict[str, str | None] = {}
    for k, v in data.items():
        try:
            parts[k] = _dumps(v)
        except ValueError:  # pydantic_core.PydanticSerializationError: too deep
            parts[k] = None
    kept = {k: p for k, p in parts.items() if p is not None}
    total = sum(len(k) + 4 + len(p) for k, p in kept.items())  # "k": p,
    for k in sorted(kept, key=lambda k: len(kept[k]), reverse=True):
        if total <= MAX_WINDOW_CHARS - 4096:  # room for `trimmed`
            break
        total -= len(k) + 4 + len(kept.pop(k))
    left_out = [k[:100] for k in data if k not in kept][:20]
    if left_out:
        kept["trimmed"] = _dumps(left_out)
    return "{" + ",".join(f"{_dumps(k)}:{p}" for k, p in kept.items()) + "}"


def _storable(c: TelemetryColumns) -> TelemetryColumns:
    """`c` with NUL characters out of its kinds (PostgreSQL text refuses them)."""
    if "\x00" not in "".join(c.kind):
        return c
    return replace(c, kind=[k.replace("\x00", "\ufffd") for k in c.kind])


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return value.translate(_COPY_ESCAPES)
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return repr(value)


def _text(value: str) -> str:
    # Most values need no escaping; `in` checks are far cheaper than translate().
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def _log_lines(device_id: str, c: TelemetryColumns, now_text: str) -> list[str]:
    head = device_id + "\t"
    tail = "\t" + now_text + "\n"
    return [
        f"{head}{s}\t{k}\t{t!r}\t{kd}\t{j}{tail}"
        for s, k, t, kd, j in zip(c.seq, c.cls, c.ts, c.kind, c.data, strict=True)
    ]


def _log_copy_text(todo: Mapping[str, TelemetryColumns], now: float) -> str:
    """Telemetry log rows in COPY text format, specialised on their column types.

    Built without escaping first, then checked as a whole: the common buffer (no
    backslash, CR, tab or newline inside a field) is used as is, which saves per-field
    work; anything else is rebuilt field by field. Non-finite floats print as `nan` /
    `inf`, which PostgreSQL's float input accepts.
    """
    now_text = repr(float(now))
    lines: list[str] = []
    for device_id, c in todo.items():
        lines += _log_lines(device_id, c, now_text)
    out = "".join(lines)
    n = len(lines)
    if "\\" not in out and "\r" not in out and out.count("\t") == 6 * n and out.count("\n") == n:
        return out
    return "".join(
        f"{_text(device_id)}\t{s}\t{k}\t{t!r}\t{_text(kd)}\t{_text(j)}\t{now_text}\n"
        for device_id, c in todo.items()
        for s, k, t, kd, j in zip(c.seq, c.cls, c.ts, c.kind, c.data, strict=True)
    )


def _copy_text(rows: list[tuple[Any, ...]]) -> str:
    """Rows in COPY text format as one string: far cheaper than `write_row` per row."""
    return "".join("\t".join(map(_copy_field, row)) + "\n" for row in rows)


def _unique_violation() -> type[Exception]:
    import psycopg.errors

    return psycopg.errors.UniqueViolation


def _merged(
    sources: list[TelemetryColumns], order: list[int], where: Mapping[int, tuple[int, int]]
) -> TelemetryColumns:
    """One device's records from several batches, by seq, the first copy of each winning."""
    out = TelemetryColumns(dropped={})
    for src, s in zip(sources, order, strict=True):
        pos = where[s][1]
        out.seq.append(s)
        out.cls.append(src.cls[pos])
        out.ts.append(src.ts[pos])
        out.kind.append(src.kind[pos])
        out.data.append(src.data[pos])
        if s in src.windows:
            out.windows[s] = src.windows[s]
    return out


@dataclass(frozen=True)
class IngestResult:
    """What one ingest call stored."""

    acks: list[TelemetryAck]
    inserted: int
    windows: int


Upload = TelemetryBatch | TelemetryColumns


def _columns(batch: Upload) -> TelemetryColumns:
    return batch if isinstance(batch, TelemetryColumns) else TelemetryColumns.of(batch)


class TelemetryIngest:
    """Stores telemetry batches exactly once per (device, seq); thread-safe."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = MAX_SKEW_S,
    ) -> None:
        """Write through `engine` (the control plane's store engine).

        `max_skew_s`: how far ahead of `clock` a device's clock may run (the signature
        bound): no stored window ends later than that past its arrival.
        """
        self.engine = engine
        self.clock = clock
        self.max_skew_s = max_skew_s
        self.postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer; serialising here avoids SQLITE_BUSY on lock upgrades.
        self._sqlite_lock = threading.Lock()

    def ingest(self, device_id: str, batch: Upload, now: float | None = None) -> TelemetryAck:
        """Store one batch (a protocol batch or decoded columns); returns its acknowledgement."""
        return self.ingest_many([(device_id, batch)], now).acks[0]

    def ingest_many(
        self, items: Sequence[tuple[str, Upload]], now: float | None = None
    ) -> IngestResult:
        """Store several batches (any devices, duplicates and reordering allowed) at once."""
        now = self.clock() if now is None else now
        if not items:
            return IngestResult([], 0, 0)
        cols = [(device_id, _storable(_columns(batch))) for device_id, batch in items]
        if self.postgres:
            return self._run(cols, now)
        with self._sqlite_lock:
            return self._run(cols, now)

    # -- the transaction ------------------------------------------------------------

    def _run(self, items: Sequence[tuple[str, TelemetryColumns]], now: float) -> IngestResult:
        # Work per device on the decoded columns themselves (strictly increasing within
        # a batch): no per-record copies unless a device sent several batches in this call.
        slots: dict[str, list[int]] = {}
        dropped: dict[str, dict[str, int]] = {}
        for i, (device_id, batch) in enumerate(items):
            slots.setdefault(device_id, []).append(i)
            have = dropped.setdefault(device_id, {})
            for k, v in batch.dropped.items():
                have[k] = max(have.get(k, 0), int(v))
        per_device: dict[str, TelemetryColumns] = {}
        owner: dict[str, dict[int, int]] = {}  # seq -> item, for devices with several batches
        for device_id, idxs in slots.items():
            if len(idxs) == 1:
                per_device[device_id] = items[idxs[0]][1]
                continue
            first: dict[int, tuple[int, int]] = {}  # seq -> (item, position in it)
            for i in idxs:
                for pos, s in enumerate(items[i][1].seq):
                    if s not in first:
                        first[s] = (i, pos)
            order = sorted(first)
            per_device[device_id] = _merged([items[first[s][0]][1] for s in order], order, first)
            owner[device_id] = {s: first[s][0] for s in order}
        with self.engine.begin() as conn:
            acked = self._acked(conn, list(per_device))
            fresh = {
                d: c.sliced(a) if (a := bisect_right(c.seq, acked.get(d, 0))) else c
                for d, c in per_device.items()
            }
            ranges = {d: (c.seq[0], c.seq[-1]) for d, c in fresh.items() if c.seq}
            present = self._stored_in(conn, ranges)
            todo = {
                d: c.picked(i for i, s in enumerate(c.seq) if s not in present[d])
                if d in present
                else c
                for d, c in fresh.items()
            }
            inserted = self._insert_log(conn, todo, now)
            windows = self._insert_windows(conn, inserted, now + self.max_skew_s)
            new_acked = self._advance_all(conn, acked, fresh)
            self._note_devices(conn, new_acked, acked, inserted, dropped, now)
        accepted = [0] * len(items)
        for device_id, stored in inserted.items():
            first_of = owner.get(device_id)
            if first_of is None:
                accepted[slots[device_id][0]] += len(stored)
                continue
            for s in stored.seq:
                accepted[first_of[s]] += 1
        acks = [
            TelemetryAck(
                accepted=accepted[i],
                duplicates=len(batch) - accepted[i],
                acked_seq=new_acked[device_id],
            )
            for i, (device_id, batch) in enumerate(items)
        ]
        return IngestResult(acks, sum(accepted), windows)

    def _acked(self, conn: Connection, device_ids: list[str]) -> dict[str, int]:
        dev = cs.devices
        rows = conn.execute(select(dev.c.id, dev.c.telemetry_acked).where(dev.c.id.in_(device_ids)))
        return {str(row[0]): int(row[1] or 0) for row in rows}

    def _stored_in(
        self, conn: Connection, ranges: Mapping[str, tuple[int, int]]
    ) -> dict[str, set[int]]:
        """Seqs already stored per device within [lo, hi] (one round trip on PostgreSQL)."""
        out: dict[str, set[int]] = {}
        if not ranges:
            return out
        if self.postgres:
            ids = list(ranges)
            rows: list[Any] = list(
                conn.execute(
                    text(
                        "SELECT t.device_id, t.seq FROM telemetry t JOIN unnest("
                        "CAST(:ids AS text[]), CAST(:los AS bigint[]), CAST(:his AS bigint[])"
                        ") AS r(d, lo, hi) ON t.device_id = r.d AND t.seq BETWEEN r.lo AND r.hi"
                    ),
                    {
                        "ids": ids,
                        "los": [ranges[d][0] for d in ids],
                        "his": [ranges[d][1] for d in ids],
                    },
                )
            )
            for d, seq in rows:
                out.setdefault(str(d), set()).add(int(seq))
            return out
        # SQLite: one indexed range read per device, on the driver's cursor (building the
        # same SQLAlchemy expression twice per device and upload cost more than the read).
        raw = conn.connection.driver_connection
        assert raw is not None
        cur = raw.cursor()
        for d, (lo, hi) in ranges.items():
            cur.execute(_SQLITE_STORED_IN, (d, lo, hi))
            found = {int(row[0]) for row in cur.fetchall()}
            if found:
                out[d] = found
        cur.close()
        return out

    def _insert_log(
        self, conn: Connection, todo: Mapping[str, TelemetryColumns], now: float
    ) -> dict[str, TelemetryColumns]:
        todo = {d: c for d, c in todo.items() if c.seq}
        if not todo:
            return {}
        raw = conn.connection.driver_connection
        assert raw is not None
        cols = ", ".join(_COLUMNS)
        if not self.postgres:
            # One writer at a time (the lock in ingest_many): the pre-check is exact.
            # Multi-row INSERTs rather than executemany: less per-row work, and the GIL
            # is released once per statement (the sqlite3 module drops it around each
            # step), so a thread decoding the next upload runs meanwhile instead of
            # trading the GIL with this one row by row.
            flat: list[Any] = []
            for device_id, c in todo.items():
                flat.extend(
                    itertools.chain.from_iterable(
                        zip(
                            itertools.repeat(device_id),
                            c.seq,
                            c.cls,
                            c.ts,
                            c.kind,
                            c.data,
                            itertools.repeat(now),
                            strict=False,  # the repeats are endless; the columns agree
                        )
                    )
                )
            width = len(_COLUMNS)
            step = _SQLITE_ROWS * width
            cur = raw.cursor()
            for i in range(0, len(flat), step):
                params = flat[i : i + step]
                values = ",".join(["(" + ",".join("?" * width) + ")"] * (len(params) // width))
                cur.execute(f"INSERT INTO telemetry ({cols}) VALUES {values}", params)
            cur.close()
            return todo
        body = _log_copy_text(todo, now)
        # Fast path: COPY straight into the log. A replica storing the same (device, seq)
        # meanwhile makes it fail on the key; then the slow path settles who stored what.
        try:
            with (
                conn.begin_nested(),
                raw.cursor() as cur,
                cur.copy(f"COPY telemetry ({cols}) FROM STDIN") as copy,
            ):
                copy.write(body)
            return todo
        except (IntegrityError, _unique_violation()):
            pass
        with raw.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _telemetry_in "
                "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY _telemetry_in ({cols}) FROM STDIN") as copy:
                copy.write(body)
            cur.execute(
                f"INSERT INTO telemetry ({cols}) SELECT {cols} FROM _telemetry_in "
                "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq"
            )
            stored = {(str(d), int(s)) for d, s in cur.fetchall()}
            cur.execute("DELETE FROM _telemetry_in")
        return {
            d: c.picked(i for i, s in enumerate(c.seq) if (d, s) in stored) for d, c in todo.items()
        }

    def _insert_windows(
        self, conn: Connection, inserted: Mapping[str, TelemetryColumns], latest: float
    ) -> int:
        rows = []
        for device_id, c in inserted.items():
            if not c.windows:
                continue
            for i, s in enumerate(c.seq):
                d = c.windows.get(s)
                if d is None:
                    continue
                rows.append(
                    (
                        device_id,
                        s,
                        window_name(d.get("pipeline", ""), "pipeline"),
                        window_name(d.get("model", ""), "model"),
                        window_name(d.get("version", ""), "version"),
                        window_name(d.get("deployment", ""), "deployment"),
                        *_window_times(d, c.ts[i], latest),
                        False,
                        _bounded(d, c.data[i]),
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
                copy.write(_copy_text(rows))
        else:
            cur = raw.cursor()
            cur.executemany(
                f"INSERT INTO telemetry_windows ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
            )
            cur.close()
        return len(rows)

    def _advance_all(
        self, conn: Connection, acked: Mapping[str, int], fresh: Mapping[str, TelemetryColumns]
    ) -> dict[str, int]:
        """The highest seq stored contiguously from 1, per device (every fresh seq is stored)."""
        out: dict[str, int] = {}
        beyond: dict[str, int] = {}
        for d, c in fresh.items():
            cur = acked.get(d, 0)
            seqs = c.seq  # ascending
            if seqs and seqs[0] == cur + 1 and seqs[-1] == cur + len(seqs):
                cur = seqs[-1]  # no gap (the common case): no per-record walk
            else:
                for s in seqs:
                    if s != cur + 1:
                        break
                    cur = s
            out[d] = cur
            if seqs and cur == seqs[-1]:
                beyond[d] = cur  # records that arrived earlier, out of order, may follow
        while beyond:
            stored = self._stored_in(conn, {d: (h + 1, h + 1000) for d, h in beyond.items()})
            again: dict[str, int] = {}
            for d, h in beyond.items():
                found = stored.get(d, set())
                cur = h
                while cur + 1 in found:
                    cur += 1
                out[d] = cur
                if cur == h + 1000:
                    again[d] = cur
            beyond = again
        return out

    def _note_devices(
        self,
        conn: Connection,
        new_acked: Mapping[str, int],
        old_acked: Mapping[str, int],
        inserted: Mapping[str, TelemetryColumns],
        dropped: Mapping[str, Mapping[str, int]],
        now: float,
    ) -> None:
        dev = cs.devices
        # Rows in id order, as every batch writer of device rows: a group of uploads in
        # arrival order and a last-seen flush deadlocked on PostgreSQL.
        ids = sorted(new_acked)
        moved = [{"d": d, "a": new_acked[d]} for d in ids if new_acked[d] > old_acked.get(d, 0)]
        if moved:
            conn.execute(
                update(dev)
                .where(dev.c.id == bindparam("d"), dev.c.telemetry_acked < bindparam("a"))
                .values(telemetry_acked=bindparam("a")),
                moved,
            )
        rows = []
        for device_id in ids:
            c = inserted.get(device_id)
            ends = (
                [
                    _window_times(c.windows[s], t, now + self.max_skew_s)[1]
                    for s, t in zip(c.seq, c.ts, strict=True)
                    if s in c.windows
                ]
                if c is not None and c.windows
                else []
            )
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
