"""`mount_console(app)`: how the control plane serves the console at `/`.

The control plane calls this once from its app factory (a lazy import, so `control`
does not depend on `web` at import time). Everything the browser loads comes from
here: pages, the vendored htmx and uPlot (with their licences), the console's own CSS
and JS. Nothing is fetched from any other host, at build time or at run time.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from edgewise.web._render import TEMPLATES

__all__ = ["STATIC_DIR", "mount_console"]

STATIC_DIR = TEMPLATES.parent / "static"


class _Static(StaticFiles):
    """Static files with a cache lifetime: they change only with the package."""

    def file_response(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)  # type: ignore[arg-type]
        response.headers["cache-control"] = "public, max-age=3600"
        response.headers["x-content-type-options"] = "nosniff"
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the web console from `app` (pages at `/`, assets under `/static`).

    The app must carry the control plane as `app.state.plane` (what `create_app`
    sets); the console reads through it and calls `/api/v1` in process. Mounting
    twice is a no-op.

    Args:
        app: the control-plane application.
    """
    if getattr(app.state, "console_mounted", False):
        return  # idempotent: the app factory and a caller may both mount it
    app.state.console_mounted = True
    # Imported here: the page modules import the control plane's internals, which
    # must be fully imported before the console is mounted into it.
    from edgewise.web._pages import router as pages
    from edgewise.web._rollout_pages import router as rollouts
    from edgewise.web._signin import router as signin

    app.include_router(signin)
    app.include_router(rollouts)
    app.include_router(pages)
    app.mount("/static", _Static(directory=str(STATIC_DIR)), name="console-static")
