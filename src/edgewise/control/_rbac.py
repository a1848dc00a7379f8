"""Operator roles and what each may do: the RBAC table is the documentation.

Every `/api/v1` route names one permission; a token's role grants a fixed set of them.
A token may also carry a label-selector scope: it then sees and acts on only the devices
its scope selects, and may only create or delete deployments whose selector lies inside
it (`selector_within`, exact for the Kubernetes grammar).

What a scoped token may *see* is wider than what it may *change*: a deployment is
visible when it can reach some device inside the scope (`selector_overlaps_scope`:
the fleet-wide base layer is, another site's deployment is not), and a token it mints
must be scoped inside its own (`scope_within`). Fleet-wide state (publisher keys, the
trust root, yanks, the whole audit chain) needs an unscoped token (`FLEET_WIDE`).
"""

from __future__ import annotations

import enum

from edgewise.control._selector import (
    Operator,
    Requirement,
    Selector,
    parse_selector,
    selector_within,
)

__all__ = [
    "FLEET_WIDE",
    "ROLE_PERMISSIONS",
    "Permission",
    "Role",
    "allowed",
    "in_scope",
    "labels_pin_scope",
    "scope_within",
    "selector_in_scope",
    "selector_overlaps_scope",
]


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

# Permissions whose every use changes the whole fleet: a scoped token never holds them.
FLEET_WIDE = frozenset({Permission.KEYS})


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


def scope_within(inner: Selector | None, outer: Selector | None) -> bool:
    """Whether a token scoped to `inner` sees nothing a token scoped to `outer` does not.

    None is the unscoped token (the whole fleet): only an unscoped token may mint one.
    """
    if outer is None:
        return True
    return inner is not None and selector_within(inner, outer)


# Satisfied by no label set: `k` and `!k` at once.
_NOTHING = Selector(
    (Requirement("x", Operator.EXISTS), Requirement("x", Operator.NOT_EXISTS)),
)


def selector_overlaps_scope(scope: Selector | None, selector: str) -> bool:
    """Whether some device inside the scope could match a deployment selector.

    Exact: the conjunction of both is satisfiable exactly when it is not contained in
    the selector nothing satisfies (`selector_within` is exact for this grammar).
    """
    if scope is None:
        return True
    both = parse_selector(selector).requirements + scope.requirements
    return not selector_within(Selector(tuple(set(both))), _NOTHING)


def labels_pin_scope(scope: Selector | None, labels: dict[str, str]) -> bool:
    """Whether every label set that holds these labels lies inside the scope.

    An enrollment token's labels win over the labels a device asks for, but the device
    may add others: a token for scope `site!=b` with no labels would let a device
    enroll itself as `site=b`. Its labels must pin the device inside the scope.
    """
    if scope is None:
        return True
    pinned = Selector(tuple(Requirement(k, Operator.EQUALS, (v,)) for k, v in labels.items()))
    return selector_within(pinned, scope)
