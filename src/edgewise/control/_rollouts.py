"""Rollout operations behind `/api/v1/rollouts`: start, operator commands, reads.

Start takes the snapshot (the active devices the deployment's selector matches now: later
enrollments stay on the stable revision), plans the phases with the pure engine and
stores the rollout with its audit record. Commands (pause, resume, approve, abort,
rollback) run the engine's pure command and commit it like a driver step, audited under
the operator's name; the driver then carries on.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from edgewise.control._fleet import device_views
from edgewise.control._plane import ApiError, ControlPlane, Principal, digest
from edgewise.control._preflight import device_reasons, vocabulary_reasons
from edgewise.control._rbac import selector_in_scope
from edgewise.control._recompute import recompute_devices, recompute_selector
from edgewise.control._revisions import pinned_refs, revision_pipelines, stable_revision
from edgewise.control._rollout_store import (
    RolloutStore,
    StepLost,
    UnreadableRollout,
    read_rollout,
    remember_parsed,
)
from edgewise.control._rollout_views import (
    device_why,
    rollout_summary,
    rollout_view,
    unreadable_summary,
)
from edgewise.control._selector import parse_selector
from edgewise.control.rollout import (
    Action,
    IllegalTransition,
    NotifyDevices,
    RevertDevices,
    Rollout,
    RolloutSpec,
    SetStableRevision,
    abort,
    approve,
    create_rollout,
    pause,
    resume,
    rollback,
)
from edgewise.protocol import spec_terms

__all__ = [
    "COMMANDS",
    "RolloutRequest",
    "apply_moves",
    "get_rollout",
    "list_rollouts",
    "rollout_command",
    "rollout_device",
    "rollouts_pinning",
    "start_rollout",
    "yanked_pins",
]

log = logging.getLogger("edgewise.control.rollouts")

Command = Callable[[Rollout, float, str], tuple[Rollout, list[Action]]]
COMMANDS: dict[str, Command] = {
    "pause": pause,
    "resume": resume,
    "approve": approve,
    "abort": abort,
    "rollback": rollback,
}


class RolloutRequest(BaseModel):
    """`POST /api/v1/rollouts`."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(min_length=1, max_length=200)
    to_revision: int = Field(ge=1)
    spec: dict[str, Any] = Field(default_factory=dict)
    # Start though some targeted devices reported they cannot run the new revision (their
    # agents do not know a term of its specs, or they lack what its models require):
    # those devices will refuse it and be held back.
    force: bool = False


def _store(plane: ControlPlane) -> RolloutStore:
    return RolloutStore(plane)


def _wake(plane: ControlPlane) -> None:
    wake = getattr(plane, "rollout_wake", None)
    if wake is not None:
        wake()


def _deployment(plane: ControlPlane, ref: str, who: Principal) -> dict[str, Any]:
    dep = plane.store.get_deployment(ref)
    if dep is None:
        raise ApiError(404, "not_found", f"no deployment {ref}")
    if not selector_in_scope(who.scope, dep["selector"]):
        raise ApiError(403, "out_of_scope", "deployment reaches beyond the token's scope")
    return dep


def _pinned_manifests(plane: ControlPlane, pipelines: dict[str, Any]) -> list[dict[str, Any]]:
    """The registry's manifests of the models a revision's pinned pipelines use."""
    rows = (plane.store.get_model(name, version) for name, version in pinned_refs(pipelines))
    return [r["manifest"] for r in rows if r is not None and isinstance(r.get("manifest"), dict)]


def yanked_pins(plane: ControlPlane, deployment_id: str, revision: int) -> list[str]:
    """The yanked models (`name@version`) a deployment's revision pins."""
    pipelines = revision_pipelines(plane, deployment_id, revision)
    return plane.store.yanked_among(pinned_refs(pipelines))


def _refuse_yanked(plane: ControlPlane, deployment_id: str, revision: int, then: str) -> None:
    """409 `yanked` when the revision pins a yanked model: no rollout spreads one."""
    yanked = yanked_pins(plane, deployment_id, revision)
    if yanked:
        which = "it is" if len(yanked) == 1 else "they are"
        raise ApiError(
            409,
            "yanked",
            f"revision {revision} pins {', '.join(yanked)} and {which} yanked: a rollout "
            f"moves no device to a yanked model; unyank it (model unyank {yanked[0]}) "
            f"{then}",
        )


def rollouts_pinning(plane: ControlPlane, name: str, version: str) -> list[str]:
    """Active rollouts moving devices to a revision that pins this model version.

    Wakes the driver, which pauses the running ones (see `RolloutDriver.step_one`).
    """
    found = []
    for row in _store(plane).list_rows(None, True):
        try:
            pipelines = revision_pipelines(plane, row["deployment_id"], int(row["to_revision"]))
        except ApiError:  # its deployment or revision is gone: its driver fails it
            continue
        if (name, version) in pinned_refs(pipelines):
            found.append(str(row["id"]))
    if found:
        _wake(plane)
    return found


def _refuse_devices_that_cannot_run(
    plane: ControlPlane, pipelines: dict[str, Any], devices: list[dict[str, Any]], revision: int
) -> None:
    """409 when targeted devices reported they cannot run the revision.

    Their agents do not know terms its specs use (`agents_too_old`), or the devices lack
    the runtime, memory, disk, accelerator or arch its models' manifests require
    (`devices_cannot_run`), as pre-flight reads them. Such a device would refuse the
    revision and stay behind, held back by the rollout (not counted as failed); the
    operator decides first (force, upgrade, or narrow the selector).
    """
    terms = {
        name: spec_terms(p.get("spec") or {})
        for name, p in pipelines.items()
        if isinstance(p, dict)
    }
    manifests = _pinned_manifests(plane, pipelines)
    views = {v.id: v for v in device_views(plane, devices)}
    cannot = {
        dev: why for dev, view in views.items() if (why := device_reasons(view, manifests, terms))
    }
    if not cannot:
        return
    first = min(cannot)
    force = "or start it anyway with force (rollout start --force)"
    if all(why == vocabulary_reasons(views[d].vocabulary, terms) for d, why in cannot.items()):
        raise ApiError(
            409,
            "agents_too_old",
            f"{len(cannot)} of {len(devices)} targeted devices run agents that cannot run "
            f"revision {revision}: {first}: {cannot[first][0]}; upgrade those agents, narrow "
            f"the deployment's selector, {force}",
        )
    raise ApiError(
        409,
        "devices_cannot_run",
        f"{len(cannot)} of {len(devices)} targeted devices cannot run revision {revision}: "
        f"{first}: {'; '.join(cannot[first])}; narrow the deployment's selector, upgrade "
        f"those devices, {force}: they would be held back",
    )


def start_rollout(plane: ControlPlane, req: RolloutRequest, who: Principal) -> dict[str, Any]:
    """Snapshot the target, plan the phases, store the rollout (the driver runs it)."""
    dep = _deployment(plane, req.deployment, who)
    try:
        spec = RolloutSpec.from_dict(req.spec)
    except ValueError as exc:
        raise ApiError(422, "invalid_spec", str(exc)) from None
    stable = stable_revision(dep)
    if req.to_revision == stable:
        raise ApiError(409, "already_stable", f"revision {stable} is already the stable one")
    pipelines = revision_pipelines(plane, dep["id"], req.to_revision)  # 404 when none
    _refuse_yanked(plane, dep["id"], req.to_revision, "or revise the deployment without it")
    selector = parse_selector(dep["selector"])
    targeted = [
        row
        for row in plane.store.list_devices()
        if row["status"] == "active" and selector.matches(row["labels"])
    ]
    if not req.force:
        _refuse_devices_that_cannot_run(plane, pipelines, targeted, req.to_revision)
    snapshot = [(row["id"], dict(row["labels"])) for row in targeted]
    rollout_id = f"ro-{secrets.token_hex(6)}"
    now = plane.clock()
    seed = int(hashlib.sha256(rollout_id.encode()).hexdigest()[:8], 16)
    try:
        rollout = create_rollout(
            rollout_id, dep["id"], stable, req.to_revision, snapshot, spec, now, seed=seed
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_spec", str(exc)) from None
    row = {
        "id": rollout_id,
        "deployment_id": dep["id"],
        "active_key": dep["id"],
        "from_revision": stable,
        "to_revision": req.to_revision,
        "state": rollout.state.value,
        "document": rollout.to_dict(),
        "version": 0,
        "wake_at": None,
        "lease_owner": None,
        "lease_expires": None,
        "created_at": now,
        "created_by": who.actor,
        "updated_at": now,
    }
    audit = (
        who.actor,
        "rollout.start",
        f"rollout:{rollout_id}",
        digest(req.model_dump()),
        f"ok deployment={dep['id']} {stable}->{req.to_revision} devices={len(snapshot)}",
    )
    try:
        _store(plane).insert(row, audit)
    except IntegrityError:
        raise ApiError(
            409, "conflict", f"deployment {dep['name']} already has an active rollout"
        ) from None
    _wake(plane)
    return rollout_view(row, rollout)


def _load(plane: ControlPlane, rollout_id: str, who: Principal) -> tuple[dict[str, Any], Rollout]:
    store = _store(plane)
    row = store.head(rollout_id)
    if row is None:
        raise ApiError(404, "not_found", f"no rollout {rollout_id}")
    dep = plane.store.get_deployment(row["deployment_id"])
    if who.scope is not None and (dep is None or not selector_in_scope(who.scope, dep["selector"])):
        raise ApiError(404, "not_found", f"no rollout {rollout_id}")  # scope does not leak ids
    return row, _parsed(plane, store, rollout_id, int(row["version"]))


def _parsed(plane: ControlPlane, store: RolloutStore, rollout_id: str, version: int) -> Rollout:
    """The rollout's value at `version`, parsed once per version.

    `rollout status --watch` on a 10,000-device rollout asks every second; reading and
    parsing its document each time cost the control plane ~0.1 s of CPU per view.
    """
    cache: dict[str, tuple[int, Rollout]] = plane.parsed_rollouts
    hit = cache.get(rollout_id)
    if hit is not None and hit[0] == version:
        return hit[1]
    row = store.get(rollout_id)
    if row is None:
        raise ApiError(404, "not_found", f"no rollout {rollout_id}")
    try:
        rollout = read_rollout(row)
    except UnreadableRollout as exc:
        raise ApiError(503, "rollout_unreadable", str(exc)) from None
    remember_parsed(cache, rollout_id, int(row["version"]), rollout)
    return rollout


def get_rollout(
    plane: ControlPlane, rollout_id: str, who: Principal, devices: str | None = None
) -> dict[str, Any]:
    """The status view of one rollout."""
    row, rollout = _load(plane, rollout_id, who)
    return rollout_view(row, rollout, devices)


def rollout_device(
    plane: ControlPlane, rollout_id: str, device_id: str, who: Principal
) -> dict[str, Any]:
    """Why one device is where it is."""
    _, rollout = _load(plane, rollout_id, who)
    why = device_why(rollout, device_id)
    if why is None:
        raise ApiError(
            404, "not_in_rollout", f"device {device_id} is not in rollout {rollout_id}'s snapshot"
        )
    return why


def list_rollouts(
    plane: ControlPlane, who: Principal, deployment: str | None, active: bool | None
) -> list[dict[str, Any]]:
    """Rollouts the caller may see, newest first."""
    dep_id = None
    if deployment is not None:
        dep_id = _deployment(plane, deployment, who)["id"]
    out = []
    for row in _store(plane).list_rows(dep_id, active):
        dep = plane.store.get_deployment(row["deployment_id"])
        if who.scope is not None and (
            dep is None or not selector_in_scope(who.scope, dep["selector"])
        ):
            continue
        try:
            out.append(rollout_summary(row, read_rollout(row)))
        except UnreadableRollout as exc:  # listed from its row: one row must not hide all
            out.append(unreadable_summary(row, str(exc)))
    return out


def apply_moves(plane: ControlPlane, rollout: Rollout, actions: list[Action]) -> None:
    """After a commit: recompute the desired state of every device the actions moved."""
    moved = [d for a in actions if isinstance(a, NotifyDevices | RevertDevices) for d in a.ids]
    if moved:
        recompute_devices(plane, moved)
    if any(isinstance(a, SetStableRevision) for a in actions):
        recompute_selector(plane, rollout.deployment)


def rollout_command(
    plane: ControlPlane, rollout_id: str, name: str, who: Principal
) -> dict[str, Any]:
    """Pause, resume, approve, abort or roll back; audited under the caller's name."""
    command = COMMANDS[name]
    store = _store(plane)
    for _ in range(10):
        row, rollout = _load(plane, rollout_id, who)
        if name in ("resume", "approve"):  # carrying on would move more devices
            _refuse_yanked(
                plane, rollout.deployment, int(rollout.to_revision), "to carry on, or abort"
            )
        now = plane.clock()
        try:
            new, actions = command(rollout, now, who.actor)
        except IllegalTransition as exc:
            raise ApiError(409, "illegal_state", str(exc)) from None
        try:
            store.commit(new, row["version"], actions, now=now, actor=who.actor)
        except StepLost:
            continue  # the driver stepped meanwhile: decide again on the fresh value
        try:
            apply_moves(plane, new, actions)
        except Exception:
            # Committed: the command happened, and an error answer would have the
            # operator retry it into a 409. Only abort and rollback move devices, and
            # they end the rollout: the driver holding its lease writes the documents a
            # finished rollout still owes (`RolloutDriver.settle_finished`).
            log.exception(
                "rollout %s: %s committed; desired documents left to the driver", rollout_id, name
            )
        _wake(plane)
        return rollout_view({**row, "updated_at": now}, new)
    raise ApiError(503, "busy", "rollout keeps changing; retry")
