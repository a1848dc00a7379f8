"""The durable telemetry buffer: SQLite in WAL mode, a byte budget, priority eviction.

Records get a per-device sequence number at append time, in the same transaction that
stores them, so seq is strictly increasing across restarts and the control plane can
ingest each `(device, seq)` exactly once however often an upload is retried. A record
leaves the buffer only when the control plane acknowledged the batch that carried it.

When the stored bytes exceed the budget, the lowest class goes first (samples, then
metrics, then events; oldest first within a class) and the drop counters, which are
durable too, grow by what was evicted. The counters travel with every batch.

Example:
    >>> import tempfile, pathlib
    >>> buf = TelemetryBuffer(pathlib.Path(tempfile.mkdtemp()) / "t.db", budget_bytes=10_000)
    >>> [r.seq for r in buf.append([("event", "boot", {}, 1.0)])]
    [1]
    >>> buf.depth()
    1
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgewise.protocol import TELEMETRY_CLASSES, TelemetryBatch, TelemetryRecord

__all__ = ["TelemetryBuffer"]

# Index in TELEMETRY_CLASSES is the priority: 0 (event) is kept longest.
_CLS_INDEX = {c: i for i, c in enumerate(TELEMETRY_CLASSES)}
_ROW_OVERHEAD = 48  # bytes a row costs beyond its payload, so tiny records are not free

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    cls INTEGER NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_cls_seq ON records (cls, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

NewRecord = tuple[str, str, dict[str, Any], float]  # (cls, kind, data, ts)


class TelemetryBuffer:
    """A bounded, durable, priority-evicting queue of telemetry records."""

    def __init__(self, path: Path, budget_bytes: int = 16 * 1024 * 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed append survives a power cut, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA cache_size=-512")  # KiB: appends and peeks touch few pages
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def append(self, records: Iterable[NewRecord]) -> list[TelemetryRecord]:
        """Store records durably (one transaction), then evict down to the budget.

        Returns the stored records with their sequence numbers (some may already have
        been evicted again if the budget is tiny).

        Raises:
            ValueError: an unknown class.
        """
        out: list[TelemetryRecord] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("last_seq")
                total = self._meta("total_bytes")
                rows = []
                for cls, kind, data, ts in records:
                    if cls not in _CLS_INDEX:
                        raise ValueError(f"unknown telemetry class {cls!r}")
                    seq += 1
                    payload = json.dumps(data, separators=(",", ":"), default=str)
                    size = len(payload) + len(kind) + _ROW_OVERHEAD
                    total += size
                    rows.append((seq, _CLS_INDEX[cls], ts, kind, payload, size))
                    out.append(TelemetryRecord(seq=seq, cls=cls, ts=ts, kind=kind, data=data))
                self._db.executemany(
                    "INSERT INTO records (seq, cls, ts, kind, data, size) VALUES (?,?,?,?,?,?)",
                    rows,
                )
                self._set_meta("last_seq", seq)
                total = self._evict(total)
                self._set_meta("total_bytes", total)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def _evict(self, total: int) -> int:
        for idx in reversed(range(len(TELEMETRY_CLASSES))):
            if total <= self.budget_bytes:
                break
            excess = total - self.budget_bytes
            victims: list[int] = []
            freed = 0
            for seq, size in self._db.execute(
                "SELECT seq, size FROM records WHERE cls = ? ORDER BY seq", (idx,)
            ):
                victims.append(seq)
                freed += int(size)
                if freed >= excess:
                    break
            if victims:
                self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in victims])
                key = f"dropped_{TELEMETRY_CLASSES[idx]}"
                self._set_meta(key, self._meta(key) + len(victims))
                total -= freed
        return total

    def peek(self, max_records: int = 500, max_bytes: int = 512 * 1024) -> TelemetryBatch:
        """The oldest records (in seq order) as a batch, with the drop counters."""
        records: list[TelemetryRecord] = []
        used = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, cls, ts, kind, data, size FROM records ORDER BY seq LIMIT ?",
                (max_records,),
            ).fetchall()
            dropped = self._dropped_locked()
        for seq, cls, ts, kind, data, size in rows:
            if records and used + int(size) > max_bytes:
                break
            used += int(size)
            records.append(
                TelemetryRecord(
                    seq=seq, cls=TELEMETRY_CLASSES[cls], ts=ts, kind=kind, data=json.loads(data)
                )
            )
        return TelemetryBatch(records=records, dropped=dropped)

    def ack(self, seqs: Sequence[int]) -> None:
        """Forget records the control plane has stored."""
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                freed = 0
                for i in range(0, len(seqs), 500):
                    chunk = list(seqs[i : i + 500])
                    marks = ",".join("?" * len(chunk))
                    row = self._db.execute(
                        f"SELECT COALESCE(SUM(size), 0) FROM records WHERE seq IN ({marks})",
                        chunk,
                    ).fetchone()
                    freed += int(row[0])
                    self._db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
                self._set_meta("total_bytes", max(0, self._meta("total_bytes") - freed))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def depth(self) -> int:
        """How many records wait for upload."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def stored_bytes(self) -> int:
        """The budgeted size of what is stored."""
        with self._lock:
            return self._meta("total_bytes")

    def last_seq(self) -> int:
        """The highest sequence number ever assigned."""
        with self._lock:
            return self._meta("last_seq")

    def _dropped_locked(self) -> dict[str, int]:
        return {c: self._meta(f"dropped_{c}") for c in TELEMETRY_CLASSES}

    def dropped(self) -> dict[str, int]:
        """Cumulative eviction counts per class."""
        with self._lock:
            return self._dropped_locked()
