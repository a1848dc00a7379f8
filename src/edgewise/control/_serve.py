"""Serving the control plane with uvicorn, and stopping it promptly.

uvicorn stops by waiting for every request in flight to finish. A long-poll waits for a
change of its device for as long as it asked (up to a day), so a stopping control plane
first answers every waiting long-poll as unchanged; whatever else is still running after
`GRACE_S` is cancelled (an artifact download resumes with a range request).
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

__all__ = ["GRACE_S", "serve"]

GRACE_S = 30  # seconds


class _Server(uvicorn.Server):
    """uvicorn's server, releasing the control plane's long-polls as it stops."""

    def __init__(self, config: uvicorn.Config, release: Any) -> None:
        super().__init__(config)
        self._release = release

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._release()
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Serve `app` (from `create_app`) until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=75,
        backlog=4096,
        timeout_graceful_shutdown=GRACE_S,
    )
    _Server(config, app.state.plane.notifier.release_all).run()
