"""The durable telemetry buffer: SQLite in WAL mode, a byte budget, priority eviction.

Records get a per-device sequence number at append time, in the same transaction that
stores them, so seq is strictly increasing across restarts and the control plane can
ingest each `(device, seq)` exactly once however often an upload is retried. A record
leaves the buffer only when the control plane acknowledged the batch that carried it.

When the stored bytes exceed the budget, the lowest class goes first (samples, then
metrics, then events; oldest first within a class) and the drop counters, which are
durable too, grow by what was evicted. The counters travel with every batch.

The disk is a budget too. The buffer leaves `floor_bytes` of it free for the rest of the
agent (state.json, model slots): when an append would eat into them it evicts the same
way, lowest class first, so a device offline for days keeps its events and can still
install. If the disk is full anyway, the records that cannot be stored are counted as
dropped (in memory until the counters can be written) and `BufferFull` is raised;
SQLite's rollback leaves what is stored intact.

A damaged file (zeroed, truncated, not a database) is moved aside (`NAME.damaged`) and
the buffer starts afresh, at open or when a read first meets the damage; a disk that
cannot hold the file at all (read-only) gets a buffer in memory (`volatile`). Either
way the agent keeps serving. A fresh start numbers on from above anything sent before
(the old last seq if it still reads, else the clock in microseconds) so the control
plane does not take new records for duplicates of old ones.

Example:
    >>> import tempfile, pathlib
    >>> buf = TelemetryBuffer(pathlib.Path(tempfile.mkdtemp()) / "t.db", budget_bytes=10_000)
    >>> [r.seq for r in buf.append([("event", "boot", {}, 1.0)])]
    [1]
    >>> buf.depth()
    1
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edgewise.protocol import TELEMETRY_CLASSES, TelemetryBatch, TelemetryRecord

__all__ = ["BufferFull", "TelemetryBuffer"]

T = TypeVar("T")

# Index in TELEMETRY_CLASSES is the priority: 0 (event) is kept longest.
_CLS_INDEX: dict[str, int] = {c: i for i, c in enumerate(TELEMETRY_CLASSES)}
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

# What the buffer leaves free on its disk for the rest of the agent.
DISK_FLOOR_BYTES = 1 << 20
_WAL_PAGES = 256
# SQLite's primary result codes for a file that is not (or no longer) a database.
_DAMAGED = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL = 13  # SQLITE_FULL


class BufferFull(OSError):
    """The disk cannot take these records: they were dropped (and counted as dropped)."""


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", -1)) & 0xFF


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class TelemetryBuffer:
    """A bounded, durable, priority-evicting queue of telemetry records."""

    def __init__(
        self,
        path: Path,
        budget_bytes: int = 16 * 1024 * 1024,
        *,
        floor_bytes: int = DISK_FLOOR_BYTES,
        free_bytes: Callable[[Path], int] = _disk_free,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the buffer at `path`.

        Args:
            path: the SQLite file.
            budget_bytes: what the records may take, by their budgeted size.
            floor_bytes: disk space appends leave free (evicting to keep it).
            free_bytes: free space of the disk holding a directory.
            clock: seconds since the epoch (seeds the numbering of a fresh start).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.budget_bytes = budget_bytes
        self.floor_bytes = floor_bytes
        self._free_bytes = free_bytes
        self._clock = clock
        self._lock = threading.Lock()
        #: Why the buffer was started afresh or in memory ("" when it opened as it was).
        self.reset_reason = ""
        #: True when the disk cannot hold the buffer: records live in memory only.
        self.volatile = False
        # Drops the disk could not count yet (it was full); written with the next append.
        self._unsaved_drops: dict[str, int] = {}
        # Acked records the disk would not let go of (it went read-only): skipped by
        # `peek` so they are not uploaded again and again, deleted by a later ack.
        self._acked_unsaved: set[int] = set()
        self._db = self._open()

    # -- opening, and starting afresh ------------------------------------------------

    def _connect(self, target: str | Path, seed: int = 0) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed append survives a power cut, not only a process crash.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA cache_size=-512")  # KiB: appends and peeks touch few pages
            # The WAL is disk the budget does not see: checkpoint it every 1 MiB and cut it
            # back to that (SQLite's default lets it grow to 4 MiB and keeps it).
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_PAGES * 4096}")
            db.executescript(_SCHEMA)
            db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchall()
            if seed:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
                    (seed,),
                )
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        if self.path.is_symlink():  # planted: never write through it
            self.path.unlink()
            self.reset_reason = "telemetry.db was a symlink: removed"
        try:
            return self._connect(self.path)
        except sqlite3.DatabaseError as exc:
            if _code(exc) in _DAMAGED:
                return self._set_aside(exc)
            return self._in_memory(exc)

    def _seed(self) -> int:
        """Where a fresh start numbers from: past the old last seq, if it reads."""
        last = 0
        with contextlib.suppress(sqlite3.Error, OSError, ValueError, TypeError):
            old = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                row = old.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
                last = int(row[0]) if row else 0
            finally:
                old.close()
        return max(last, int(self._clock() * 1_000_000))

    def _set_aside(self, exc: sqlite3.Error) -> sqlite3.Connection:
        """Move a damaged file aside (one copy kept) and start an empty buffer."""
        seed = self._seed()
        aside = self.path.with_name(self.path.name + ".damaged")
        for suffix in ("-wal", "-shm"):  # they belong to the damaged file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        try:
            os.replace(self.path, aside)
            db = self._connect(self.path, seed)
        except (OSError, sqlite3.Error) as again:
            return self._in_memory(again, seed)
        self.reset_reason = f"telemetry.db damaged ({exc}): moved to {aside.name}"
        return db

    def _in_memory(self, exc: BaseException, seed: int = 0) -> sqlite3.Connection:
        self.volatile = True
        self.reset_reason = f"telemetry.db unusable ({exc}): buffering in memory"
        return self._connect(":memory:", seed or self._seed())

    def _guarded(self, op: Callable[[], T]) -> T:
        """Run `op` (lock held); if it meets a damaged file, start afresh and run it again."""
        try:
            return op()
        except sqlite3.DatabaseError as exc:
            if _code(exc) not in _DAMAGED or self.volatile:
                raise
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = self._set_aside(exc)
            return op()

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
        batch = list(records)
        for cls, *_ in batch:
            if cls not in _CLS_INDEX:
                raise ValueError(f"unknown telemetry class {cls!r}")
        with self._lock:
            try:
                return self._guarded(lambda: self._append(batch, shed=0))
            except sqlite3.OperationalError as exc:
                if _code(exc) != _FULL:
                    raise
            # The disk is full: shed stored records of these classes or lower ones (a
            # delete needs little room) to make room for these, else drop and count them.
            incoming = sum(len(kind) + _ROW_OVERHEAD for _, kind, _, _ in batch)
            best = min((_CLS_INDEX[cls] for cls, *_ in batch), default=0)
            try:
                return self._append(batch, shed=2 * incoming + 4096, shed_from=best)
            except sqlite3.OperationalError as exc:
                if _code(exc) != _FULL:
                    raise
                for cls, *_ in batch:
                    self._unsaved_drops[cls] = self._unsaved_drops.get(cls, 0) + 1
                raise BufferFull(
                    errno.ENOSPC, f"telemetry buffer: disk full, {len(batch)} records dropped"
                ) from exc

    def _room(self) -> int | None:
        """Disk bytes the buffer may still grow by (None: unknown, or in memory)."""
        if self.volatile:
            return None
        try:
            return self._free_bytes(self.path.parent) - self.floor_bytes
        except OSError:
            return None

    def _append(
        self, batch: list[NewRecord], shed: int, shed_from: int = 0
    ) -> list[TelemetryRecord]:
        out: list[TelemetryRecord] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._meta("last_seq")
            total = self._meta("total_bytes")
            if shed:
                total = self._evict(total, max(0, total - shed), shed_from)
            rows = []
            incoming = 0
            for cls, kind, data, ts in batch:
                seq += 1
                payload = json.dumps(data, separators=(",", ":"), default=str)
                size = len(payload) + len(kind) + _ROW_OVERHEAD
                incoming += size
                rows.append((seq, _CLS_INDEX[cls], ts, kind, payload, size))
                out.append(TelemetryRecord(seq=seq, cls=cls, ts=ts, kind=kind, data=data))
            self._db.executemany(
                "INSERT INTO records (seq, cls, ts, kind, data, size) VALUES (?,?,?,?,?,?)",
                rows,
            )
            self._set_meta("last_seq", seq)
            limit = self.budget_bytes
            room = self._room()
            if room is not None and room < incoming:
                # Grow the file by what the disk can spare, no more: old rows' pages are
                # reused by the new ones.
                limit = min(limit, total + max(room, 0))
            total = self._evict(total + incoming, limit)
            self._set_meta("total_bytes", total)
            for cls, n in self._unsaved_drops.items():
                key = f"dropped_{cls}"
                self._set_meta(key, self._meta(key) + n)
            self._db.execute("COMMIT")
        except BaseException:
            # After SQLITE_FULL, SQLite may already have rolled the transaction back; a
            # ROLLBACK then would raise and hide the reason.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._unsaved_drops.clear()
        return out

    def _evict(self, total: int, limit: int, highest: int = 0) -> int:
        """Delete records, lowest class first, oldest first, down to `limit` bytes.

        Classes above `highest` (a lower index) are kept whatever the limit.
        """
        for idx in reversed(range(highest, len(TELEMETRY_CLASSES))):
            if total <= limit:
                break
            excess = total - limit
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
            gone = frozenset(self._acked_unsaved)
            rows = self._guarded(
                lambda: self._db.execute(
                    "SELECT seq, cls, ts, kind, data, size FROM records ORDER BY seq LIMIT ?",
                    (max_records + len(gone),),
                ).fetchall()
            )
            dropped = self._dropped_locked()
        for seq, cls, ts, kind, data, size in rows:
            if seq in gone:
                continue
            if len(records) == max_records or (records and used + int(size) > max_bytes):
                break
            used += int(size)
            records.append(
                TelemetryRecord(
                    seq=seq, cls=TELEMETRY_CLASSES[cls], ts=ts, kind=kind, data=json.loads(data)
                )
            )
        return TelemetryBatch(records=records, dropped=dropped)

    def ack(self, seqs: Sequence[int]) -> None:
        """Forget records the control plane has stored.

        Raises:
            sqlite3.Error: the disk would not record it (read-only, full). The records
                are forgotten in memory all the same: this process does not upload
                them again; after a restart they go once more, and the control plane
                stores them once ((device, seq)).
        """
        if not seqs:
            return
        with self._lock:
            todo = sorted(self._acked_unsaved.union(seqs))
            try:
                self._guarded(lambda: self._ack(todo))
            except sqlite3.Error:
                self._acked_unsaved.update(seqs)
                raise
            self._acked_unsaved.clear()

    def _ack(self, seqs: Sequence[int]) -> None:
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
            if self._db.in_transaction:  # (see `_append`)
                self._db.execute("ROLLBACK")
            raise

    def depth(self) -> int:
        """How many records wait for upload."""
        with self._lock:
            stored = self._guarded(
                lambda: int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            )
            return max(0, stored - len(self._acked_unsaved))

    def stored_bytes(self) -> int:
        """The budgeted size of what is stored."""
        with self._lock:
            return self._guarded(lambda: self._meta("total_bytes"))

    def last_seq(self) -> int:
        """The highest sequence number ever assigned."""
        with self._lock:
            return self._guarded(lambda: self._meta("last_seq"))

    def _dropped_locked(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            return {c: self._meta(f"dropped_{c}") for c in TELEMETRY_CLASSES}

        stored = self._guarded(read)
        return {c: n + self._unsaved_drops.get(c, 0) for c, n in stored.items()}

    def dropped(self) -> dict[str, int]:
        """Cumulative eviction counts per class."""
        with self._lock:
            return self._dropped_locked()
