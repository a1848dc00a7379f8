"""SQLite connections that queue this process's writers on one lock instead of busy retries.

SQLite has one writer at a time. When two threads of the control plane write at once, the
loser waits in SQLite's busy handler, which sleeps 1, 2, 5, ... up to 100 ms between
tries and is not woken when the lock frees. Under a fleet's load (enrollments, reports,
rollout steps, telemetry, all on worker threads) that turned a 15 ms enrollment into
about 0.1-0.4 s of mostly idle waiting. Here every connection of one engine shares a
`threading.Lock`: a transaction takes it at its first write and gives it back at commit
or rollback, so writers of this process queue in order and are woken the moment the
previous one commits; SQLite's busy timeout remains for writers in other processes (the
CLI, a second server on the same file).

Reads take no lock (WAL readers never block). Python's sqlite3 module starts a
transaction just before the first INSERT/UPDATE/DELETE (deferred), so a transaction's
reads before its first write see the latest commit and no snapshot can go stale.

Safety valves: a thread that already holds the lock through another connection (a nested
write) does not wait for itself, and a writer that cannot get the lock within the busy
timeout proceeds without it; both fall back to SQLite's own locking, as before.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

__all__ = ["locked_connection_factory"]

_READS = ("SELECT", "PRAGMA", "EXPLAIN", "WITH")


def _writes(sql: str) -> bool:
    head = sql.lstrip()[:8].upper()
    return bool(head) and not head.startswith(_READS)


class _Gate:
    """The write lock of one database file and who holds it."""

    def __init__(self, timeout_s: float) -> None:
        self.lock = threading.Lock()
        self.holder: int | None = None  # thread ident
        self.timeout_s = timeout_s


class _LockedConnection(sqlite3.Connection):
    _gate: _Gate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holds = False

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or _LockedCursor)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self.cursor().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self.cursor().executemany(sql, *args)

    def _before(self, sql: str) -> None:
        if self._holds or not _writes(sql):
            return
        gate, me = self._gate, threading.get_ident()
        if gate.holder == me:  # nested write on another connection: SQLite decides
            return
        if gate.lock.acquire(timeout=gate.timeout_s):
            gate.holder, self._holds = me, True

    def _after(self) -> None:
        if self._holds and not self.in_transaction:
            self._release()

    def _release(self) -> None:
        if self._holds:
            self._holds = False
            self._gate.holder = None
            self._gate.lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:
                self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()


class _LockedCursor(sqlite3.Cursor):
    connection: _LockedConnection

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        conn = self.connection
        conn._before(sql)
        try:
            return super().execute(sql, *args)
        finally:
            conn._after()

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        conn = self.connection
        conn._before(sql)
        try:
            return super().executemany(sql, *args)
        finally:
            conn._after()


def locked_connection_factory(timeout_s: float) -> type[sqlite3.Connection]:
    """A `sqlite3.connect(factory=...)` class whose connections share one write lock.

    Call once per database (engine): connections made from the returned class queue
    their write transactions on a lock of their own.

    Args:
        timeout_s: longest wait for the lock before writing without it (use the busy
            timeout).
    """
    return type("LockedConnection", (_LockedConnection,), {"_gate": _Gate(timeout_s)})
