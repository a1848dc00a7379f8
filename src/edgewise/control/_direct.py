"""The device routes a rollout wave hammers, dispatched without FastAPI's routing.

In a wave every moved device long-polls, downloads, reports and uploads within seconds:
tens of thousands of requests to four routes. Through FastAPI each of them walks the
exception and exit-stack middlewares, the router's matching and dependency solving,
which together cost about as much as the handler itself (an Ed25519 verify included).
`_Guard` hands these four to `dispatch` instead, after its own body-size checks: the
same handler functions of `_api_device`, given a Starlette `Request`, with errors
answered by the application's own exception handlers. Everything else, and these paths
with other methods, goes through FastAPI as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edgewise.control import _api_device as device
from edgewise.control._plane import ApiError

__all__ = ["dispatch", "match"]

Handler = Callable[[Request], Awaitable[Response]]

_ARTIFACT = re.compile(r"^/device/v1/artifacts/([^/]+)$")


async def _desired(request: Request) -> Response:
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", "query.wait: not a number") from None
    return await device.get_desired(request, wait)


async def _artifact(request: Request) -> Response:
    return await device.get_artifact(request, request.path_params["sha256"])


_ROUTES: dict[tuple[str, str], tuple[str, Handler]] = {
    ("GET", "/device/v1/desired"): ("/device/v1/desired", _desired),
    ("POST", "/device/v1/report"): ("/device/v1/report", device.post_report),
    ("POST", "/device/v1/telemetry"): ("/device/v1/telemetry", device.post_telemetry),
}


def match(scope: Scope) -> tuple[str, Handler] | None:
    """(route template, handler) for a request this module serves, else None."""
    method, path = scope["method"], scope["path"]
    found = _ROUTES.get((method, path))
    if found is not None:
        return found
    if method == "GET" and (m := _ARTIFACT.match(path)) is not None:
        scope["path_params"] = {"sha256": m.group(1)}
        return "/device/v1/artifacts/{sha256}", _artifact
    return None


async def dispatch(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `handler` and send its answer; an exception is answered as the app would."""
    request = Request(scope, receive)
    try:
        response = await handler(request)
    except Exception as exc:
        response = await _answer_error(scope, request, exc)
    await response(scope, receive, send)


async def _answer_error(scope: Scope, request: Request, exc: Exception) -> Response:
    handlers: dict[Any, Any] = scope["app"].exception_handlers
    for cls in type(exc).__mro__:
        answer = handlers.get(cls)
        if answer is not None:
            response: Response = await answer(request, exc)
            return response
    raise exc
