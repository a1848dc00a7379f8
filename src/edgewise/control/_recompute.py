"""Desired-state recompute in bulk, for the thousands of devices one rollout step moves.

`ControlPlane.recompute` brings one device up to date (a few queries and a signature);
a wave of 7,500 devices does the same with one read per 500 devices and one write
transaction per 500, the same compare-and-set on `desired_hash` (a device whose document
changed meanwhile falls back to the one-device path) and the same wake-up: a revision
bump drops the cached document and wakes the device's long-poll.

`reconcile_all` is the safety net under every trigger: each replica recomputes every
active device in bulk when it starts and every `RECONCILE_S` after. A deployment change
is committed before the devices are recomputed, so a control plane killed in between
(a deploy of the control plane itself, the OOM killer) left those devices on the old
document until something else touched them; so did a deployment change racing another
replica's recompute. Unchanged devices cost a hash each and no write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select, update

from edgewise.control import _schema as t
from edgewise.control._desiredcalc import content_hash, desired_content
from edgewise.control._live import CachedDevice
from edgewise.control._plane import ControlPlane
from edgewise.control._revisions import apply_assignments, overrides_for
from edgewise.control._selector import parse_selector
from edgewise.protocol import DesiredState, sign_desired

__all__ = ["RECONCILE_S", "recompute_devices", "recompute_selector", "reconcile_all"]

_CHUNK = 500
RECONCILE_S = 300.0

_d = t.devices
_CAS = (
    update(_d)
    .where(_d.c.id == bindparam("device"), _d.c.desired_hash == bindparam("expect"))
    .values(
        desired_revision=bindparam("rev"),
        desired_hash=bindparam("hash"),
        desired_signed=bindparam("signed"),
        changed_at=bindparam("stamp"),
    )
)


def recompute_devices(plane: ControlPlane, device_ids: Sequence[str]) -> int:
    """Recompute these devices' desired documents; returns how many got a new revision."""
    ids = sorted(set(device_ids))
    if not ids:
        return 0
    deployments = plane.store.list_deployments()
    trust_roots = plane.store.trust_roots(limit=1)  # a document carries the newest
    d = t.devices
    bumped = 0
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        since = plane.cache.generation()
        with plane.store.engine.connect() as c:
            rows = c.execute(
                select(
                    d.c.id,
                    d.c.labels,
                    d.c.desired_hash,
                    d.c.desired_revision,
                    d.c.public_key,
                    d.c.status,
                ).where(d.c.id.in_(chunk), d.c.status == "active")
            ).all()
        by_id = {row.id: row for row in rows}
        assigned = overrides_for(plane, chunk)
        now = plane.clock()
        writes: list[dict[str, Any]] = []
        for row in rows:
            deps = apply_assignments(plane, deployments, assigned.get(row.id))
            content = desired_content(
                deps, row.labels, plane.settings.egress, trust_roots=trust_roots
            )
            new_hash = content_hash(content)
            if new_hash == row.desired_hash:
                continue
            revision = int(row.desired_revision) + 1
            doc = DesiredState(
                device_id=row.id,
                revision=revision,
                issued_at=now,
                expires_at=now + plane.settings.desired_ttl_s,
                **content,
            )
            signed = sign_desired(doc, plane.key, plane.key_id).model_dump(mode="json")
            writes.append(
                {"device": row.id, "expect": row.desired_hash, "rev": revision,
                 "hash": new_hash, "signed": signed}
            )  # fmt: skip
        lost: list[str] = []
        changed: list[str] = []
        if writes:
            # Stamped at the write, not at the read: the replica watcher looks back a few
            # seconds from each pass, and signing a chunk takes time under load.
            stamp = plane.clock()
            with plane.store.engine.begin() as c:
                # One statement for the chunk (executemany), each row compare-and-set
                # on the hash it was computed from; which rows took is read back in
                # the same transaction (executemany has no per-row count).
                c.execute(_CAS, [{**w, "stamp": stamp} for w in writes])
                # A document computed from labels changed since (by another replica)
                # counts as lost: the one-device path rewrites it from the labels now
                # (the hash alone may have come back to what was read).
                took = {
                    row.id
                    for row in c.execute(
                        select(d.c.id, d.c.labels).where(
                            d.c.id.in_([w["device"] for w in writes]), d.c.changed_at == stamp
                        )
                    )
                    if dict(row.labels or {}) == dict(by_id[row.id].labels or {})
                }
            for w in writes:
                (changed if w["device"] in took else lost).append(w["device"])
            plane.changes.mark(changed, stamp)
        # Hand the committed documents to the cache before waking, as the one-device
        # path does: the woken long-polls answer from memory, not with a store read
        # each on a worker thread (thousands at once in a wave).
        fresh = {w["device"]: w for w in writes}
        items = {}
        for device_id in changed:
            w, cols = fresh[device_id], dict(by_id[device_id]._mapping)
            items[device_id] = CachedDevice.from_row(cols, w["rev"], w["signed"], stamp)
        plane.cache.replace_many(items, since)
        for device_id in changed:
            plane.notifier.notify(device_id)
        plane.desired_committed(changed, [fresh[device_id]["rev"] for device_id in changed])
        bumped += len(changed)
        for device_id in lost:  # changed under us: the careful one-device path
            plane.recompute(device_id)
            bumped += 1
    return bumped


def recompute_selector(plane: ControlPlane, deployment_id: str) -> int:
    """Recompute every active device the deployment's selector matches."""
    dep = plane.store.get_deployment(deployment_id)
    if dep is None:
        return 0
    selector = parse_selector(dep["selector"])
    d = t.devices
    with plane.store.engine.connect() as c:
        rows = c.execute(select(d.c.id, d.c.labels).where(d.c.status == "active")).all()
    return recompute_devices(plane, [r.id for r in rows if selector.matches(r.labels)])


def reconcile_all(plane: ControlPlane) -> int:
    """Recompute every active device; returns how many were behind (now brought up)."""
    d = t.devices
    with plane.store.engine.connect() as c:
        ids = [row.id for row in c.execute(select(d.c.id).where(d.c.status == "active"))]
    return recompute_devices(plane, ids)
