"""The store's append-only logs: the audit chain and device telemetry.

A mixin of `SqlStore` (same engine, same contract suite). Both logs are written by many
writers at once: audit records append under a lock on the chain-head row (`SELECT ... FOR
UPDATE` on PostgreSQL, one writer at a time on SQLite), telemetry relies on the (device,
seq) primary key so each record is stored exactly once whatever the retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from edgewise.control import _schema as t

__all__ = ["LogStore"]

Row = dict[str, Any]


def _row(mapping: Any) -> Row:
    return dict(mapping._mapping)


class LogStore:
    """Audit chain and telemetry tables."""

    engine: Engine
    dialect: str
    _audit_lock: threading.Lock

    # ----------------------------------------------------------------- audit
    @contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """A write transaction that may append audit records (`append_audit(conn=...)`).

        The process's audit lock is taken first: an audit append waiting for SQLite's
        write lock must never hold the lock this transaction needs.
        """
        with self._audit_lock, self.engine.begin() as c:
            yield c

    def append_audit(
        self, build: Callable[[int, str], Row], genesis: str, conn: Connection | None = None
    ) -> Row:
        """Append one audit record at the chain head.

        Args:
            build: (seq, prev_hash) -> the complete record including its `hash`.
            genesis: the prev_hash of the first record.
            conn: append inside this `write_transaction` (it commits with it).
        """
        if conn is not None:
            return self._append_audit(conn, build, genesis)
        with self._audit_lock, self.engine.begin() as c:
            return self._append_audit(c, build, genesis)

    def _append_audit(self, c: Connection, build: Callable[[int, str], Row], genesis: str) -> Row:
        head = self._lock_head(c, genesis)
        record = build(head["seq"] + 1, head["hash"])
        c.execute(insert(t.audit).values(**record))
        c.execute(
            update(t.audit_head)
            .where(t.audit_head.c.id == 1)
            .values(seq=record["seq"], hash=record["hash"])
        )
        return record

    def _lock_head(self, c: Connection, genesis: str) -> Row:
        q = select(t.audit_head).where(t.audit_head.c.id == 1)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        else:
            # SQLite's transaction begins at its first write: a head read before it is
            # no lock, and another process (the CLI beside a server) appending meanwhile
            # took the same seq (UNIQUE constraint failed). A write that changes nothing
            # takes the database's write lock first, so the head read next is the newest.
            c.execute(
                update(t.audit_head).where(t.audit_head.c.id == 1).values(seq=t.audit_head.c.seq)
            )
        r = c.execute(q).first()
        if r is not None:
            return _row(r)
        ins = pg_insert if self.dialect == "postgresql" else sqlite_insert
        # Another replica may create the head at the same moment; keep theirs.
        c.execute(ins(t.audit_head).values(id=1, seq=0, hash=genesis).on_conflict_do_nothing())
        return _row(c.execute(q).one())

    def audit_head(self) -> str | None:
        """The hash of the newest record as the head row remembers it."""
        with self.engine.connect() as c:
            q = select(t.audit_head.c.hash).where(t.audit_head.c.id == 1)
            return c.execute(q).scalar()

    def list_audit(self, after: int = 0, limit: int | None = None) -> list[Row]:
        """Audit records in chain order."""
        q = select(t.audit).where(t.audit.c.seq > after).order_by(t.audit.c.seq)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)]

    # ------------------------------------------------------------- telemetry
    def insert_telemetry(
        self, device_id: str, records: Sequence[Row], now: float
    ) -> tuple[int, int, int]:
        """Store telemetry records exactly once per (device, seq).

        Returns:
            (accepted, duplicates, acked_seq): acked_seq is the highest seq stored
            contiguously from 1.
        """
        tel = t.telemetry
        unique: dict[int, Row] = {}
        for rec in records:
            unique.setdefault(int(rec["seq"]), rec)
        with self.engine.begin() as c:
            seqs = sorted(unique)
            present: set[int] = set()
            if seqs:
                present = set(
                    c.execute(
                        select(tel.c.seq).where(tel.c.device_id == device_id, tel.c.seq.in_(seqs))
                    ).scalars()
                )
            new = [
                {
                    "device_id": device_id,
                    "seq": s,
                    "cls": unique[s]["cls"],
                    "ts": unique[s]["ts"],
                    "kind": unique[s]["kind"],
                    "data": unique[s]["data"],
                    "received_at": now,
                }
                for s in seqs
                if s not in present
            ]
            if new:
                c.execute(insert(tel), new)
            acked = self._advance_ack(c, device_id)
        return len(new), len(records) - len(new), acked

    def _advance_ack(self, c: Connection, device_id: str) -> int:
        dev = t.devices
        acked = c.execute(select(dev.c.telemetry_acked).where(dev.c.id == device_id)).scalar() or 0
        tel = t.telemetry
        while True:
            seqs: list[int] = list(
                c.execute(
                    select(tel.c.seq)
                    .where(tel.c.device_id == device_id, tel.c.seq > acked)
                    .order_by(tel.c.seq)
                    .limit(1000)
                ).scalars()
            )
            step = acked
            for s in seqs:
                if s != step + 1:
                    break
                step = s
            advanced = step != acked
            acked = step
            if not advanced or len(seqs) < 1000:
                break
        c.execute(
            update(dev)
            .where(dev.c.id == device_id, dev.c.telemetry_acked < acked)
            .values(telemetry_acked=acked)
        )
        return int(acked)

    def telemetry(self, device_id: str, limit: int = 1000) -> list[Row]:
        """Stored telemetry of a device, by seq."""
        tel = t.telemetry
        q = select(tel).where(tel.c.device_id == device_id).order_by(tel.c.seq).limit(limit)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)]
