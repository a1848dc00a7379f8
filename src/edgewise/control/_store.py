"""The control plane's storage: one SQL implementation over SQLite (default) and PostgreSQL.

The store knows rows, not policy: it answers and records, and every decision (who may do
what, what a device should run, whether a bundle is trusted) is made outside it. Operations
that several replicas may race on are single statements or compare-and-set updates, so a
PostgreSQL database shared by N replicas never double-acts:

- identical concurrent creates collide on a unique key; the loser reads the winner's row;
- enrollment-token uses are a conditional `UPDATE ... WHERE uses < max_uses`;
- desired-state revisions advance with `UPDATE ... WHERE desired_hash = <what I read>`;
- audit records append under a lock on the chain-head row (`SELECT ... FOR UPDATE`).

Usage::

    store = open_store("sqlite:///edgewise-data/edgewise.db")   # migrates to head
    store.insert_device({...})
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from edgewise.control import _schema as t
from edgewise.control._migrate import migrate
from edgewise.control._sqlite import locked_connection_factory
from edgewise.control._storelogs import LogStore
from edgewise.protocol import vocabulary_digest

__all__ = [
    "BUSY_TIMEOUT_S",
    "PG_CONNECT_TIMEOUT_S",
    "ConflictError",
    "LastAdminError",
    "RawJSON",
    "SqlStore",
    "newer_report",
    "open_store",
]

Row = dict[str, Any]
TRUST_ROOT_KEY = "trust_root:"  # meta keys: the prefix and the version, zero-padded
TRUST_HEAD_KEY = "trust_head"  # meta key: the newest stored version (`add_trust_root`)


class ConflictError(Exception):
    """A create that collides with an existing object holding other content."""


class LastAdminError(Exception):
    """A revoke refused: it would leave no unrevoked unscoped admin token."""


class RawJSON(str):
    """Text already serialised as JSON, finite numbers only: stored as it is.

    See `rollout_document`.
    """


def _json(value: Any) -> str:
    if type(value) is RawJSON:
        return str(value)
    # NaN and infinities are not JSON; refusing them here keeps SQLite and PostgreSQL
    # equal (PostgreSQL would refuse them anyway) and surfaces as a 422, not a 500.
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


# How long a request waits for the database before it is answered 503 `store_busy`
# (`_app`). SQLite: another process's write transaction (the CLI, a second server, a
# backup) holds the write lock; 30 s had every request behind it wait 30 s, past most
# clients' own timeouts, and then fail anyway. 5 s covers any honest write (they take
# milliseconds, a big rollout commit well under a second) with room for a slow disk,
# and answers a stuck lock while the client still listens: agents retry on 503 with
# Retry-After. A writer of this process waits at most this long in the queue of
# `_sqlite` and then this long again in SQLite's busy handler.
BUSY_TIMEOUT_S = 5.0
# libpq's connect timeout, unless the URL sets one: a PostgreSQL host that accepts the
# TCP connection but never answers (hung, overloaded, a half-open tunnel) otherwise
# holds the start, and later each new pool connection, for ever.
PG_CONNECT_TIMEOUT_S = 10


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        memory = url in {"sqlite://", "sqlite:///:memory:"}
        # Writers of this process queue on one lock rather than in SQLite's sleeping
        # busy handler (see `_sqlite`).
        factory = locked_connection_factory(timeout_s=BUSY_TIMEOUT_S)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": BUSY_TIMEOUT_S,
                "factory": factory,
            },
            poolclass=StaticPool if memory else None,
            json_serializer=_json,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            cur.close()

        return engine
    parsed = make_url(url)
    timeout: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        timeout = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        json_serializer=_json,
        connect_args=timeout,
    )


def open_store(url: str, *, run_migrations: bool = True) -> SqlStore:
    """Open (and by default migrate) the store at a SQLAlchemy URL."""
    engine = _engine(url)
    if run_migrations:
        migrate(engine)
    return SqlStore(engine)


def _row(mapping: Any) -> Row:
    return dict(mapping._mapping) if hasattr(mapping, "_mapping") else dict(mapping)


class _Stale(Exception):
    """A compare-and-set found what it was computed from changed: roll it back."""


class SqlStore(LogStore):
    """All persistent state of the control plane."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite has one writer; serialising this process's audit appends avoids
        # busy retries. PostgreSQL replicas serialise on the chain-head row instead.
        self._audit_lock = threading.Lock()

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        """A value from the key/value meta table."""
        with self.engine.connect() as c:
            return c.execute(select(t.meta.c.value).where(t.meta.c.key == key)).scalar()

    def put_meta_if_absent(self, key: str, value: str) -> bool:
        """Set a meta key only if unset; True when this call set it (race-safe)."""
        try:
            with self.engine.begin() as c:
                c.execute(insert(t.meta).values(key=key, value=value))
            return True
        except IntegrityError:
            return False

    # ------------------------------------------------------------ trust root
    def trust_roots(self, limit: int | None = None) -> list[Row]:
        """The stored signed trust roots, oldest version first (`edgewise.protocol._trust`).

        At most the newest `limit` (at most `MAX_CHAIN`; a desired document carries the
        newest only, so a recompute asks for 1 and parses no other row), and only rows
        that read as JSON objects: a row damaged or edited in the database is left out
        (and logged) rather than failing every desired document, view and install with
        it; devices check each version that is sent for themselves.
        """
        import logging  # here, not at the top: this module's other owners keep its head

        from edgewise.protocol import MAX_CHAIN

        m = t.meta
        with self.engine.connect() as c:
            rows = c.execute(
                select(m.c.key, m.c.value)
                .where(m.c.key.startswith(TRUST_ROOT_KEY))
                .order_by(m.c.key.desc())
            ).all()

        def finite(name: str) -> Any:  # NaN and Infinity: no JSON answer could carry them
            raise ValueError(name)

        def shallow(doc: Any) -> bool:  # every document it goes into must still encode
            level, depth = [doc], 0
            while level and depth <= 64:
                level = [
                    v
                    for x in level
                    for v in (x.values() if isinstance(x, dict) else x)
                    if isinstance(v, dict | list)
                ]
                depth += 1
            return not level

        out: list[Row] = []
        for key, value in rows:
            try:
                doc = json.loads(str(value), parse_constant=finite)
            except (TypeError, ValueError, RecursionError):
                doc = None
            if not isinstance(doc, dict) or not shallow(doc):
                logging.getLogger("edgewise.control").warning(
                    "meta row %s is not a trust root document: left out of the chain", key
                )
                continue
            out.append(doc)
            if len(out) == min(limit or MAX_CHAIN, MAX_CHAIN):
                break
        return out[::-1]

    def add_trust_root(
        self,
        version: int,
        signed: Row,
        publishers: Mapping[str, str],
        now: float,
        keep: int,
        after: int = 0,
    ) -> None:
        """Store a verified trust root and make its publishers the trusted ones, at once.

        Publisher keys it leaves out are no longer trusted (pushes they sign are
        refused); versions past the newest `keep` are dropped. `after` is the version it
        was verified against (0: none): it must still be the newest stored, so two
        replicas installing different versions at once cannot both succeed and leave a
        chain whose later link was never checked against the earlier one.

        Raises:
            ConflictError: this version is stored already, or another version was
                stored since `after` was read (another replica took it).
        """
        m, pk = t.meta, t.publisher_keys
        moved = (
            f"trust root version {after} is no longer the newest stored (another replica "
            "stored one since, or the newest row is damaged: see the log)"
        )
        try:
            with self.engine.begin() as c:
                # Compare-and-set on one row: a concurrent writer waits on its lock and
                # then finds the value changed (PostgreSQL), or writes after (SQLite).
                head = c.execute(select(m.c.value).where(m.c.key == TRUST_HEAD_KEY)).scalar()
                if head is None:
                    newest = c.execute(
                        select(m.c.key)
                        .where(m.c.key.startswith(TRUST_ROOT_KEY))
                        .order_by(m.c.key.desc())
                        .limit(1)
                    ).scalar()
                    digits = newest[len(TRUST_ROOT_KEY) :] if newest else "0"
                    if not digits.isdecimal() or int(digits) != after:
                        raise ConflictError(moved)
                    c.execute(insert(m).values(key=TRUST_HEAD_KEY, value=str(version)))
                else:
                    swapped = c.execute(
                        update(m)
                        .where(m.c.key == TRUST_HEAD_KEY, m.c.value == str(after))
                        .values(value=str(version))
                    )
                    if swapped.rowcount != 1:
                        raise ConflictError(moved)
                c.execute(
                    insert(m).values(
                        key=f"{TRUST_ROOT_KEY}{version:012d}", value=json.dumps(signed)
                    )
                )
                c.execute(delete(pk).where(pk.c.key_id.not_in(list(publishers))))
                have: set[str] = set(c.execute(select(pk.c.key_id)).scalars())
                for kid, b64 in publishers.items():
                    if kid not in have:
                        c.execute(
                            insert(pk).values(
                                key_id=kid,
                                public_key=b64,
                                name=f"trust root v{version}",
                                created_at=now,
                            )
                        )
                keys: list[str] = list(
                    c.execute(
                        select(m.c.key).where(m.c.key.startswith(TRUST_ROOT_KEY)).order_by(m.c.key)
                    ).scalars()
                )
                if len(keys) > keep:
                    c.execute(delete(m).where(m.c.key.in_(keys[: len(keys) - keep])))
        except IntegrityError:
            raise ConflictError(f"trust root version {version} is stored already") from None

    # ---------------------------------------------------------------- tokens
    def insert_token(self, row: Row) -> None:
        """Store an operator token (hash only)."""
        with self.engine.begin() as c:
            c.execute(insert(t.tokens).values(**row))

    def token_by_hash(self, token_hash: str) -> Row | None:
        """The token row with this hash, revoked or not."""
        with self.engine.connect() as c:
            r = c.execute(select(t.tokens).where(t.tokens.c.token_hash == token_hash)).first()
        return _row(r) if r else None

    def list_tokens(self) -> list[Row]:
        """All operator tokens, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(select(t.tokens).order_by(t.tokens.c.created_at, t.tokens.c.id))
            return [_row(r) for r in rows]

    def revoke_token(self, token_id: str, now: float, *, keep_root_admin: bool = False) -> bool:
        """Revoke a token (True also when it already was); False when unknown.

        With `keep_root_admin`, an unscoped admin token is revoked only while another
        unrevoked one remains, decided in the revoking transaction: two revokes of the
        last two, from two threads or two replicas, cannot both pass a check made before
        either wrote. On SQLite the one conditional `UPDATE` holds the write lock from
        its first read. On PostgreSQL that alone is not enough (under READ COMMITTED each
        `UPDATE` of a different row sees the other's row unrevoked and both commit), so
        the unrevoked unscoped admin rows are first locked (`FOR UPDATE`, in id order):
        the second revoke waits for the first, then re-reads them.

        Raises:
            LastAdminError: `keep_root_admin` and this is the last unrevoked one.
        """
        tok = t.tokens
        root = (tok.c.role == "admin") & (tok.c.scope.is_(None) | (tok.c.scope == ""))
        with self.engine.begin() as c:
            where = [tok.c.id == token_id, tok.c.revoked_at.is_(None)]
            if keep_root_admin:
                if self.dialect == "postgresql":
                    c.execute(
                        select(tok.c.id)
                        .where(root, tok.c.revoked_at.is_(None))
                        .order_by(tok.c.id)
                        .with_for_update()
                    ).all()
                other = tok.alias("other")
                another_root = (
                    select(other.c.id)
                    .where(
                        other.c.role == "admin",
                        other.c.scope.is_(None) | (other.c.scope == ""),
                        other.c.revoked_at.is_(None),
                        other.c.id != token_id,
                    )
                    .exists()
                )
                where.append(~root | another_root)
            if c.execute(update(tok).where(*where).values(revoked_at=now)).rowcount:
                return True
            r = c.execute(select(tok.c.revoked_at).where(tok.c.id == token_id)).first()
        if r is not None and r.revoked_at is None:
            raise LastAdminError(f"token {token_id} is the last unrevoked unscoped admin token")
        return r is not None

    # -------------------------------------------------------- publisher keys
    def add_publisher_key(self, key_id: str, public_key: str, name: str, now: float) -> bool:
        """Trust a publisher key; True if new, False if already trusted.

        Raises:
            ConflictError: the key id is taken by a different key.
        """
        try:
            with self.engine.begin() as c:
                c.execute(
                    insert(t.publisher_keys).values(
                        key_id=key_id, public_key=public_key, name=name, created_at=now
                    )
                )
            return True
        except IntegrityError:
            existing = self.publisher_keys().get(key_id)
            if existing != public_key:
                raise ConflictError(f"key id {key_id} is bound to another key") from None
            return False

    def publisher_keys(self) -> dict[str, str]:
        """Trusted publisher keys: key id -> base64 raw public key."""
        with self.engine.connect() as c:
            rows = c.execute(select(t.publisher_keys.c.key_id, t.publisher_keys.c.public_key))
            return {r.key_id: r.public_key for r in rows}

    def list_publisher_keys(self) -> list[Row]:
        """Trusted publisher keys with names."""
        with self.engine.connect() as c:
            rows = c.execute(select(t.publisher_keys).order_by(t.publisher_keys.c.key_id))
            return [_row(r) for r in rows]

    def remove_publisher_key(self, key_id: str) -> bool:
        """Stop trusting a key; False when unknown."""
        with self.engine.begin() as c:
            res = c.execute(delete(t.publisher_keys).where(t.publisher_keys.c.key_id == key_id))
            return bool(res.rowcount)

    # ------------------------------------------------------- enroll tokens
    def insert_enroll_token(self, row: Row) -> None:
        """Store an enrollment token (hash only)."""
        with self.engine.begin() as c:
            c.execute(insert(t.enroll_tokens).values(**row))

    def list_enroll_tokens(self) -> list[Row]:
        """All enrollment tokens."""
        with self.engine.connect() as c:
            rows = c.execute(select(t.enroll_tokens).order_by(t.enroll_tokens.c.created_at))
            return [_row(r) for r in rows]

    def use_enroll_token(self, token_hash: str, now: float) -> tuple[Row | None, str]:
        """Consume one use of an enrollment token.

        Returns:
            (row, "") on success, else (None, reason) with reason "unknown", "expired",
            "revoked" or "used up".
        """
        with self.engine.begin() as c:
            tok = t.enroll_tokens
            res = c.execute(
                update(tok)
                .where(
                    tok.c.token_hash == token_hash,
                    tok.c.uses < tok.c.max_uses,
                    tok.c.expires_at > now,
                    tok.c.revoked.is_(False),
                )
                .values(uses=tok.c.uses + 1)
            )
            r = c.execute(select(tok).where(tok.c.token_hash == token_hash)).first()
        if r is None:
            return None, "unknown"
        row = _row(r)
        if res.rowcount:
            return row, ""
        if row["revoked"]:
            return None, "revoked"
        if row["expires_at"] <= now:
            return None, "expired"
        return None, "used up"

    # --------------------------------------------------------------- devices
    def insert_device(self, row: Row) -> None:
        """Store a newly enrolled device.

        Raises:
            ConflictError: the id or public key is already enrolled.
        """
        defaults: Row = {
            "last_seen": None,
            "desired_revision": 0,
            "desired_hash": "",
            "desired_signed": None,
            "telemetry_acked": 0,
            "changed_at": row.get("enrolled_at", time.time()),
        }
        try:
            with self.engine.begin() as c:
                c.execute(insert(t.devices).values(**{**defaults, **row}))
        except IntegrityError:
            raise ConflictError("device or public key already enrolled") from None

    def get_device(self, device_id: str) -> Row | None:
        """One device row."""
        with self.engine.connect() as c:
            r = c.execute(select(t.devices).where(t.devices.c.id == device_id)).first()
        return _row(r) if r else None

    def list_devices(self) -> list[Row]:
        """All devices, by id."""
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(select(t.devices).order_by(t.devices.c.id))]

    def device_ids(self, status: str | None = "active") -> list[str]:
        """Ids of devices (by default only active ones)."""
        q = select(t.devices.c.id).order_by(t.devices.c.id)
        if status is not None:
            q = q.where(t.devices.c.status == status)
        with self.engine.connect() as c:
            return list(c.execute(q).scalars())

    def change_labels(
        self,
        device_id: str,
        change: Callable[[dict[str, str]], Mapping[str, str]],
        now: float,
    ) -> dict[str, str] | None:
        """Replace a device's labels with `change(current labels)`; None when unknown.

        Read and written under the row's lock: two replicas changing different labels of
        one device at once both take effect (a read here and a write later lost one).
        `change` may raise to refuse; nothing is written then.
        """
        d = t.devices
        with self.write_transaction() as c:
            # The write comes first: it locks the row (PostgreSQL) or the database
            # (SQLite) before the labels are read.
            res = c.execute(update(d).where(d.c.id == device_id).values(changed_at=now))
            if res.rowcount != 1:
                return None
            current = c.execute(select(d.c.labels).where(d.c.id == device_id)).scalar()
            labels = dict(change(dict(current or {})))
            c.execute(update(d).where(d.c.id == device_id).values(labels=labels))
            return labels

    def set_labels(self, device_id: str, labels: Mapping[str, str], now: float) -> bool:
        """Replace a device's labels; False when unknown."""
        with self.engine.begin() as c:
            res = c.execute(
                update(t.devices)
                .where(t.devices.c.id == device_id)
                .values(labels=dict(labels), changed_at=now)
            )
            return bool(res.rowcount)

    def last_seen_of(self, device_ids: Sequence[str]) -> dict[str, float]:
        """When each of these devices last reached the control plane (absent: never)."""
        d = t.devices
        out: dict[str, float] = {}
        with self.engine.connect() as c:
            for start in range(0, len(device_ids), 500):
                chunk = list(device_ids[start : start + 500])
                q = select(d.c.id, d.c.last_seen).where(
                    d.c.id.in_(chunk), d.c.last_seen.is_not(None)
                )
                out.update({r.id: float(r.last_seen) for r in c.execute(q)})
        return out

    def set_status(self, device_id: str, status: str, now: float) -> bool:
        """Change a device's status (e.g. "decommissioned"); False when unknown."""
        with self.engine.begin() as c:
            res = c.execute(
                update(t.devices)
                .where(t.devices.c.id == device_id)
                .values(status=status, changed_at=now)
            )
            return bool(res.rowcount)

    def cas_desired(
        self,
        device_id: str,
        expect_hash: str,
        revision: int,
        new_hash: str,
        signed: Row,
        now: float,
        expect_labels: Mapping[str, str] | None = None,
    ) -> bool:
        """Store a new desired document if nobody changed it since it was read.

        With `expect_labels`, also only if the labels it was computed from are still the
        device's: the hash alone comes back to what was read when a label change and its
        undo race (the undo's recompute finds nothing to write, and the document computed
        from the changed labels would land after it).
        """
        d = t.devices
        try:
            with self.engine.begin() as c:
                # The guarded write comes first: it locks the row (PostgreSQL) or the
                # database (SQLite) before the labels are read, so none change between.
                res = c.execute(
                    update(d)
                    .where(d.c.id == device_id, d.c.desired_hash == expect_hash)
                    .values(
                        desired_revision=revision,
                        desired_hash=new_hash,
                        desired_signed=signed,
                        changed_at=now,
                    )
                )
                if res.rowcount != 1:
                    return False
                if expect_labels is not None:
                    labels = c.execute(select(d.c.labels).where(d.c.id == device_id)).scalar()
                    if dict(labels or {}) != dict(expect_labels):
                        raise _Stale  # rolls the write back
            return True
        except _Stale:
            return False

    def resign_desired(self, device_id: str, revision: int, signed: Row) -> None:
        """Replace the stored signature of an unchanged revision (expiry refresh)."""
        with self.engine.begin() as c:
            c.execute(
                update(t.devices)
                .where(t.devices.c.id == device_id, t.devices.c.desired_revision == revision)
                .values(desired_signed=signed)
            )

    def change_stamps(self) -> dict[str, float]:
        """Every device's changed_at, by id (the replica resync)."""
        d = t.devices
        with self.engine.connect() as c:
            return {r.id: float(r.changed_at) for r in c.execute(select(d.c.id, d.c.changed_at))}

    def changed_since(self, since: float) -> list[tuple[str, float]]:
        """(id, changed_at) of devices changed at or after `since` (the replica watcher)."""
        d = t.devices
        with self.engine.connect() as c:
            rows = c.execute(select(d.c.id, d.c.changed_at).where(d.c.changed_at >= since))
            return [(r.id, float(r.changed_at)) for r in rows]

    def touch_last_seen(self, seen: Mapping[str, float]) -> None:
        """Record last-seen times in one batch (called periodically, not per request)."""
        if not seen:
            return
        d = t.devices
        # In id order, as every batch writer of device rows: two transactions locking the
        # same rows in different orders deadlock on PostgreSQL, and one of them is lost.
        rows = [{"b_id": device_id, "b_at": seen[device_id]} for device_id in sorted(seen)]
        with self.engine.begin() as c:
            c.execute(
                update(d)
                .where(
                    d.c.id == bindparam("b_id"),
                    d.c.last_seen.is_(None) | (d.c.last_seen < bindparam("b_at")),
                )
                .values(last_seen=bindparam("b_at")),
                rows,
            )

    # --------------------------------------------------------------- reports
    def save_report(self, device_id: str, report: Row, now: float) -> None:
        """Store a device report: the latest per pipeline wins, so resending is harmless."""
        self.save_reports([(device_id, report, now)])

    def save_reports(self, reports: Sequence[tuple[str, Row, float]]) -> None:
        """Store several device reports in one transaction.

        Of two reports of one device the newer wins: by their `sent_at` where both have
        one (a report older than the stored one is dropped, see `newer_report`), else
        the later in `reports`. A report's spec vocabulary and capabilities are kept
        whichever wins.
        """
        arrived: dict[str, tuple[Row, float]] = {}
        for device_id, report, now in reports:
            before = arrived.get(device_id)
            if before is None or newer_report(report.get("sent_at"), before[0].get("sent_at")):
                arrived[device_id] = (report, now)
        if not arrived:
            return
        d, dp = t.devices, t.device_pipelines
        # Rows locked in id order, as every batch writer of device rows does (see
        # `touch_last_seen`).
        ids = sorted(arrived)
        with self.engine.begin() as c:
            stored: dict[str, float | None] = {}
            for i in range(0, len(ids), 500):
                q = select(d.c.id, d.c.report_sent_at).where(d.c.id.in_(ids[i : i + 500]))
                stored.update(
                    (r.id, r.report_sent_at)
                    for r in c.execute(q.order_by(d.c.id).with_for_update())
                )
            latest = {
                device_id: arrived[device_id]
                for device_id in ids
                if newer_report(arrived[device_id][0].get("sent_at"), stored.get(device_id))
            }
            # Whatever their order: a device whose clock went back still says what it knows
            # and what it has (an agent sends both once per start: arrival order is theirs).
            self._keep_vocabularies(c, [r for _, r, _ in reports], max(n for _, _, n in reports))
            caps = {
                device_id: report["capabilities"]
                for device_id, report, _ in reports
                if isinstance(report.get("capabilities"), dict)
            }
            if caps:
                c.execute(
                    update(d)
                    .where(d.c.id == bindparam("b_id"))
                    .values(capabilities=bindparam("b_caps")),
                    [{"b_id": k, "b_caps": v} for k, v in sorted(caps.items())],
                )
            if not latest:
                return
            heads = [
                {
                    "b_id": device_id,
                    "b_revision": report.get("revision"),
                    "b_errors": report.get("errors", []),
                    "b_agent": _without_terms(report.get("agent") or {}),
                    "b_at": now,
                    "b_sent": _first_not_none(report.get("sent_at"), stored.get(device_id)),
                }
                for device_id, (report, now) in latest.items()
            ]
            rows = [
                {
                    "device_id": device_id,
                    "pipeline": name,
                    "model": p["model"],
                    "version": p["version"],
                    "slot": p.get("slot"),
                    "status": p["status"],
                    "reason": p.get("reason", ""),
                    "timeline": p.get("timeline", []),
                    "updated_at": now,
                }
                for device_id, (report, now) in latest.items()
                for name, p in report.get("pipelines", {}).items()
            ]
            c.execute(
                update(d)
                .where(d.c.id == bindparam("b_id"))
                .values(
                    report_revision=bindparam("b_revision"),
                    report_errors=bindparam("b_errors"),
                    report_agent=bindparam("b_agent"),
                    reported_at=bindparam("b_at"),
                    last_seen=bindparam("b_at"),
                    report_sent_at=bindparam("b_sent"),
                ),
                heads,
            )
            changed = list(latest)
            for i in range(0, len(changed), 500):
                c.execute(delete(dp).where(dp.c.device_id.in_(changed[i : i + 500])))
            if rows:
                c.execute(insert(dp), rows)

    def _keep_vocabularies(self, c: Connection, reports: list[Row], now: float) -> None:
        """Store the spec vocabularies these reports carry, once per digest.

        A list is kept only under the digest of its own terms: a device cannot put its
        terms under a digest other devices report.
        """
        found: dict[str, list[str]] = {}
        for report in reports:
            agent = report.get("agent") or {}
            terms = agent.get("spec_vocabulary")
            if isinstance(terms, list) and agent.get("spec_digest") == vocabulary_digest(terms):
                found[agent["spec_digest"]] = sorted(set(map(str, terms)))
        if not found:
            return
        v = t.agent_vocabularies
        known: set[str] = set(
            c.execute(select(v.c.digest).where(v.c.digest.in_(list(found)))).scalars()
        )
        if known:  # sent again (an agent restarted): still in use, whatever devices say
            c.execute(update(v).where(v.c.digest.in_(sorted(known))).values(last_seen=now))
        rows = [
            {"digest": k, "terms": terms, "first_seen": now, "last_seen": now}
            for k, terms in found.items()
            if k not in known
        ]
        if rows:
            ins = pg_insert if self.dialect == "postgresql" else sqlite_insert
            # Another replica may store the same agent build's terms at the same moment.
            c.execute(ins(v).on_conflict_do_nothing(), rows)

    def reported_agents(self) -> list[Any]:
        """What each active device last reported about its agent (`report_agent`)."""
        d = t.devices
        with self.engine.connect() as c:
            return list(c.execute(select(d.c.report_agent).where(d.c.status == "active")).scalars())

    def prune_vocabularies(self, before: float) -> int:
        """Forget unused spec vocabularies; returns how many.

        Unused: no device's stored report names it, and no report carried it since
        `before`. A device can send any number of made-up vocabularies (each under its
        own digest); without this each would be kept for ever. One a device still
        reports is kept however old.
        """
        v, d = t.agent_vocabularies, t.devices
        with self.engine.begin() as c:
            agents: list[Any] = list(c.execute(select(d.c.report_agent)).scalars())
            named = {str(a.get("spec_digest") or "") for a in agents if isinstance(a, dict)}
            last = func.coalesce(v.c.last_seen, v.c.first_seen)
            old: list[str] = list(c.execute(select(v.c.digest).where(last < before)).scalars())
            stale = sorted(k for k in old if k not in named)
            deleted = 0
            for i in range(0, len(stale), 500):
                # `last` again: one sent meanwhile (another replica) stays.
                chunk = v.c.digest.in_(stale[i : i + 500])
                deleted += c.execute(delete(v).where(chunk, last < before)).rowcount or 0
        return deleted

    def vocabularies(self, digests: Iterable[str]) -> dict[str, frozenset[str]]:
        """The stored spec vocabularies among `digests`, by digest."""
        wanted = sorted({k for k in digests if k})
        v = t.agent_vocabularies
        out: dict[str, frozenset[str]] = {}
        if not wanted:
            return out
        with self.engine.connect() as c:
            for i in range(0, len(wanted), 500):
                q = select(v.c.digest, v.c.terms).where(v.c.digest.in_(wanted[i : i + 500]))
                out.update((r.digest, frozenset(r.terms)) for r in c.execute(q))
        return out

    def device_pipelines(self, device_id: str) -> list[Row]:
        """Reported per-pipeline state of a device."""
        dp = t.device_pipelines
        with self.engine.connect() as c:
            rows = c.execute(select(dp).where(dp.c.device_id == device_id).order_by(dp.c.pipeline))
            return [_row(r) for r in rows]

    # ---------------------------------------------------------------- models
    def insert_model(self, row: Row) -> str:
        """Register a model version.

        Returns:
            "created", or "same" when this exact content is already registered.

        Raises:
            ConflictError: the version exists with other content.
        """
        try:
            with self.engine.begin() as c:
                c.execute(insert(t.models).values(**row))
            return "created"
        except IntegrityError:
            existing = self.get_model(row["name"], row["version"])
            if existing is not None and existing["sha256"] == row["sha256"]:
                return "same"
            raise ConflictError(
                f"{row['name']}@{row['version']} already exists with other content"
            ) from None

    def get_model(self, name: str, version: str) -> Row | None:
        """One model version."""
        m = t.models
        with self.engine.connect() as c:
            r = c.execute(select(m).where(m.c.name == name, m.c.version == version)).first()
        return _row(r) if r else None

    def model_by_sha(self, sha256: str) -> Row | None:
        """A model version whose `.ewb` has this digest."""
        with self.engine.connect() as c:
            r = c.execute(select(t.models).where(t.models.c.sha256 == sha256)).first()
        return _row(r) if r else None

    def list_models(self, name: str | None = None) -> list[Row]:
        """Model versions, by name then push time."""
        q = select(t.models).order_by(t.models.c.name, t.models.c.pushed_at)
        if name is not None:
            q = q.where(t.models.c.name == name)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)]

    def yanked_among(self, refs: Iterable[tuple[str, str]]) -> list[str]:
        """Which of these `(name, version)` model refs are yanked, as `name@version`."""
        wanted = set(refs)
        if not wanted:
            return []
        m = t.models
        q = select(m.c.name, m.c.version).where(
            m.c.yanked.is_(True), m.c.name.in_(sorted({n for n, _ in wanted}))
        )
        with self.engine.connect() as c:
            found = {(r.name, r.version) for r in c.execute(q)}
        return [f"{n}@{v}" for n, v in sorted(wanted & found)]

    def set_yanked(self, name: str, version: str, yanked: bool) -> bool:
        """Yank (or restore) a model version; False when unknown."""
        m = t.models
        with self.engine.begin() as c:
            res = c.execute(
                update(m).where(m.c.name == name, m.c.version == version).values(yanked=yanked)
            )
            return bool(res.rowcount)

    # ----------------------------------------------------------- deployments
    def create_deployment(self, row: Row) -> tuple[Row, bool]:
        """Create a deployment, idempotently by name.

        Returns:
            (row, created): created is False when an identical one already existed.

        Raises:
            ConflictError: the name is taken by a deployment with other content.
        """
        try:
            with self.engine.begin() as c:
                c.execute(insert(t.deployments).values(**row))
            created = True
        except IntegrityError:
            created = False
        existing = self.get_deployment(row["name"])
        if existing is None:  # pragma: no cover - deleted between insert and read
            raise ConflictError(f"deployment {row['name']} changed concurrently")
        if not created and existing["content_hash"] != row["content_hash"]:
            raise ConflictError(f"deployment {row['name']} exists with other content")
        return existing, created

    def get_deployment(self, ref: str) -> Row | None:
        """A deployment by id or name."""
        d = t.deployments
        with self.engine.connect() as c:
            r = c.execute(select(d).where((d.c.id == ref) | (d.c.name == ref))).first()
        return _row(r) if r else None

    def list_deployments(self) -> list[Row]:
        """All deployments, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(select(t.deployments).order_by(t.deployments.c.seq))
            return [_row(r) for r in rows]

    def delete_deployment(self, deployment_id: str) -> bool:
        """Delete a deployment; False when unknown."""
        with self.engine.begin() as c:
            res = c.execute(delete(t.deployments).where(t.deployments.c.id == deployment_id))
            return bool(res.rowcount)

    def count(self, table: str) -> int:
        """Row count of a table (diagnostics, /metrics)."""
        tab = t.metadata.tables[table]
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(tab)).scalar() or 0)


def newer_report(sent_at: float | None, stored: float | None) -> bool:
    """Whether a report built at `sent_at` replaces one built at `stored`.

    Equal times replace (a resent report is the same report); a side without a time
    (a report stored before `sent_at` existed, a caller that sends none) never blocks.
    """
    return sent_at is None or stored is None or sent_at >= stored


def _first_not_none(a: float | None, b: float | None) -> float | None:
    return a if a is not None else b


def _without_terms(agent: Mapping[str, Any]) -> dict[str, Any]:
    """A report's agent info as a device row keeps it: its vocabulary by digest only."""
    return {k: v for k, v in agent.items() if k != "spec_vocabulary"}
