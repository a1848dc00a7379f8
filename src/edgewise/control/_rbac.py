"""Operator roles and what each may do: the RBAC table is the documentation.

Every `/api/v1` route names one permission; a token's role grants a fixed set of them.
A token may also carry a label-selector scope: it then sees and acts on only the devices
its scope selects, and may only create or delete deployments whose selector lies inside
it (`selector_within`, exact for the Kubernetes grammar).
"""

from __future__ import annotations

import enum

from edgewise.control._selector import Selector, parse_selector, selector_within

__all__ = ["ROLE_PERMISSIONS", "Permission", "Role", "allowed", "in_scope", "selector_in_scope"]


class Role(enum.StrEnum):
    """Operator roles, from most to least powerful."""

    ADMIN = "admin"  # everything, including tokens and trusted publisher keys
    PUBLISHER = "publisher"  # push and yank models
    OPERATOR = "operator"  # deployments, rollouts, devices, enrollment tokens
    VIEWER = "viewer"  # read only


class Permission(enum.StrEnum):
    """What a route needs."""

    READ = "read"
    MODELS_WRITE = "models.write"
    DEPLOY_WRITE = "deploy.write"
    DEVICES_WRITE = "devices.write"
    TOKENS = "tokens"
    KEYS = "keys"


_READ = frozenset({Permission.READ})
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.PUBLISHER: _READ | {Permission.MODELS_WRITE},
    Role.OPERATOR: _READ | {Permission.DEPLOY_WRITE, Permission.DEVICES_WRITE},
    Role.VIEWER: _READ,
}


def allowed(role: str, permission: Permission) -> bool:
    """Whether a role holds a permission (unknown roles hold nothing)."""
    try:
        return permission in ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        return False


def in_scope(scope: Selector | None, labels: dict[str, str]) -> bool:
    """Whether a device with these labels is visible to a token with this scope."""
    return scope is None or scope.matches(labels)


def selector_in_scope(scope: Selector | None, selector: str) -> bool:
    """Whether a deployment selector stays inside a token's scope."""
    if scope is None:
        return True
    return selector_within(parse_selector(selector), scope)
