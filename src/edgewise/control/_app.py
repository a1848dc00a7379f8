"""The FastAPI application: routes, error envelopes, body limits, metrics, background loops.

Usage::

    store = open_store(settings.database_url)
    app = create_app(settings, store)            # clock=... for virtual time in tests
    serve(app, host="127.0.0.1", port=8080)      # edgewise.control._serve: stops promptly

Every error, including validation errors, unknown routes and anything unexpected, leaves
as `{"error": {"code", "message"}}`. Two loops run while the app is up: the replica
watcher (re-reads devices changed by other replicas, drops their cache entries and wakes
their long-polls) and the last-seen flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from sqlalchemy.exc import DataError, DBAPIError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgewise.control import _direct
from edgewise.control._api_admin import router as admin_router
from edgewise.control._api_device import ARTIFACTS
from edgewise.control._api_device import router as device_router
from edgewise.control._api_rollouts import router as rollouts_router
from edgewise.control._fastpath import DESIRED_PATH, try_fast_poll
from edgewise.control._live import stale_entries
from edgewise.control._outbox import Outbox
from edgewise.control._plane import ApiError, ControlPlane
from edgewise.control._recompute import RECONCILE_S, reconcile_all
from edgewise.control._rollout_driver import RolloutDriver
from edgewise.control._settings import Settings
from edgewise.control._store import SqlStore
from edgewise.control.telemetry._wiring import TelemetryConfig, install_telemetry

__all__ = ["create_app"]

log = logging.getLogger("edgewise.control")


def _envelope(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _store_busy(error: BaseException | None) -> bool:
    """Whether a driver error says the database stayed locked past `BUSY_TIMEOUT_S`.

    SQLite answers SQLITE_BUSY (5) or SQLITE_LOCKED (6), as primary codes of the extended
    one Python gives (`database is locked`); such a request is retried, not a fault.
    """
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


def _busy() -> JSONResponse:
    return _envelope(
        503,
        "store_busy",
        "the database stayed busy (held by another writer, or no free connection); retry",
        {"Retry-After": "1"},
    )


class _Guard:
    """Body-size limit and request metrics, as plain ASGI (cheap on the poll path)."""

    def __init__(self, app: ASGIApp, plane: ControlPlane, registry: CollectorRegistry) -> None:
        self.app = app
        self.plane = plane
        self.settings = plane.settings
        self.requests = Counter(
            "edgewise_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.fast_polls = self.requests.labels("GET", DESIRED_PATH, "304")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            scope["path"] == DESIRED_PATH
            and scope["method"] == "GET"
            and await try_fast_poll(self.plane, scope, receive, send)
        ):
            self.fast_polls.inc()
            return
        upload = scope["method"] == "POST" and scope["path"] == "/api/v1/models"
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
        if length is not None and (length < 0 or length > limit):
            code = "too_large" if length > limit else "bad_request"
            status = 413 if length > limit else 400
            await _envelope(
                status,
                code,
                f"body larger than {limit} bytes" if status == 413 else "bad content-length",
            )(scope, receive, send)
            self._count(scope, status)
            return
        if length is None and not upload and scope["method"] in {"POST", "PUT", "PATCH"}:
            receive, too_big = await self._buffer(receive, limit)
            if too_big:
                await _envelope(413, "too_large", f"body larger than {limit} bytes")(
                    scope, receive, send
                )
                self._count(scope, 413)
                return
        status_box = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        direct = _direct.match(scope)
        if direct is not None:  # a device hot route: its handler, without FastAPI routing
            template, handler = direct
            await _direct.dispatch(handler, scope, receive, send_wrapper)
            self._count(scope, status_box[0], template)
            return
        await self.app(scope, receive, send_wrapper)
        self._count(scope, status_box[0])

    def _count(self, scope: Scope, status: int, path: str | None = None) -> None:
        if path is None:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
        self.requests.labels(scope["method"], path, str(status)).inc()

    @staticmethod
    async def _buffer(receive: Receive, limit: int) -> tuple[Receive, bool]:
        # A chunked body has no Content-Length: read it (up to the limit) before routing.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, True
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay, False


def notice_changes(plane: ControlPlane, changed: list[tuple[str, float]], since: float) -> int:
    """Drop and wake the devices another replica changed; returns how many.

    Args:
        plane: this replica.
        changed: (device id, changed_at) read from the store.
        since: the start of the window read (older marks are forgotten).
    """
    woken = 0
    for device_id, changed_at in changed:
        if plane.changes.first_sight(device_id, changed_at):
            plane.device_changed(device_id)
            woken += 1
    plane.changes.forget_before(since - 5.0)
    return woken


def resync(plane: ControlPlane) -> int:
    """Drop and wake every cached device whose stored row changed since it was cached.

    The watcher reads only a few seconds back, so a change whose commit landed later
    than that after its stamp (a long bulk transaction, a stalled replica) escapes it;
    this pass catches it, whatever the delay. Returns how many entries were stale.
    """
    cached = plane.cache.stamps()  # before the read: a later entry is as new as the read
    stale = stale_entries(cached, plane.store.change_stamps())
    for device_id, stamp in stale.items():
        plane.changes.mark([device_id], stamp)
        plane.device_changed(device_id)
    return len(stale)


async def _deliver(outbox: Outbox, interval_s: float = 1.0) -> None:
    """Post due rollout notifications to the webhook, for as long as the app runs."""
    while True:
        try:
            await to_thread.run_sync(outbox.deliver_due)
        except asyncio.CancelledError:
            raise
        except Exception:  # a database hiccup must not kill the loop
            log.exception("notification delivery failed")
        await asyncio.sleep(interval_s)


async def _watch(plane: ControlPlane) -> None:
    """Notice changes other replicas made to devices; reconcile desired state; flush."""
    interval = plane.settings.watch_interval_s
    since = plane.clock()
    last_flush = last_resync = time.monotonic()
    last_reconcile = -math.inf  # the first pass brings every device up at start
    while True:
        await asyncio.sleep(interval)
        try:
            if time.monotonic() - last_reconcile >= RECONCILE_S:
                last_reconcile = time.monotonic()
                if behind := await to_thread.run_sync(reconcile_all, plane):
                    log.warning("desired-state reconcile: %d devices were behind", behind)
            now = plane.clock()
            # Look back a little: commits land after their changed_at stamp.
            window = since - 5.0
            changed = await to_thread.run_sync(plane.store.changed_since, window)
            notice_changes(plane, changed, window)
            since = now
            if time.monotonic() - last_resync >= plane.settings.resync_interval_s:
                last_resync = time.monotonic()
                if stale := await to_thread.run_sync(resync, plane):
                    log.warning("replica resync: %d cached devices were stale", stale)
            if time.monotonic() - last_flush >= 2.0:
                last_flush = time.monotonic()
                await to_thread.run_sync(plane.store.touch_last_seen, plane.seen.take())
        except asyncio.CancelledError:
            raise
        except Exception:  # a database hiccup must not kill the loop
            log.exception("replica watcher iteration failed")


# FastAPI >= 0.16x asks OpenTelemetry on every request whether tracing, metrics or logs
# are configured (environment lookups: ~6 % of the control plane's CPU under a fleet).
# The control plane exports its own metrics on /metrics; switch that check off where
# FastAPI has it.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    settings: Settings,
    store: SqlStore,
    clock: Callable[[], float] = time.time,
    *,
    background: bool = True,
    telemetry: TelemetryConfig | None = None,
) -> FastAPI:
    """Build the control-plane application.

    Args:
        settings: service settings.
        store: an opened (migrated) store.
        clock: unix-time source (virtual in tests).
        background: run the replica watcher and last-seen flusher.
        telemetry: telemetry settings (MQTT broker, budgets, alerts); from the
            environment when None.
    """
    plane = ControlPlane(settings, store, clock)
    outbox = Outbox(store.engine, settings.rollout_webhook, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        plane.notifier.bind(asyncio.get_running_loop())
        task = asyncio.create_task(_watch(plane)) if background else None
        driver = asyncio.create_task(RolloutDriver(plane).run()) if background else None
        # Rollout events and alert changes queued for webhooks (also when this replica
        # has no rollout webhook of its own: alert rules name theirs).
        notify = asyncio.create_task(_deliver(outbox)) if background else None
        try:
            yield
        finally:
            for running in (task, driver, notify):
                if running is not None:
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            with contextlib.suppress(Exception):
                plane.store.touch_last_seen(plane.seen.take())

    app = FastAPI(
        **_NO_NATIVE_TELEMETRY,
        title="edgewise control plane",
        version="1",
        lifespan=lifespan,
        description="Operator API (/api/v1, bearer tokens) and device API (/device/v1, "
        "requests signed with the device key).",
    )
    app.state.plane = plane
    registry = CollectorRegistry()
    Gauge(
        "edgewise_longpoll_waiting", "Long-poll requests waiting", registry=registry
    ).set_function(lambda: plane.notifier.waiting)
    Gauge(
        "edgewise_nonces_remembered", "Nonces in the replay window", registry=registry
    ).set_function(lambda: len(plane.nonces))
    Gauge(
        "edgewise_notifications_pending",
        "Rollout and alert notifications not yet taken by their webhook",
        registry=registry,
    ).set_function(outbox.pending)
    Gauge(
        "edgewise_artifacts_damaged",
        "Stored artifacts found not to match their digest (push them again)",
        registry=registry,
    ).set_function(lambda: len(ARTIFACTS.damaged))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _envelope(exc.status, exc.code, exc.message, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _envelope(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _envelope(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(StatementError)
    async def _db_error(_: Request, exc: StatementError) -> JSONResponse:
        # Values the database cannot hold (too long, NaN in JSON, out of range) came from
        # the client; a database that is down or busy is ours.
        if isinstance(exc, DataError) or isinstance(exc.orig, ValueError | TypeError):
            return _envelope(
                422, "invalid_value", "a value cannot be stored (too long or not JSON)"
            )
        if _store_busy(exc.orig):
            log.warning("database busy: %s", exc.orig)
            return _busy()
        if isinstance(exc, DBAPIError):
            log.warning("database error: %s", exc)
            return _envelope(
                503, "unavailable", "database unavailable; retry", {"Retry-After": "1"}
            )
        log.exception("statement error", exc_info=exc)
        return _envelope(500, "internal", "internal error")

    @app.exception_handler(PoolTimeout)
    async def _no_connection(_: Request, exc: PoolTimeout) -> JSONResponse:
        # Every pooled connection stayed in use for the pool's timeout.
        log.warning("database busy: %s", exc)
        return _busy()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return _envelope(500, "internal", "internal error")

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness and database reachability."""
        try:
            plane.store.get_meta("bootstrap")
        except Exception as exc:
            raise ApiError(
                503, "unavailable", f"database unreachable: {type(exc).__name__}"
            ) from None
        return {"ok": True}

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router)
    app.include_router(device_router)
    app.include_router(rollouts_router)
    install_telemetry(app, plane, registry, telemetry, background=background)
    from edgewise.web import mount_console  # lazy: control must not depend on web

    mount_console(app)
    app.add_middleware(_Guard, plane=plane, registry=registry)
    return app
