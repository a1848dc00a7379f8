"""The unchanged desired-state poll, answered in plain ASGI before FastAPI routing.

Every device polls `GET /device/v1/desired` with `If-None-Match`; nearly every answer is
304. Routing, dependency solving and response classes cost more than the Ed25519 verify
itself, so this path handles exactly that case and nothing else: a cached active device,
a valid signature inside the skew window, a fresh nonce, a matching ETag, no `wait` (or
`wait=0`) and a document not yet due for re-signing. Anything else falls through to the
full route in `_api_device`, which re-checks everything; a nonce is consumed only when
this path answers, so falling through never turns a good request into a "replay".
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from edgewise.control._plane import ControlPlane
from edgewise.control._sodium import sodium_verify
from edgewise.protocol import RequestAuthError, verify_request

__all__ = ["DESIRED_PATH", "try_fast_poll"]

DESIRED_PATH = "/device/v1/desired"
_WANTED = {
    b"x-edgewise-device",
    b"x-edgewise-timestamp",
    b"x-edgewise-nonce",
    b"x-edgewise-signature",
    b"if-none-match",
}


async def try_fast_poll(plane: ControlPlane, scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer an unchanged poll with 304; False when the full route must handle it."""
    query: bytes = scope.get("query_string", b"")
    if query and query not in (b"wait=0", b"wait=0.0"):
        return False
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED:
            headers[name.decode()] = value.decode("latin-1")
    etag = headers.get("if-none-match")
    device_id = headers.get("x-edgewise-device")
    if not etag or not device_id:
        return False
    device = plane.cache.get(device_id)
    if device is None or device.status != "active" or device.signed_json is None:
        return False
    if etag.strip().removeprefix("W/").strip('"') != str(device.revision):
        return False
    now = plane.clock()
    if now >= (device.issued_at + device.expires_at) / 2:  # due for re-signing
        return False
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    path_qs = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    try:
        signed = verify_request(
            headers, "GET", path_qs, b"", device.public_key, now, plane.settings.max_skew_s,
            verify=sodium_verify,
        )  # fmt: skip
    except RequestAuthError:
        return False
    if plane.nonces.seen_before(f"{signed.device_id}:{signed.nonce}", now):
        return False  # the full route answers 401 replayed_nonce
    plane.seen.saw(device_id, now)
    await send(
        {
            "type": "http.response.start",
            "status": 304,
            "headers": [(b"etag", f'"{device.revision}"'.encode())],
        }
    )
    await send({"type": "http.response.body", "body": b""})
    return True
