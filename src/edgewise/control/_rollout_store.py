"""Rollout persistence: rows, leases, and the one transaction each step commits in.

A step's effects (assignments, notification log, stable revision, audit records) commit
in the same transaction as the rollout's new document, guarded by compare-and-set on the
row's `version` (and, for the driver, on its lease). A replica whose lease lapsed, or an
operator command that raced a step, finds the version moved on and its whole transaction
rolls back: nothing it computed takes effect twice.

Leases: each active rollout row carries `lease_owner` and `lease_expires`. A driver takes
rows whose lease is free or lapsed (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so
replicas never wait on each other) and renews them on every tick.

The notification log (`rollout_notifications`) is unique per (rollout, device, kind):
notifying a device twice within one rollout cannot commit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, and_, delete, insert, or_, select, update

import edgewise
from edgewise.control import _schema as t
from edgewise.control._outbox import NOTIFY_EVENTS, enqueue, rollout_message
from edgewise.control._plane import ApiError, ControlPlane, digest
from edgewise.control._revisions import promote_in, revision_pipelines
from edgewise.control._store import RawJSON
from edgewise.control.rollout import (
    Action,
    NotifyDevices,
    RecordEvent,
    RevertDevices,
    Rollout,
    SetStableRevision,
    WakeAt,
)

__all__ = [
    "ACTIVE_STATES",
    "RolloutStore",
    "StepLost",
    "UnreadableRollout",
    "read_rollout",
    "remember_parsed",
    "rollout_document",
]

Row = dict[str, Any]
ACTIVE_STATES = ("pending", "running", "paused", "awaiting_approval")
_CHUNK = 500


class StepLost(Exception):
    """The rollout changed (or the lease moved) since it was read: nothing was written."""


class UnreadableRollout(ValueError):
    """A stored rollout document this control plane cannot read.

    During a rolling upgrade of a replicated control plane, a newer replica may store a
    state this one does not know (as `held_back` once was); a damaged row reads the same.
    """


def read_rollout(row: Row) -> Rollout:
    """The rollout a stored row holds.

    Raises:
        UnreadableRollout: naming the rollout, this build and what did not parse.
    """
    try:
        return Rollout.from_dict(row["document"])
    except ValueError as exc:
        raise UnreadableRollout(
            f"rollout {row['id']} is stored in a form this control plane (edgewise "
            f"{edgewise.__version__}) cannot read ({exc}); a replica running a newer edgewise may "
            "have written it: upgrade this one, or ask one that is"
        ) from None


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


class RolloutStore:
    """Rollout rows over the control plane's store."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.store = plane.store
        self.engine = plane.store.engine

    # ------------------------------------------------------------------ rows
    def insert(self, row: Row, audit: tuple[str, str, str, str, str]) -> None:
        """Store a new rollout and its audit record in one transaction.

        Raises:
            IntegrityError: the deployment has an active rollout already.
            ApiError: 409 when the deployment's stable revision is no longer the
                rollout's `from_revision` (a promote committed while it was starting).
        """
        d = t.deployments
        with self.store.write_transaction() as c:
            # The rollout row first (a completing rollout of the deployment holds its
            # row, then the deployment's), then the deployment's row, locked to the
            # commit: a promote (`create_revision`) locks it before looking for an
            # active rollout, so one of the two sees the other.
            c.execute(insert(t.rollouts).values(**row))
            lock = update(d).where(d.c.id == row["deployment_id"])
            c.execute(lock.values(stable_revision=d.c.stable_revision))
            found = c.execute(
                select(d.c.stable_revision).where(d.c.id == row["deployment_id"])
            ).first()
            stable = int(found.stable_revision or 1) if found else None
            if stable != int(row["from_revision"]):
                raise ApiError(  # rolls the insert back
                    409,
                    "conflict",
                    f"the deployment's stable revision changed (now {stable}) while rollout "
                    "start read it; start it again",
                )
            self.plane.audit(*audit, conn=c)

    def get(self, rollout_id: str) -> Row | None:
        """One rollout row."""
        with self.engine.connect() as c:
            r = c.execute(select(t.rollouts).where(t.rollouts.c.id == rollout_id)).first()
        return dict(r._mapping) if r else None

    def head(self, rollout_id: str) -> Row | None:
        """One rollout row without its document (which is ~0.8 MB at 10,000 devices)."""
        r = t.rollouts
        cols = [c for c in r.c if c.name != "document"]
        with self.engine.connect() as c:
            found = c.execute(select(*cols).where(r.c.id == rollout_id)).first()
        return dict(found._mapping) if found else None

    def version(self, rollout_id: str) -> int | None:
        """The rollout row's version alone (None: no such rollout)."""
        r = t.rollouts
        with self.engine.connect() as c:
            v = c.execute(select(r.c.version).where(r.c.id == rollout_id)).scalar()
        return None if v is None else int(v)

    def list_rows(self, deployment_id: str | None = None, active: bool | None = None) -> list[Row]:
        """Rollouts, newest first."""
        r = t.rollouts
        q = select(r).order_by(r.c.created_at.desc(), r.c.id)
        if deployment_id is not None:
            q = q.where(r.c.deployment_id == deployment_id)
        if active is True:
            q = q.where(r.c.state.in_(ACTIVE_STATES))
        elif active is False:
            q = q.where(r.c.state.not_in(ACTIVE_STATES))
        with self.engine.connect() as c:
            return [dict(x._mapping) for x in c.execute(q)]

    # ---------------------------------------------------------------- leases
    def acquire_leases(
        self, owner: str, now: float, ttl: float, skip: dict[str, int] | None = None
    ) -> list[str]:
        """Take (or renew) the leases of active rollouts nobody else holds.

        `skip` (rollout id -> row version) leaves those rollouts alone while they stay at
        that version: the ones this replica found it cannot read.
        """
        r = t.rollouts
        free = or_(r.c.lease_owner.is_(None), r.c.lease_owner == owner, r.c.lease_expires < now)
        which = and_(r.c.state.in_(ACTIVE_STATES), free)
        for rollout_id, version in (skip or {}).items():
            which = and_(which, or_(r.c.id != rollout_id, r.c.version != version))
        return [i for i, _ in self._take(which, owner, now, ttl)]

    def acquire_unsettled(self, owner: str, now: float, ttl: float) -> list[tuple[str, str]]:
        """Take the leases of finished rollouts still leased: (id, deployment id) each.

        A driver lets a rollout go only after writing the desired documents its last step
        owed, so a finished rollout with a lease was left by a driver that died (or
        failed) in between. Once that lease runs out, any driver may settle it.
        """
        r = t.rollouts
        mine_or_lapsed = or_(r.c.lease_owner == owner, r.c.lease_expires < now)
        left = and_(r.c.state.not_in(ACTIVE_STATES), r.c.lease_owner.is_not(None))
        return self._take(and_(left, mine_or_lapsed), owner, now, ttl)

    def _take(
        self, which: ColumnElement[bool], owner: str, now: float, ttl: float
    ) -> list[tuple[str, str]]:
        """Lease the rollouts `which` selects to `owner`; (id, deployment id) of each taken.

        On PostgreSQL rows another replica is taking at the same moment are skipped, and
        the update repeats the condition: only what is still free is taken.
        """
        r = t.rollouts
        with self.engine.begin() as c:
            q = select(r.c.id).where(which)
            if self.store.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ids: list[str] = list(c.execute(q).scalars())
            if not ids:
                return []
            c.execute(
                update(r)
                .where(r.c.id.in_(ids), which)
                .values(lease_owner=owner, lease_expires=now + ttl)
            )
            owned = select(r.c.id, r.c.deployment_id).where(
                r.c.id.in_(ids), r.c.lease_owner == owner
            )
            return sorted((str(i), str(d)) for i, d in c.execute(owned))

    def release(self, rollout_id: str, owner: str) -> None:
        """Give a lease back (a finished rollout, a stopping replica)."""
        r = t.rollouts
        with self.engine.begin() as c:
            c.execute(
                update(r)
                .where(r.c.id == rollout_id, r.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
            )

    # ------------------------------------------------------------------ steps
    def commit(
        self,
        rollout: Rollout,
        expect_version: int,
        actions: Sequence[Action],
        *,
        now: float,
        owner: str | None = None,
        actor: str = "engine",
    ) -> None:
        """Store the rollout's new value and carry out its actions, all or nothing.

        Args:
            rollout: the new value.
            expect_version: the row version it was computed from.
            actions: what the step or command returned.
            now: the driver's clock.
            owner: the driver's lease id (None: an operator command, no lease needed).
            actor: who the audit records name for engine events.

        Raises:
            StepLost: the row moved on (or the lease lapsed); nothing was written.
        """
        r = t.rollouts
        wake = min((a.at for a in actions if isinstance(a, WakeAt)), default=None)
        cond = [r.c.id == rollout.id, r.c.version == expect_version]
        if owner is not None:
            cond += [r.c.lease_owner == owner, r.c.lease_expires > now]
        with self.store.write_transaction() as c:
            # The guarded write comes first: on SQLite it takes the write lock before
            # anything is read, on PostgreSQL it locks the row until commit.
            values: dict[str, Any] = {
                "document": rollout_document(rollout),
                "state": rollout.state.value,
                "version": expect_version + 1,
                "wake_at": wake,
                "updated_at": now,
            }
            if rollout.terminal:
                values["active_key"] = None  # frees the deployment for its next rollout
            res = c.execute(update(r).where(*cond).values(**values))
            if res.rowcount != 1:
                raise StepLost(rollout.id)  # rolls the transaction back
            self._effects(c, rollout, actions, now, actor)

    def _effects(
        self, c: Connection, rollout: Rollout, actions: Sequence[Action], now: float, actor: str
    ) -> None:
        a, n = t.rollout_assignments, t.rollout_notifications
        for action in actions:
            if isinstance(action, NotifyDevices):
                ids = list(action.ids)
                revision = int(action.revision)
                for chunk in _chunks(ids):
                    c.execute(
                        delete(a).where(
                            a.c.deployment_id == rollout.deployment, a.c.device_id.in_(chunk)
                        )
                    )
                c.execute(
                    insert(n),
                    [_log(rollout.id, d, "notify", revision, now) for d in ids],
                )
                c.execute(
                    insert(a),
                    [
                        {
                            "device_id": d,
                            "deployment_id": rollout.deployment,
                            "rollout_id": rollout.id,
                            "revision": revision,
                            "updated_at": now,
                        }
                        for d in ids
                    ],
                )
            elif isinstance(action, RevertDevices):
                ids = list(action.ids)
                c.execute(
                    insert(n),
                    [_log(rollout.id, d, "revert", int(action.revision), now) for d in ids],
                )
                # Back on the stable revision: an assignment would only repeat it.
                c.execute(delete(a).where(a.c.rollout_id == rollout.id))
            elif isinstance(action, SetStableRevision):
                pipelines = revision_pipelines(self.plane, action.deployment, int(action.revision))
                promote_in(c, action.deployment, int(action.revision), pipelines)
                c.execute(delete(a).where(a.c.rollout_id == rollout.id))
            elif isinstance(action, RecordEvent):
                detail = dict(action.detail)
                who = str(detail.pop("actor", "engine"))
                self.plane.audit(
                    actor if who == "engine" else who,
                    action.kind,
                    f"rollout:{rollout.id}",
                    digest(detail),
                    _summary(detail),
                    conn=c,
                )
                if action.kind in NOTIFY_EVENTS and self.plane.settings.rollout_webhook:
                    d = t.deployments
                    name = c.execute(select(d.c.name).where(d.c.id == rollout.deployment))
                    message = rollout_message(
                        rollout,
                        action.kind,
                        actor if who == "engine" else who,
                        str(name.scalar() or rollout.deployment),
                        now,
                    )
                    enqueue(c, action.kind, message, now)

    def notifications(self, rollout_id: str) -> list[Row]:
        """The rollout's notification log."""
        n = t.rollout_notifications
        with self.engine.connect() as c:
            rows = c.execute(select(n).where(n.c.rollout_id == rollout_id).order_by(n.c.at))
            return [dict(x._mapping) for x in rows]

    def assigned_devices(self, rollout_id: str) -> list[str]:
        """Devices the rollout currently holds on its revision."""
        a = t.rollout_assignments
        with self.engine.connect() as c:
            q = select(a.c.device_id).where(a.c.rollout_id == rollout_id)
            return list(c.execute(q).scalars())


def _log(rollout_id: str, device_id: str, kind: str, revision: int, now: float) -> Row:
    return {
        "rollout_id": rollout_id,
        "device_id": device_id,
        "kind": kind,
        "revision": revision,
        "at": now,
    }


def _summary(detail: dict[str, Any]) -> str:
    # The audit result column is short: the phase and the reason are what a reader scans.
    keys = ("phase", "revision", "count", "reverted", "held_back")
    parts = [f"{k}={detail[k]}" for k in keys if k in detail]
    if "reason" in detail:
        parts.append(f"reason={detail['reason']}")
    return ("ok " + " ".join(parts)).strip()[:200]


def remember_parsed(
    cache: dict[str, tuple[int, Any]], rollout_id: str, version: int, rollout: Rollout
) -> None:
    """Keep `rollout`, the value of `rollout_id` at `version`, for the status views.

    The views parse a 10,000-device document once per version (~0.1 s of CPU); the
    driver hands over the value it has just written, so a watched rollout on the replica
    that drives it is never parsed at all. A handful are watched at a time: the cache
    starts over past 32 rollouts.
    """
    if len(cache) >= 32 and rollout_id not in cache:
        cache.clear()
    cache[rollout_id] = (version, rollout)


def rollout_document(rollout: Rollout) -> RawJSON | dict[str, Any]:
    """The stored document of `rollout`, serialised by orjson when that is exact.

    The driver stores a 10,000-device rollout on every step that changes it; the
    standard library's encoder took ~18 ms per document (20,000 floats to format) and
    9 % of the control plane's GIL time in a wave, orjson 1.3 ms. orjson writes NaN and
    infinities as null where the store must refuse them, so the document goes this way
    only when every number in it is finite (else the dict, for the careful encoder).
    """
    doc = rollout.to_dict()
    rest = {k: v for k, v in doc.items() if k not in ("devices", "phases")}
    try:
        json.dumps(rest, allow_nan=False)
        # A sum is finite only if every term is (a NaN or an infinity carries through;
        # an overflow merely sends a finite document the careful way). A device not
        # notified yet has no times at all: None, which must not send the whole document
        # the careful way (every rollout until its last wave was notified went so).
        times = sum(x for s in doc["devices"].values() for x in (s[2] or 0.0, s[3] or 0.0))
        if not math.isfinite(times):
            return doc
        return RawJSON(orjson.dumps(doc).decode())
    except (ValueError, TypeError):  # orjson.JSONEncodeError is a TypeError
        return doc
