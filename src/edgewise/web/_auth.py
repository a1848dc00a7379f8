"""Console sign-in: an operator token in an HttpOnly cookie, checked like a bearer token.

The cookie holds the same secret the API takes as `Authorization: Bearer`, so the console
has no second identity system: a revoked token signs the browser out on its next page,
and a viewer token holds exactly the viewer's permissions. The cookie is `HttpOnly`
(page scripts never see the secret) and `SameSite=Strict` (other sites cannot send it);
state-changing forms also require a same-origin `Origin`/`Referer`, which closes the
remaining CSRF hole for browsers that ignore SameSite.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fastapi import Request

from edgewise.control import ApiError, ControlPlane, Permission, Principal
from edgewise.control._rbac import allowed

__all__ = ["COOKIE", "Session", "parse_form", "same_origin", "session_of"]

COOKIE = "edgewise_console"
MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class Session:
    """A signed-in operator."""

    token: str
    principal: Principal

    @property
    def can_act(self) -> bool:
        """Whether rollout and deployment actions are offered (same rule as the API)."""
        return allowed(self.principal.role, Permission.DEPLOY_WRITE)

    @property
    def label(self) -> str:
        """How the header names the operator."""
        scope = f" scope {self.principal.scope}" if self.principal.scope else ""
        return f"{self.principal.name} ({self.principal.role}{scope})"


def session_of(plane: ControlPlane, request: Request) -> Session | None:
    """The operator behind the request's cookie, or None when absent or no longer valid."""
    token = request.cookies.get(COOKIE, "")
    if not token:
        return None
    try:
        principal = plane.authenticate(f"Bearer {token}")
        plane.authorize(principal, Permission.READ)
    except ApiError:
        return None
    return Session(token, principal)


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from a page of this console."""
    host = request.headers.get("host", "")
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    if not source or source == "null":
        return False
    return urlsplit(source).netloc == host


def parse_form(body: bytes) -> dict[str, str]:
    """An url-encoded form (first value of each field); {} when not a sane form."""
    if len(body) > MAX_FORM_BYTES:
        return {}
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in fields.items() if v}
