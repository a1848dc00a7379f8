"""A stand-in `/api/v1/rollouts`, used only while the control plane has none.

It runs the real pure rollout engine (`edgewise.control.rollout`) over the real enrolled
devices and answers with `Rollout.to_dict()`; commands check the real RBAC
(`deploy.write`). Devices "report" success one per read so that progress is visible
step by step. When the rollout engineer's API is mounted, the tests use it instead.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from edgewise.control import ApiError, ControlPlane, Permission
from edgewise.control.rollout import (
    DeviceReport,
    GateSpec,
    Observations,
    ReportStatus,
    Rollout,
    RolloutSpec,
    abort,
    approve,
    create_rollout,
    pause,
    resume,
    step,
)

router = APIRouter(prefix="/api/v1/rollouts")
_lock = threading.Lock()
_rollouts: dict[str, Rollout] = {}
_reported: dict[str, set[str]] = {}
_ids = itertools.count(1)


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def _who(request: Request, permission: Permission) -> str:
    plane = _plane(request)
    who = plane.authenticate(request.headers.get("authorization"))
    plane.authorize(who, permission)
    return who.actor


def _advance(rollout: Rollout) -> Rollout:
    """One device reports healthy per read: progress moves in visible steps."""
    done = _reported.setdefault(rollout.id, set())
    waiting = sorted(
        d for d, s in rollout.devices.items() if s.notified_at is not None and d not in done
    )
    if waiting and rollout.state.value == "running":
        done.add(waiting[0])
    reports = {d: DeviceReport(ReportStatus.HEALTHY, "health gate passed") for d in done}
    new, _ = step(rollout, Observations(reports=reports), time.time())
    return new


@router.post("", status_code=201)
async def start(request: Request) -> JSONResponse:
    actor = _who(request, Permission.DEPLOY_WRITE)
    body: dict[str, Any] = await request.json()
    plane = _plane(request)
    devices = [(r["id"], r["labels"]) for r in plane.store.list_devices()]
    spec = RolloutSpec(
        canary=body.get("canary", 2),
        waves=tuple(body.get("waves", (50.0, 100.0))),
        gates=GateSpec(success_pct=80.0, error_pct=20.0),
    )
    with _lock:
        rid = f"ro-{next(_ids)}"
        rollout = create_rollout(
            rid, body["deployment"], 1, body.get("to_revision", 2), devices, spec, time.time()
        )
        _rollouts[rid] = rollout
    del actor
    return JSONResponse(rollout.to_dict(), status_code=201)


@router.get("")
def list_rollouts(request: Request) -> list[dict[str, Any]]:
    _who(request, Permission.READ)
    with _lock:
        return [r.to_dict() for r in _rollouts.values()]


@router.get("/{rollout_id}")
def show(request: Request, rollout_id: str) -> dict[str, Any]:
    _who(request, Permission.READ)
    with _lock:
        rollout = _rollouts.get(rollout_id)
        if rollout is None:
            raise ApiError(404, "not_found", f"no rollout {rollout_id}")
        rollout = _rollouts[rollout_id] = _advance(rollout)
        return rollout.to_dict()


@router.post("/{rollout_id}/{command}")
def command(request: Request, rollout_id: str, command: str) -> dict[str, Any]:
    actor = _who(request, Permission.DEPLOY_WRITE)
    commands = {"pause": pause, "resume": resume, "abort": abort, "approve": approve}
    if command not in commands:
        raise ApiError(404, "not_found", f"no command {command}")
    with _lock:
        rollout = _rollouts.get(rollout_id)
        if rollout is None:
            raise ApiError(404, "not_found", f"no rollout {rollout_id}")
        try:
            rollout, _ = commands[command](rollout, time.time(), actor)
        except ValueError as exc:
            raise ApiError(409, "illegal_transition", str(exc)) from None
        _rollouts[rollout_id] = rollout
        return rollout.to_dict()
