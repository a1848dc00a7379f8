"""Local endpoints on loopback for apps on the device.

`GET /healthz`, `GET /status` (pipelines, versions, slots, last sync, buffer depth),
`POST /telemetry` (apps add events, metrics or samples to the durable buffer), and every
other path goes to the runtime's inference API (`/v1/pipelines/...`). A plain ASGI app:
no web framework is loaded for three routes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["LocalServer", "make_local_app"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 8 * 1024 * 1024
MAX_RECORDS = 10_000


async def _respond(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body, default=str).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


def _parse_records(raw: bytes) -> list[tuple[str, str, dict[str, Any], float]]:
    doc = json.loads(raw)
    items = doc.get("records") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or len(items) > MAX_RECORDS:
        raise ValueError(f"body must hold a list of at most {MAX_RECORDS} records")
    out = []
    now = time.time()
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("each record is an object")
        cls, kind, data = item.get("cls"), item.get("kind"), item.get("data", {})
        if cls not in ("event", "metric", "sample"):
            raise ValueError("cls must be event, metric or sample")
        if not isinstance(kind, str) or not 0 < len(kind) <= 200:
            raise ValueError("kind must be a non-empty string")
        if not isinstance(data, dict):
            raise ValueError("data must be an object")
        ts = item.get("ts", now)
        if not isinstance(ts, int | float):
            raise ValueError("ts must be a number")
        out.append((cls, kind, data, float(ts)))
    return out


def make_local_app(
    status: Callable[[], dict[str, Any]],
    add_telemetry: Callable[[list[tuple[str, str, dict[str, Any], float]]], int],
    inference_app: Callable[[], ASGIApp | None],
) -> ASGIApp:
    """The loopback ASGI app.

    Args:
        status: the agent's status document.
        add_telemetry: stores records; returns how many.
        inference_app: the runtime's inference app, or None while no runtime runs.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await _respond(send, 200, {"ok": True})
            return
        if path == "/status":
            await _respond(send, 200, await asyncio.to_thread(status))
            return
        if path == "/telemetry":
            if method != "POST":
                await _respond(send, 405, _error("method_not_allowed", "use POST"))
                return
            raw = await _body(receive)
            if raw is None:
                await _respond(send, 413, _error("payload_too_large", "body over 8 MiB"))
                return
            try:
                records = _parse_records(raw)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                await _respond(send, 400, _error("bad_request", str(exc)))
                return
            n = await asyncio.to_thread(add_telemetry, records)
            await _respond(send, 200, {"stored": n})
            return
        inner = inference_app()
        if inner is None:
            await _respond(send, 404, _error("not_found", f"no route {path}"))
            return
        await inner(scope, receive, send)

    return app


class LocalServer:
    """uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="local-api", daemon=True)

    def start(self, timeout: float = 10.0) -> int:
        """Start serving; returns the bound port."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the local API did not start (port in use?)")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        self._thread.join(timeout=5)
