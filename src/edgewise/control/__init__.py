"""The control plane: operator API, device API, registry, deployments, desired state, audit.

Usage::

    from edgewise.control import Settings, create_app, open_store

    settings = Settings(data_dir=Path("edgewise-data"))
    store = open_store(settings.database_url)
    app = create_app(settings, store)

Pure decisions live in `_selector`, `_merge`, `_preflight`, `_auditchain`, `_rbac` and
`_desiredcalc`; `_plane`, `_fleet`, `_registry` and `_deployments` are the shell around
them; `_api_admin` and `_api_device` are the HTTP routes; `_store` is the SQL store.
"""

from __future__ import annotations

from edgewise.control._app import create_app
from edgewise.control._migrate import migrate
from edgewise.control._plane import ApiError, ControlPlane, Principal
from edgewise.control._rbac import ROLE_PERMISSIONS, Permission, Role
from edgewise.control._settings import Settings
from edgewise.control._store import ConflictError, SqlStore, open_store

__all__ = [
    "ROLE_PERMISSIONS",
    "ApiError",
    "ConflictError",
    "ControlPlane",
    "Permission",
    "Principal",
    "Role",
    "Settings",
    "SqlStore",
    "create_app",
    "migrate",
    "open_store",
]
