"""Deployment revisions: every update of a deployment is a new, immutable revision.

A deployment keeps its history as numbered revisions (1 is what `deploy create` made);
exactly one is *stable*: the deployments row always holds the stable revision's
pipelines, so every device outside a rollout gets it. A rollout moves the devices of its
snapshot from the stable revision to another one by per-device *assignments*
(`rollout_assignments` rows); when it completes, its revision becomes the stable one.
`deploy update` adds a revision and, unless `--promote` is given, changes nothing on any
device: a rollout does that.

Revisions change pipelines (the models and their specs) and the egress policy (a
revision that does not mention one keeps the previous revision's); selector and
priority belong to the deployment (a different target is a different deployment).

Usage::

    view = create_revision(plane, "base", RevisionRequest(pipelines={...}), who)
    rollout_start(..., to_revision=view["revision"])
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from edgewise.control import _schema as t
from edgewise.control._plane import ApiError, ControlPlane, Principal, digest
from edgewise.control._rbac import selector_in_scope
from edgewise.protocol import EgressPolicy

__all__ = [
    "RevisionRequest",
    "apply_assignments",
    "create_revision",
    "deployment_content_hash",
    "list_revisions",
    "overrides_for",
    "pinned_refs",
    "promote_in",
    "revision_egress",
    "revision_pipelines",
    "stable_revision",
]

Row = dict[str, Any]

# Revisions never change once written, so their content is cached for good.
_PIPELINES: dict[tuple[str, int], dict[str, Any]] = {}
_EGRESS: dict[tuple[str, int], dict[str, Any] | None] = {}
_PIPELINES_LOCK = threading.Lock()


class RevisionRequest(BaseModel):
    """`POST /api/v1/deployments/{ref}/revisions`."""

    model_config = ConfigDict(extra="forbid")

    pipelines: dict[str, dict[str, Any]] | list[dict[str, Any]] = Field(min_length=1)
    note: str = Field(default="", max_length=500)
    promote: bool = False
    egress: EgressPolicy | None = Field(
        default=None,
        description="egress policy of this revision; omitted: the previous revision's, "
        "null: none (the server's default)",
    )


def stable_revision(deployment: Mapping[str, Any]) -> int:
    """The stable revision of a deployments row."""
    return int(deployment.get("stable_revision") or 1)


def deployment_content_hash(
    selector: str, priority: int, pipelines: Any, egress: Any = None
) -> str:
    """The content hash `deploy create` uses for idempotent re-creates."""
    body = {"selector": selector, "priority": priority, "pipelines": pipelines}
    if egress is not None:
        body["egress"] = egress
    return hashlib.sha256(digest(body).encode()).hexdigest()


def _pipelines_hash(pipelines: Any, egress: Any = None) -> str:
    # Without an egress policy the hash is the pipelines' alone, as before policies.
    body = pipelines if egress is None else {"pipelines": pipelines, "egress": egress}
    return hashlib.sha256(digest(body).encode()).hexdigest()


def _ensure_first(c: Connection, dep: Mapping[str, Any]) -> None:
    # Deployments created before revisions existed (or by `deploy create`) get their
    # current content recorded as revision 1 the first time anyone asks.
    rv = t.deployment_revisions
    found = c.execute(
        select(func.count()).select_from(rv).where(rv.c.deployment_id == dep["id"])
    ).scalar()
    if found:
        return
    c.execute(
        insert(rv).values(
            deployment_id=dep["id"],
            revision=stable_revision(dep),
            pipelines=dep["pipelines"],
            egress=dep.get("egress"),
            content_hash=_pipelines_hash(dep["pipelines"], dep.get("egress")),
            note="created",
            created_at=float(dep["created_at"]),
            created_by=str(dep["created_by"]),
        )
    )


def _revision_rows(plane: ControlPlane, dep: Mapping[str, Any]) -> list[Row]:
    rv = t.deployment_revisions
    try:
        with plane.store.engine.begin() as c:
            _ensure_first(c, dep)
    except IntegrityError:
        pass  # another request recorded revision 1 at the same moment
    with plane.store.engine.connect() as c:
        rows = c.execute(select(rv).where(rv.c.deployment_id == dep["id"]).order_by(rv.c.revision))
        return [dict(r._mapping) for r in rows]


def revision_pipelines(plane: ControlPlane, deployment_id: str, revision: int) -> dict[str, Any]:
    """The pinned pipelines of one revision.

    Raises:
        ApiError: 404 when the deployment has no such revision.
    """
    key = (deployment_id, int(revision))
    with _PIPELINES_LOCK:
        cached = _PIPELINES.get(key)
    if cached is not None:
        return cached
    dep = plane.store.get_deployment(deployment_id)
    if dep is None:
        raise ApiError(404, "not_found", f"no deployment {deployment_id}")
    for row in _revision_rows(plane, dep):
        if row["revision"] == revision:
            with _PIPELINES_LOCK:
                _PIPELINES[key] = row["pipelines"]
                _EGRESS[key] = row.get("egress")
            return dict(row["pipelines"])
    raise ApiError(404, "not_found", f"deployment {dep['name']} has no revision {revision}")


def pinned_refs(pipelines: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The `(name, version)` of every model a revision's pipelines pin, once each.

    A pipeline pins its model, and its fallback and cascade models when it has them.
    """
    refs: dict[tuple[str, str], None] = {}
    for p in pipelines.values():
        if not isinstance(p, Mapping):
            continue
        for role in ("model", "fallback", "cascade"):
            ref = p.get(role)
            if isinstance(ref, Mapping) and "name" in ref and "version" in ref:
                refs[(str(ref["name"]), str(ref["version"]))] = None
    return list(refs)


def revision_egress(
    plane: ControlPlane, deployment_id: str, revision: int
) -> dict[str, Any] | None:
    """The egress policy of one revision (None: it sets none).

    Raises:
        ApiError: 404 when the deployment has no such revision.
    """
    key = (deployment_id, int(revision))
    with _PIPELINES_LOCK:
        if key in _EGRESS:
            return _EGRESS[key]
    revision_pipelines(plane, deployment_id, revision)  # loads both into the caches
    with _PIPELINES_LOCK:
        return _EGRESS.get(key)


def _view(row: Mapping[str, Any], stable: int) -> dict[str, Any]:
    return {
        "revision": row["revision"],
        "egress": row.get("egress"),
        "stable": row["revision"] == stable,
        "note": row["note"],
        "created_at": row["created_at"],
        "created_by": row["created_by"],
        "pipelines": {
            name: f"{p['model']['name']}@{p['model']['version']}"
            for name, p in row["pipelines"].items()
        },
    }


def list_revisions(plane: ControlPlane, ref: str) -> dict[str, Any]:
    """A deployment's history, oldest first."""
    dep = plane.store.get_deployment(ref)
    if dep is None:
        raise ApiError(404, "not_found", f"no deployment {ref}")
    stable = stable_revision(dep)
    rows = _revision_rows(plane, dep)
    return {
        "deployment": dep["id"],
        "name": dep["name"],
        "stable_revision": stable,
        "revisions": [_view(r, stable) for r in rows],
    }


def create_revision(
    plane: ControlPlane, ref: str, req: RevisionRequest, who: Principal
) -> tuple[dict[str, Any], bool]:
    """Add a revision (pinned and pre-flighted like a create); identical content is a no-op.

    Returns:
        (revision view, created). The view's `incompatible` names the targeted devices
        that cannot run this revision, with why (a rollout to it refuses to start
        while some are agents too old for its specs).
    """
    from edgewise.control._deployments import DeploymentRequest, _prepare, egress_json

    dep = plane.store.get_deployment(ref)
    if dep is None:
        raise ApiError(404, "not_found", f"no deployment {ref}")
    if not selector_in_scope(who.scope, dep["selector"]):
        raise ApiError(403, "out_of_scope", "deployment reaches beyond the token's scope")
    prepared, incompatible = _prepare(
        plane,
        DeploymentRequest(
            name=dep["name"],
            selector=dep["selector"],
            priority=dep["priority"],
            pipelines=req.pipelines,
        ),
        who,
    )
    pipelines = prepared["pipelines"]
    if req.promote:  # before anything is written: a refused promote adds no revision
        with plane.store.engine.connect() as c:
            _refuse_promote_during_rollout(c, dep)
    rv = t.deployment_revisions
    for _ in range(5):
        rows = _revision_rows(plane, dep)
        latest = rows[-1]
        egress = (
            egress_json(req.egress) if "egress" in req.model_fields_set else latest.get("egress")
        )
        content = _pipelines_hash(pipelines, egress)
        if latest["content_hash"] == content:
            view = _view(latest, stable_revision(dep))
            return view | {"deployment": dep["id"], "incompatible": incompatible}, False
        number = latest["revision"] + 1
        try:
            with plane.store.engine.begin() as c:
                c.execute(
                    insert(rv).values(
                        deployment_id=dep["id"],
                        revision=number,
                        pipelines=pipelines,
                        egress=egress,
                        content_hash=content,
                        note=req.note,
                        created_at=plane.clock(),
                        created_by=who.actor,
                    )
                )
        except IntegrityError:
            continue  # a concurrent update took this number: look again
        break
    else:
        raise ApiError(503, "busy", "deployment keeps changing; retry")
    plane.audit(
        who.actor,
        "deployment.revise",
        f"deployment:{dep['id']}",
        digest(req.model_dump()),
        f"ok revision={number}",
    )
    if req.promote:
        with plane.store.engine.begin() as c:
            # A rollout started since the check above: the revision stays, unpromoted.
            # The deployment's row is locked first: a starting rollout locks it too
            # (`RolloutStore.insert`), so either this sees that rollout or it sees
            # the promote and refuses to start.
            d = t.deployments
            c.execute(
                update(d).where(d.c.id == dep["id"]).values(stable_revision=d.c.stable_revision)
            )
            _refuse_promote_during_rollout(c, dep, added=number)
            promote_in(c, dep["id"], number, pipelines)
        plane.audit(
            who.actor,
            "deployment.promote",
            f"deployment:{dep['id']}",
            digest([dep["id"], number]),
            f"ok revision={number}",
        )
        plane.recompute_all()
    fresh = plane.store.get_deployment(dep["id"]) or dep
    row = {
        "revision": number,
        "note": req.note,
        "created_at": plane.clock(),
        "created_by": who.actor,
        "pipelines": pipelines,
        "egress": egress,
    }
    view = _view(row, stable_revision(fresh))
    return view | {"deployment": dep["id"], "incompatible": incompatible}, True


def _refuse_promote_during_rollout(
    c: Connection, dep: Mapping[str, Any], added: int | None = None
) -> None:
    """409 while a rollout of the deployment is active.

    Such a rollout would undo the promote: it keeps moving its devices to its own
    revision and, once complete, makes that revision the stable one.
    """
    r = t.rollouts
    row = c.execute(
        select(r.c.id, r.c.from_revision, r.c.to_revision, r.c.state).where(
            r.c.active_key == dep["id"]
        )
    ).first()
    if row is None:
        return
    kept = f"revision {added} was added but not promoted; " if added is not None else ""
    raise ApiError(
        409,
        "rollout_active",
        f"deployment {dep['name']} has rollout {row.id} {row.state} (revision "
        f"{row.from_revision} -> {row.to_revision}), which would undo a promote when it "
        f"completes; {kept}abort it first (rollout abort {row.id}), or move the devices "
        "with a rollout after it",
    )


def promote_in(c: Connection, deployment_id: str, revision: int, pipelines: Any) -> None:
    """Make `revision` the stable one, inside the caller's transaction."""
    d, rv = t.deployments, t.deployment_revisions
    row = c.execute(select(d.c.selector, d.c.priority).where(d.c.id == deployment_id)).first()
    if row is None:
        return
    egress = c.execute(
        select(rv.c.egress).where(rv.c.deployment_id == deployment_id, rv.c.revision == revision)
    ).scalar()
    c.execute(
        update(d)
        .where(d.c.id == deployment_id)
        .values(
            pipelines=pipelines,
            egress=egress,
            stable_revision=revision,
            content_hash=deployment_content_hash(row.selector, row.priority, pipelines, egress),
        )
    )
    a = t.rollout_assignments
    c.execute(delete(a).where(a.c.deployment_id == deployment_id, a.c.revision == revision))


def overrides_for(plane: ControlPlane, device_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Device -> {deployment id: assigned revision}, for devices a rollout moved."""
    a = t.rollout_assignments
    out: dict[str, dict[str, int]] = {}
    ids = list(device_ids)
    with plane.store.engine.connect() as c:
        for i in range(0, len(ids), 500):
            rows = c.execute(
                select(a.c.device_id, a.c.deployment_id, a.c.revision).where(
                    a.c.device_id.in_(ids[i : i + 500])
                )
            )
            for r in rows:
                out.setdefault(r.device_id, {})[r.deployment_id] = int(r.revision)
    return out


def apply_assignments(
    plane: ControlPlane,
    deployments: Sequence[Mapping[str, Any]],
    assigned: Mapping[str, int] | None,
) -> list[Mapping[str, Any]]:
    """The deployments one device sees: assigned revisions replace the stable pipelines."""
    if not assigned:
        return list(deployments)
    out: list[Mapping[str, Any]] = []
    for dep in deployments:
        revision = assigned.get(dep["id"])
        if revision is None or revision == stable_revision(dep):
            out.append(dep)
            continue
        try:
            pipelines = revision_pipelines(plane, dep["id"], revision)
            egress = revision_egress(plane, dep["id"], revision)
        except ApiError:
            out.append(dep)  # revision gone: the stable one is the safe answer
            continue
        out.append({**dep, "pipelines": pipelines, "egress": egress})
    return out
