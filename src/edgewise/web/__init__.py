"""The web console, served by the control plane at `/`.

Usage::

    from edgewise.control import create_app
    from edgewise.web import mount_console

    app = create_app(settings, store)
    mount_console(app)          # create_app does this itself once wired

Server-rendered pages (Jinja2) with light JavaScript: htmx for live rollout progress,
uPlot for charts, both vendored under `static/` with their licences. Sign-in takes an
operator token and keeps it in an HttpOnly cookie; the API's RBAC decides what each
operator may see and do.
"""

from __future__ import annotations

from edgewise.web._mount import mount_console

__all__ = ["mount_console"]
