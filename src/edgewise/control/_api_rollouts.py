"""`/api/v1/rollouts` and `/api/v1/deployments/{ref}/revisions`: staged rollouts over HTTP.

Operators and admins act (deploy.write), viewers read; every route is scope-checked
through the deployment's selector, and registers its permission in
`ROUTE_PERMISSIONS` like every other operator route. A deployment (or rollout) the
caller's scope cannot see answers 404 `not_found` whatever the route, as an unknown one
does; 403 `out_of_scope` is kept for one it sees but may not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from edgewise.control import _deployments as deployments
from edgewise.control import _revisions as revisions
from edgewise.control import _rollouts as rollouts
from edgewise.control._api_admin import ROUTE_PERMISSIONS, Who, _need
from edgewise.control._errors import OPERATOR_ERRORS
from edgewise.control._plane import ControlPlane, Principal
from edgewise.control._rbac import Permission

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["rollouts"], responses=OPERATOR_ERRORS)


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


_F = TypeVar("_F", bound=Callable[..., Any])


def _route(method: str, path: str, permission: Permission, **kwargs: Any) -> Callable[[_F], _F]:
    ROUTE_PERMISSIONS[(method, "/api/v1" + path)] = permission
    return router.api_route(
        path, methods=[method], dependencies=[Depends(_need(permission))], **kwargs
    )


def _visible(plane: ControlPlane, who: Principal, ref: str) -> None:
    """Answer 404 for a deployment beyond the caller's sight, as for an unknown one.

    Acting on a deployment needs its selector inside the caller's scope (403
    `out_of_scope` otherwise), but only once the caller may see it: another site's
    deployment answers exactly as a name nobody created, so scope does not leak names.
    """
    deployments.visible_deployment(plane, who, ref)


# -------------------------------------------------------------- revisions
@_route(
    "POST",
    "/deployments/{ref}/revisions",
    Permission.DEPLOY_WRITE,
    status_code=201,
    responses={200: {"description": "identical to the latest revision: nothing added"}},
)
async def create_revision(
    request: Request, ref: str, body: revisions.RevisionRequest, who: Who
) -> JSONResponse:
    """Add a revision to a deployment (stable unchanged unless `promote`)."""
    plane = _plane(request)
    await to_thread.run_sync(_visible, plane, who, ref)
    view, created = await to_thread.run_sync(revisions.create_revision, plane, ref, body, who)
    return JSONResponse({**view, "created": created}, status_code=201 if created else 200)


@_route("GET", "/deployments/{ref}/revisions", Permission.READ)
def list_revisions(request: Request, ref: str, who: Who) -> dict[str, Any]:
    """A deployment's revisions, oldest first, and which one is stable."""
    plane = _plane(request)
    _visible(plane, who, ref)
    return revisions.list_revisions(plane, ref)


# --------------------------------------------------------------- rollouts
@_route("POST", "/rollouts", Permission.DEPLOY_WRITE, status_code=201)
def start_rollout(request: Request, body: rollouts.RolloutRequest, who: Who) -> dict[str, Any]:
    """Start a rollout of a deployment to a revision."""
    plane = _plane(request)
    _visible(plane, who, body.deployment)
    return rollouts.start_rollout(plane, body, who)


@_route("GET", "/rollouts", Permission.READ)
def list_rollouts(
    request: Request,
    who: Who,
    deployment: Annotated[str | None, Query(max_length=200)] = None,
    active: bool | None = None,
) -> list[dict[str, Any]]:
    """Rollouts, newest first."""
    plane = _plane(request)
    if deployment is not None:
        _visible(plane, who, deployment)
    return rollouts.list_rollouts(plane, who, deployment, active)


@_route("GET", "/rollouts/{rollout_id}", Permission.READ)
def get_rollout(
    request: Request,
    rollout_id: str,
    who: Who,
    devices: Annotated[str | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    """Phases, gates, devices by state (`?devices=all` or a state lists them)."""
    return rollouts.get_rollout(_plane(request), rollout_id, who, devices)


@_route("GET", "/rollouts/{rollout_id}/devices/{device_id}", Permission.READ)
def rollout_device(request: Request, rollout_id: str, device_id: str, who: Who) -> dict[str, Any]:
    """Why one device is where it is."""
    return rollouts.rollout_device(_plane(request), rollout_id, device_id, who)


@_route("POST", "/rollouts/{rollout_id}/pause", Permission.DEPLOY_WRITE)
def pause_rollout(request: Request, rollout_id: str, who: Who) -> dict[str, Any]:
    """Stop notifying devices until resumed (audited)."""
    return rollouts.rollout_command(_plane(request), rollout_id, "pause", who)


@_route("POST", "/rollouts/{rollout_id}/resume", Permission.DEPLOY_WRITE)
def resume_rollout(request: Request, rollout_id: str, who: Who) -> dict[str, Any]:
    """Carry on; a breached phase counts as passed (operator override; audited)."""
    return rollouts.rollout_command(_plane(request), rollout_id, "resume", who)


@_route("POST", "/rollouts/{rollout_id}/approve", Permission.DEPLOY_WRITE)
def approve_rollout(request: Request, rollout_id: str, who: Who) -> dict[str, Any]:
    """Let the next phase start (audited)."""
    return rollouts.rollout_command(_plane(request), rollout_id, "approve", who)


@_route("POST", "/rollouts/{rollout_id}/abort", Permission.DEPLOY_WRITE)
def abort_rollout(request: Request, rollout_id: str, who: Who) -> dict[str, Any]:
    """Stop for good; moved devices go back to the old revision (audited)."""
    return rollouts.rollout_command(_plane(request), rollout_id, "abort", who)


@_route("POST", "/rollouts/{rollout_id}/rollback", Permission.DEPLOY_WRITE)
def rollback_rollout(request: Request, rollout_id: str, who: Who) -> dict[str, Any]:
    """Roll back by hand: moved devices go back (audited)."""
    return rollouts.rollout_command(_plane(request), rollout_id, "rollback", who)
