"""`/api/v1`: the operator API. Every route names the one permission it needs.

`ROUTE_PERMISSIONS` (method, path) -> permission is the RBAC matrix as data; the test suite
walks it for every role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from edgewise.control import _deployments as deps
from edgewise.control import _fleet as fleet
from edgewise.control import _registry as registry
from edgewise.control import _rollouts as rollouts
from edgewise.control._errors import OPERATOR_ERRORS
from edgewise.control._plane import ApiError, ControlPlane, Principal
from edgewise.control._rbac import Permission

__all__ = ["ROUTE_PERMISSIONS", "router"]

_F = TypeVar("_F", bound=Callable[..., Any])

router = APIRouter(prefix="/api/v1", tags=["operator"], responses=OPERATOR_ERRORS)
ROUTE_PERMISSIONS: dict[tuple[str, str], Permission] = {}


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def _need(permission: Permission) -> Callable[[Request], Principal]:
    def dependency(request: Request) -> Principal:
        plane = _plane(request)
        who = plane.authenticate(request.headers.get("authorization"))
        plane.authorize(who, permission)
        request.state.principal = who
        return who

    return dependency


def _principal(request: Request) -> Principal:
    # Route-level dependencies run first and leave the caller here.
    who = getattr(request.state, "principal", None)
    if isinstance(who, Principal):
        return who
    return _plane(request).authenticate(request.headers.get("authorization"))


def _route(method: str, path: str, permission: Permission, **kwargs: Any) -> Callable[[_F], _F]:
    ROUTE_PERMISSIONS[(method, "/api/v1" + path)] = permission
    return router.api_route(
        path, methods=[method], dependencies=[Depends(_need(permission))], **kwargs
    )


Who = Annotated[Principal, Depends(_principal)]


def _fleet_wide(who: Principal, what: str) -> None:
    """Refuse a scoped token something that acts on, or shows, every site at once."""
    if who.scope is not None:
        raise ApiError(403, "out_of_scope", f"{what} spans the whole fleet: use an unscoped token")


class TokenRequest(BaseModel):
    """`POST /api/v1/tokens`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: str
    scope: str | None = Field(default=None, max_length=1000)


class KeyRequest(BaseModel):
    """`POST /api/v1/publisher-keys`."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=1, max_length=100)
    name: str = Field(default="", max_length=200)


class LabelRequest(BaseModel):
    """`POST /api/v1/devices/{id}/labels`."""

    model_config = ConfigDict(extra="forbid")

    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list, max_length=100)


# ------------------------------------------------------------------- tokens
@_route("GET", "/whoami", Permission.READ)
def whoami(who: Who) -> dict[str, Any]:
    """The calling token's identity."""
    return {
        "id": who.token_id,
        "name": who.name,
        "role": who.role,
        "scope": str(who.scope) if who.scope else None,
    }


@_route("POST", "/tokens", Permission.TOKENS, status_code=201)
def create_token(request: Request, body: TokenRequest, who: Who) -> dict[str, Any]:
    """Create an operator token; the secret is shown once."""
    plane = _plane(request)
    row, secret = plane.create_token(body.name, body.role, body.scope, who.actor, who.scope)
    return {**row, "token": secret}


@_route("GET", "/tokens", Permission.TOKENS)
def list_tokens(request: Request, who: Who) -> list[dict[str, Any]]:
    """Operator tokens (never their secrets); a scoped admin sees those inside its scope."""
    return _plane(request).list_tokens(who.scope)


@_route("DELETE", "/tokens/{token_id}", Permission.TOKENS)
def revoke_token(request: Request, token_id: str, who: Who) -> dict[str, Any]:
    """Revoke a token (a scoped admin: one scoped inside its own scope)."""
    _plane(request).revoke_token(token_id, who.actor, who.scope)
    return {"id": token_id, "revoked": True}


# ----------------------------------------------------------- publisher keys
@_route("POST", "/publisher-keys", Permission.KEYS, status_code=201)
def trust_key(request: Request, body: KeyRequest, who: Who) -> dict[str, Any]:
    """Trust a publisher key (base64 raw Ed25519 public key)."""
    return _plane(request).trust_publisher_key(body.public_key, body.name, who.actor)


@_route("GET", "/publisher-keys", Permission.READ)
def list_keys(request: Request) -> list[dict[str, Any]]:
    """Trusted publisher keys."""
    return _plane(request).store.list_publisher_keys()


class TrustRootRequest(BaseModel):
    """`POST /api/v1/trust-root`: a signed trust root (`edgewise trust sign`)."""

    model_config = ConfigDict(extra="forbid")

    document: dict[str, Any]
    signatures: list[dict[str, Any]] = Field(max_length=64)


@_route("POST", "/trust-root", Permission.KEYS, status_code=201)
async def install_trust_root(request: Request, body: TrustRootRequest, who: Who) -> JSONResponse:
    """Make a signed trust root the fleet's: its publishers are the keys devices trust.

    201 with the trust root when it is a new version (devices get it with their next
    desired document); 200 when it is the version already held.
    """
    from edgewise.control._recompute import reconcile_all

    plane = _plane(request)
    # As received (a dump re-serialises, and pydantic's depth limit made a deep document
    # a 500): `verify_trust_root` refuses what is not a trust root, with the reason.
    signed = {"document": body.document, "signatures": body.signatures}
    view, created = await to_thread.run_sync(lambda: plane.install_trust_root(signed, who.actor))
    if created:
        await to_thread.run_sync(lambda: reconcile_all(plane))
    return JSONResponse(view, status_code=201 if created else 200)


@_route("GET", "/trust-root", Permission.READ)
def trust_root(request: Request) -> dict[str, Any]:
    """The fleet's trust root (version 0: none yet) and devices by the version they hold."""
    return _plane(request).trust_root_view()


# ------------------------------------------------------------------ devices
@_route("POST", "/enroll-tokens", Permission.DEVICES_WRITE, status_code=201)
def create_enroll_token(
    request: Request, body: fleet.EnrollTokenRequest, who: Who
) -> dict[str, Any]:
    """Mint an enrollment token (labels to apply, expiry, max uses)."""
    return fleet.create_enroll_token(_plane(request), body, who)


@_route("GET", "/devices", Permission.READ)
def list_devices(
    request: Request,
    who: Who,
    selector: Annotated[str | None, Query(max_length=2000)] = None,
    online: bool | None = None,
) -> list[dict[str, Any]]:
    """Devices, filtered by label selector and online state."""
    return fleet.list_devices(_plane(request), who, selector, online)


@_route("GET", "/devices/{device_id}", Permission.READ)
def show_device(request: Request, device_id: str, who: Who) -> dict[str, Any]:
    """One device with capabilities, desired state and per-pipeline timeline."""
    plane = _plane(request)
    plane.store.touch_last_seen(plane.seen.take())
    return fleet.device_view(plane, fleet.visible_device(plane, who, device_id), detail=True)


@_route("POST", "/devices/{device_id}/labels", Permission.DEVICES_WRITE)
def label_device(request: Request, device_id: str, body: LabelRequest, who: Who) -> dict[str, Any]:
    """Set and remove labels; desired state follows."""
    return fleet.set_labels(_plane(request), who, device_id, body.set, body.remove)


@_route("POST", "/devices/{device_id}/decommission", Permission.DEVICES_WRITE)
def decommission_device(request: Request, device_id: str, who: Who) -> dict[str, Any]:
    """Revoke the device key."""
    return fleet.decommission(_plane(request), who, device_id)


# ------------------------------------------------------------------- models
@_route(
    "POST",
    "/models",
    Permission.MODELS_WRITE,
    status_code=201,
    responses={200: {"description": "already registered (same content)"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def push_model(request: Request, who: Who) -> JSONResponse:
    """Push a `.ewb` (raw body): verified, stored by digest, immutable per version."""
    plane = _plane(request)
    path, sha256, size = await registry.receive_upload(plane, request.stream())
    try:
        # An upload may take minutes: a token revoked meanwhile must not still publish.
        who = await to_thread.run_sync(_need(Permission.MODELS_WRITE), request)
    except ApiError:
        path.unlink(missing_ok=True)
        raise
    view, created = await to_thread.run_sync(
        registry.register_bundle, plane, path, sha256, size, who
    )
    return JSONResponse({**view, "created": created}, status_code=201 if created else 200)


@_route("GET", "/models", Permission.READ)
def list_models(request: Request, name: str | None = None) -> list[dict[str, Any]]:
    """Registered model versions."""
    return [registry.model_view(r) for r in _plane(request).store.list_models(name)]


@_route("GET", "/models/{name}/{version}", Permission.READ)
def show_model(request: Request, name: str, version: str) -> dict[str, Any]:
    """One model version with its manifest."""
    row = _plane(request).store.get_model(name, version)
    if row is None:
        raise ApiError(404, "not_found", f"no model {name}@{version}")
    return registry.model_view(row, detail=True)


@_route("POST", "/models/{name}/{version}/yank", Permission.MODELS_WRITE)
def yank_model(request: Request, name: str, version: str, who: Who) -> dict[str, Any]:
    """Yank a version: no deployment, revision or rollout may pin it from now on.

    Devices already running it keep it. `rollouts` names the active rollouts moving
    devices to it: the running ones pause, and resume only once it is unyanked.
    """
    plane = _plane(request)
    _fleet_wide(who, "yanking a model")
    view = registry.set_yanked(plane, name, version, True, who)
    return view | {"rollouts": rollouts.rollouts_pinning(plane, name, version)}


@_route("POST", "/models/{name}/{version}/unyank", Permission.MODELS_WRITE)
def unyank_model(request: Request, name: str, version: str, who: Who) -> dict[str, Any]:
    """Undo a yank: the version may be pinned and rolled out again."""
    _fleet_wide(who, "unyanking a model")
    return registry.set_yanked(_plane(request), name, version, False, who)


# -------------------------------------------------------------- deployments
@_route(
    "POST",
    "/deployments",
    Permission.DEPLOY_WRITE,
    status_code=201,
    responses={200: {"description": "identical deployment already exists"}},
)
def create_deployment(request: Request, body: deps.DeploymentRequest, who: Who) -> JSONResponse:
    """Create a deployment (pre-flight first; identical re-create is a no-op)."""
    view, created = deps.create_deployment(_plane(request), body, who)
    return JSONResponse(view, status_code=201 if created else 200)


@_route("POST", "/deployments/dry-run", Permission.READ)
def dry_run(request: Request, body: deps.DeploymentRequest, who: Who) -> dict[str, Any]:
    """Pre-flight only: matching, incompatible devices and conflicts."""
    return deps.dry_run(_plane(request), body, who)


@_route("POST", "/deployments/diff", Permission.READ)
def diff(request: Request, body: deps.DeploymentRequest, who: Who) -> dict[str, Any]:
    """How each device's pipelines would change."""
    return deps.diff_deployment(_plane(request), body, who)


@_route("GET", "/deployments", Permission.READ)
def list_deployments(request: Request, who: Who) -> list[dict[str, Any]]:
    """Deployments that can reach the caller's devices, oldest first."""
    rows = _plane(request).store.list_deployments()
    return [deps.deployment_view(r) for r in rows if deps.visible_to(who, r)]


@_route("GET", "/deployments/{ref}", Permission.READ)
def show_deployment(request: Request, ref: str, who: Who) -> dict[str, Any]:
    """One deployment by id or name."""
    return deps.deployment_view(deps.visible_deployment(_plane(request), who, ref))


@_route("DELETE", "/deployments/{ref}", Permission.DEPLOY_WRITE)
def delete_deployment(request: Request, ref: str, who: Who) -> dict[str, Any]:
    """Delete a deployment; devices fall back to the next layer."""
    deps.delete_deployment(_plane(request), ref, who)
    return {"deleted": ref}


# -------------------------------------------------------------------- audit
@_route("GET", "/audit", Permission.READ)
def list_audit(
    request: Request,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # a database integer
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[dict[str, Any]]:
    """Audit records in chain order (the whole fleet's: an unscoped token reads them)."""
    _fleet_wide(_principal(request), "reading the audit chain")
    return _plane(request).audit_records(after, limit)


@_route("GET", "/audit/verify", Permission.READ)
def verify_audit(request: Request) -> dict[str, Any]:
    """Check the chain; names the first broken record."""
    return _plane(request).verify_audit()
