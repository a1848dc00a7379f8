"""`/api/v1` telemetry routes: fleet health, drift, alert rules and alerts, retention.

The routes join the operator API's RBAC matrix (`ROUTE_PERMISSIONS` of `_api_admin`)
and read the `TelemetryService` the application keeps in `app.state.telemetry`.
A token with a label scope sees the windows of the devices inside its scope only, and
the alerts on them, each naming only its devices inside the scope (`scoped_alert`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError

from edgewise.control._api_admin import ROUTE_PERMISSIONS
from edgewise.control._errors import OPERATOR_ERRORS
from edgewise.control._plane import ApiError, ControlPlane, Principal, digest
from edgewise.control._rbac import Permission, in_scope
from edgewise.control.telemetry._alerts import scoped_alert
from edgewise.control.telemetry._retention import RetentionPolicy
from edgewise.control.telemetry._service import TelemetryService, Visible
from edgewise.protocol import first_problem

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["telemetry"], responses=OPERATOR_ERRORS)

_ALERT_STATES = ("open", "firing", "suppressed", "resolved")


_F = TypeVar("_F", bound=Callable[..., Any])


def _need(permission: Permission) -> Any:
    def dependency(request: Request) -> Principal:
        plane: ControlPlane = request.app.state.plane
        who = plane.authenticate(request.headers.get("authorization"))
        plane.authorize(who, permission)
        return who

    return Depends(dependency)


def _route(method: str, path: str, permission: Permission) -> Callable[[_F], _F]:
    ROUTE_PERMISSIONS[(method, "/api/v1" + path)] = permission
    return router.api_route(path, methods=[method])


def _service(request: Request) -> TelemetryService:
    svc = getattr(request.app.state, "telemetry", None)
    if not isinstance(svc, TelemetryService):
        raise ApiError(503, "unavailable", "telemetry is not enabled on this control plane")
    return svc


def _visible(who: Principal) -> Visible | None:
    scope = who.scope
    if scope is None:
        return None
    return lambda labels: in_scope(scope, dict(labels))


def _in_scope(
    who: Principal, alerts: list[dict[str, Any]], svc: TelemetryService
) -> list[dict[str, Any]]:
    """The alerts a scoped caller may see, each naming only its devices in scope."""
    labels = svc.device_labels()
    visible = {d for d, lbl in labels.items() if in_scope(who.scope, lbl)}
    return [a for r in alerts if (a := scoped_alert(r, visible)) is not None]


def _fleet_wide(who: Principal, what: str) -> None:
    """Refuse a scoped token a change that reaches every site (rules are fleet-wide)."""
    if who.scope is not None:
        raise ApiError(
            403, "out_of_scope", f"{what} reaches every site: use a token without a scope"
        )


def _audit(request: Request, who: Principal, action: str, target: str, data: Any) -> None:
    plane: ControlPlane = request.app.state.plane
    plane.audit(who.actor, action, target, digest(data), "ok")


Reader = Annotated[Principal, _need(Permission.READ)]
Writer = Annotated[Principal, _need(Permission.DEPLOY_WRITE)]
Window = Annotated[float, Query(gt=0, le=90 * 86400, description="seconds back from now")]
By = Annotated[str, Query(max_length=120, description="model, deployment, pipeline, label:<key>")]


@_route("GET", "/fleet/health", Permission.READ)
async def fleet_health(
    request: Request,
    who: Reader,
    by: By = "model",
    window: Window = 3600.0,
) -> list[dict[str, Any]]:
    """Per group: success rate, p50/p95/p99 latency, confidence shift, drift, freshness."""
    svc = _service(request)
    try:
        return await to_thread.run_sync(
            lambda: svc.fleet_health(by=by, window_s=window, visible=_visible(who))
        )
    except ValueError as exc:
        raise ApiError(400, "bad_group", str(exc)) from None


@_route("GET", "/drift", Permission.READ)
async def drift(
    request: Request,
    who: Reader,
    by: By = "model",
    window: Window = 3600.0,
    model: Annotated[str | None, Query(max_length=300)] = None,
) -> list[dict[str, Any]]:
    """Drift per group: merged score on the reference bins, devices drifted."""
    svc = _service(request)
    try:
        return await to_thread.run_sync(
            lambda: svc.drift(by=by, window_s=window, model=model, visible=_visible(who))
        )
    except ValueError as exc:
        raise ApiError(400, "bad_group", str(exc)) from None


@_route("GET", "/alerts", Permission.READ)
async def list_alerts(
    request: Request,
    who: Reader,
    state: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> list[dict[str, Any]]:
    """Alert records, newest first; `state` = open, firing, suppressed or resolved."""
    if state is not None and state not in _ALERT_STATES:
        raise ApiError(400, "bad_state", f"state must be one of {', '.join(_ALERT_STATES)}")
    svc = _service(request)

    def run() -> list[dict[str, Any]]:
        rows = svc.alerts(state, limit)
        return rows if who.scope is None else _in_scope(who, rows, svc)

    return await to_thread.run_sync(run)


@_route("GET", "/alert-rules", Permission.READ)
async def list_rules(request: Request, _who: Reader) -> list[dict[str, Any]]:
    """Every alert rule."""
    svc = _service(request)
    rules = await to_thread.run_sync(svc.rules)
    return [r.model_dump(mode="json") for r in rules]


@_route("PUT", "/alert-rules/{name}", Permission.DEPLOY_WRITE)
async def put_rule(request: Request, name: str, who: Writer) -> dict[str, Any]:
    """Create or replace an alert rule (burn_rate, drift or freshness)."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # nested past the parser's limit is not JSON here
        raise ApiError(400, "bad_json", "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "rule must be a JSON object")
    body.setdefault("name", name)
    if body["name"] != name:
        raise ApiError(422, "invalid_request", "rule name differs from the path")
    _fleet_wide(who, "an alert rule")
    svc = _service(request)
    try:
        stored = await to_thread.run_sync(lambda: svc.put_rule(body, who.actor))
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", first_problem(exc, "body")) from None
    await to_thread.run_sync(_audit, request, who, "alert_rule.put", f"alert_rule:{name}", body)
    return stored


@_route("DELETE", "/alert-rules/{name}", Permission.DEPLOY_WRITE)
async def delete_rule(request: Request, name: str, who: Writer) -> dict[str, Any]:
    """Remove an alert rule."""
    _fleet_wide(who, "an alert rule")
    svc = _service(request)
    if not await to_thread.run_sync(lambda: svc.delete_rule(name)):
        raise ApiError(404, "not_found", f"no alert rule {name!r}")
    await to_thread.run_sync(_audit, request, who, "alert_rule.delete", f"alert_rule:{name}", name)
    return {"name": name, "deleted": True}


@_route("POST", "/alerts/evaluate", Permission.DEPLOY_WRITE)
async def evaluate(request: Request, who: Writer) -> list[dict[str, Any]]:
    """Evaluate the rules now (the background loop does it every interval) and notify."""
    svc = _service(request)
    rollouts = getattr(request.app.state, "active_rollouts", None)

    def run() -> list[dict[str, Any]]:
        changes = svc.evaluate_alerts(active_rollouts=rollouts() if rollouts else ())
        svc.notify(changes)
        done = [c.to_dict() for c in changes]
        _audit(request, who, "alerts.evaluate", "alerts", done)
        return done if who.scope is None else _in_scope(who, done, svc)

    return await to_thread.run_sync(run)


@_route("POST", "/telemetry/retention", Permission.DEPLOY_WRITE)
async def retention(request: Request, who: Writer) -> dict[str, int]:
    """Run the retention and downsampling job now (the background loop runs it hourly)."""
    _fleet_wide(who, "retention")
    _service(request)  # 503 without telemetry
    runtime = request.app.state.telemetry_runtime
    policy = getattr(request.app.state, "retention", None) or RetentionPolicy()
    done: dict[str, int] = await to_thread.run_sync(lambda: runtime.retention_round(policy))
    await to_thread.run_sync(_audit, request, who, "telemetry.retention", "telemetry", done)
    return done
