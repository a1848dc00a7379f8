"""SQLite writers of one process queue on one lock (`edgewise.control._sqlite`)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edgewise.control import open_store
from edgewise.control._sqlite import locked_connection_factory


def _gate_of(conn: sqlite3.Connection) -> threading.Lock:
    lock: threading.Lock = conn._gate.lock  # type: ignore[attr-defined]
    return lock


def _connect(path: Path, factory: type[sqlite3.Connection]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, factory=factory, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def test_a_write_transaction_holds_the_lock_until_commit_or_rollback(tmp_path: Path) -> None:
    factory = locked_connection_factory(timeout_s=5.0)
    conn = _connect(tmp_path / "db", factory)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    gate = _gate_of(conn)
    assert not gate.locked()  # DDL outside a transaction does not keep it

    conn.execute("SELECT count(*) FROM t").fetchone()
    assert not gate.locked()  # reads never take it
    conn.execute("INSERT INTO t VALUES (1)")
    assert gate.locked()
    conn.commit()
    assert not gate.locked()

    conn.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO t VALUES (2)")
    assert gate.locked()
    conn.rollback()
    assert not gate.locked()
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    conn.close()


def test_a_nested_write_on_the_same_thread_does_not_wait_for_itself(tmp_path: Path) -> None:
    factory = locked_connection_factory(timeout_s=60.0)
    outer, inner = _connect(tmp_path / "db", factory), _connect(tmp_path / "db", factory)
    outer.execute("CREATE TABLE t (k INTEGER)")
    outer.execute("INSERT INTO t VALUES (1)")
    inner.execute("PRAGMA busy_timeout=50")
    # SQLite refuses the second writer (as it would without the lock), quickly.
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        inner.execute("INSERT INTO t VALUES (2)")
    inner.rollback()
    outer.commit()
    assert not _gate_of(outer).locked()


def test_concurrent_writers_of_one_store_all_succeed_and_leave_the_lock_free(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    store.insert_enroll_token({"id": "t1", "token_hash": "h", "labels": {}, "expires_at": 1e12,
                               "max_uses": 100, "uses": 0, "created_at": 0.0,
                               "created_by": "test", "revoked": False})  # fmt: skip
    used: list[bool] = []

    def writer(i: int) -> None:
        for j in range(20):
            token, _ = store.use_enroll_token("h", 1.0)
            used.append(token is not None)
            store.insert_device({"id": f"d-{i}-{j}", "public_key": f"k-{i}-{j}",
                                 "labels": {}, "capabilities": {}, "status": "active",
                                 "enrolled_at": 1.0})  # fmt: skip

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    assert used.count(True) == 100 and len(used) == 160
    assert len(store.device_ids()) == 160
    with store.engine.connect() as c:
        assert not _gate_of(c.connection.dbapi_connection).locked()  # type: ignore[arg-type]
    store.close()
