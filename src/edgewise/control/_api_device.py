"""`/device/v1`: the routes agents call, every one but enroll signed by the device key.

The desired-state poll is the hot path of the whole fleet (100,000 devices at a 30 s poll
is 3,300 requests/s), so an unchanged poll touches no database: the device's key, status
and current document come from the per-process cache, the nonce from the in-memory
window, and last-seen is written in batches.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from edgewise.control._errors import DEVICE_ERRORS
from edgewise.control._fleet import EnrollRequest, enroll, ingest_telemetry, report_item
from edgewise.control._live import CachedDevice
from edgewise.control._plane import ApiError, ControlPlane
from edgewise.control._registry import ArtifactCache, ArtifactDamaged, artifact_path
from edgewise.control.telemetry._decode import TelemetryColumns, decode_upload
from edgewise.protocol import (
    Report,
    TelemetryBatch,
    decode_batch,
    first_problem,
    parse_signed_headers,
)

__all__ = ["ARTIFACTS", "router"]

log = logging.getLogger("edgewise.control.device")

router = APIRouter(prefix="/device/v1", tags=["device"], responses=DEVICE_ERRORS)

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# ASCII digits, at most 18 (`\d` takes any script's digits; int() of thousands of them
# fails): more than any artifact's size, so a longer number is not a range we serve.
_RANGE_RE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$")
_ETAG_RE = re.compile(r"[0-9]{1,18}")
_CHUNK = 256 * 1024
# Artifacts are content-addressed, so one cache serves every control plane of a process.
_ARTIFACTS = ARTIFACTS = ArtifactCache()


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def _path_qs(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


async def _authenticate(request: Request, body: bytes) -> tuple[ControlPlane, str]:
    plane = _plane(request)
    device_id = plane.device_id_of(request.headers)
    device = plane.cache.get(device_id)
    if device is None:
        device = await to_thread.run_sync(plane.load_device, device_id)
    plane.check_device_request(device, request.headers, request.method, _path_qs(request), body)
    return plane, device_id


def _parse(model: Any, raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", first_problem(exc, "body")) from None


@router.post("/enroll", status_code=201)
async def enroll_device(request: Request) -> JSONResponse:
    """Enroll with a token and the device's public key; returns id, trust root, settings."""
    req = _parse(EnrollRequest, await request.body())
    result = await to_thread.run_sync(enroll, _plane(request), req)
    return JSONResponse(result, status_code=201)


def _etag_revision(header: str | None) -> int | None:
    if not header:
        return None
    value = header.strip()
    value = value.removeprefix("W/").strip('"')
    return int(value) if _ETAG_RE.fullmatch(value) else None


async def _current(plane: ControlPlane, device_id: str) -> tuple[CachedDevice, bool]:
    cached = plane.cache.get(device_id)
    if cached is not None and cached.signed_json is not None:
        half = (cached.expires_at - cached.issued_at) / 2
        if plane.clock() < cached.issued_at + half:
            return cached, False
    return await to_thread.run_sync(plane.current_desired, device_id)


@router.get(
    "/desired",
    responses={304: {"description": "unchanged (ETag matches) or long-poll timeout"}},
)
async def get_desired(request: Request, wait: float = 0.0) -> Response:
    """The signed desired state; ETag = revision; `?wait=` long-polls for a change."""
    plane, device_id = await _authenticate(request, b"")
    if not 0 <= wait <= 86400:
        raise ApiError(400, "bad_wait", "wait must be between 0 and 86400 seconds")
    known = _etag_revision(request.headers.get("if-none-match"))
    deadline = plane.clock() + min(wait, plane.settings.max_poll_wait_s)
    while True:
        version = plane.notifier.version(device_id)
        device, resigned = await _current(plane, device_id)
        if device.status != "active":
            raise ApiError(401, "decommissioned", "device has been decommissioned")
        etag = f'"{device.revision}"'
        if resigned or known != device.revision:
            assert device.signed_json is not None
            return Response(
                device.signed_json, media_type="application/json", headers={"ETag": etag}
            )
        remaining = deadline - plane.clock()
        if remaining <= 0 or plane.notifier.closing:  # (a stopping server answers now)
            return Response(status_code=304, headers={"ETag": etag})
        await plane.notifier.wait(device_id, remaining, since=version)


@router.post("/report")
async def post_report(request: Request) -> JSONResponse:
    """Reported state per pipeline; idempotent."""
    body = await request.body()
    plane, device_id = await _authenticate(request, body)
    report: Report = _parse(Report, body)
    signed_ts = parse_signed_headers(request.headers)[1]  # checked by _authenticate
    # Batched with the reports arriving meanwhile: a wave's thousands of reports share
    # transactions instead of filling the thread pool with writers queued on one lock.
    await plane.reports.submit(report_item(plane, device_id, report, signed_ts))
    return JSONResponse({"ok": True})


@router.get("/trust-root")
async def get_trust_root(request: Request) -> JSONResponse:
    """The fleet's signed trust root chain, `{"chain": [...]}` (empty without one).

    Desired documents carry it too; a device fetches it here when it refuses their
    signer: each version verifies by itself against the root keys the device holds, so
    a device whose control-plane key was replaced recovers from it (`protocol._trust`).
    """
    plane, _ = await _authenticate(request, b"")
    chain = await to_thread.run_sync(plane.store.trust_roots)
    return JSONResponse({"chain": chain})


@router.post("/telemetry")
async def post_telemetry(request: Request) -> JSONResponse:
    """A telemetry batch (gzip JSON); each (device, seq) is stored exactly once."""
    body = await request.body()
    plane, device_id = await _authenticate(request, body)
    gzipped = request.headers.get("content-encoding", "").lower() == "gzip"
    telemetry = getattr(request.app.state, "telemetry_runtime", None)
    if telemetry is None:
        if gzipped:
            try:
                batch = decode_batch(body)
            except ValueError as exc:
                raise ApiError(422, "invalid_request", str(exc)) from None
        else:
            batch = _parse(TelemetryBatch, body)
        ack = await to_thread.run_sync(ingest_telemetry, plane, device_id, batch)
        return JSONResponse(ack)
    # Straight to columns: no pydantic object per record (see telemetry._decode).
    if gzipped:
        try:
            cols = decode_upload(body)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
    else:
        cols = TelemetryColumns.of(_parse(TelemetryBatch, body))
    wait = telemetry.admit(len(cols))
    if wait > 0:  # over this control plane's ingest budget: the device backs off
        return JSONResponse(
            {"error": {"code": "busy", "message": "telemetry ingest over budget; retry later"}},
            status_code=429,
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    # Group commit: uploads arriving meanwhile share the next transaction; the wait
    # holds no worker thread (see `GroupCommit.asubmit`).
    result = await telemetry.writer.asubmit(device_id, cols)
    return JSONResponse(result.model_dump())


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive, None for the whole file; raises 416 when unsatisfiable."""
    if not header:
        return None
    whole = {"Content-Range": f"bytes */{size}"}  # RFC 9110: what there is to ask for
    m = _RANGE_RE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise ApiError(416, "bad_range", f"unsupported range {header!r}", whole)
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            raise ApiError(416, "bad_range", "unsatisfiable range", whole)
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        raise ApiError(416, "bad_range", f"range {header!r} is outside 0-{size - 1}", whole)
    return first, min(last, size - 1)


async def _file_chunks(path: str, first: int, length: int) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(first)
        left = length
        while left > 0:
            chunk = await to_thread.run_sync(fh.read, min(_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


@router.get(
    "/artifacts/{sha256}",
    responses={206: {"description": "partial content (Range)"}},
)
async def get_artifact(request: Request, sha256: str) -> Response:
    """A bundle by digest, resumable with `Range: bytes=N-` / `bytes=N-M`."""
    plane, _ = await _authenticate(request, b"")
    if not _SHA_RE.match(sha256):
        raise ApiError(404, "not_found", "no such artifact")
    path = artifact_path(plane, sha256)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ApiError(404, "not_found", "no such artifact") from None
    headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
    span = _byte_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    if span is not None and if_range is not None and if_range.strip('"') != sha256:
        span = None
    first, last = span if span is not None else (0, size - 1)
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    status = 200 if span is None else 206
    data = _ARTIFACTS.get(sha256)
    try:
        if data is None and size <= _ARTIFACTS.max_file:
            data = await to_thread.run_sync(_ARTIFACTS.load, path, sha256)
        if data is None:
            await to_thread.run_sync(_ARTIFACTS.check, path, sha256)
    except ArtifactDamaged:
        log.error("artifact %s is damaged on this control plane's disk: push it again", sha256)
        raise ApiError(
            503,
            "artifact_damaged",
            f"the control plane's copy of artifact {sha256} is damaged (its bytes do not "
            "match the digest): an operator must push the bundle again",
        ) from None
    except FileNotFoundError:
        raise ApiError(404, "not_found", "no such artifact") from None
    if data is not None:  # small: from memory, in one piece
        return Response(
            data[first : last + 1], status_code=status,
            media_type="application/octet-stream", headers=headers,
        )  # fmt: skip
    headers["Content-Length"] = str(last - first + 1)
    return StreamingResponse(
        _file_chunks(str(path), first, last - first + 1),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )
