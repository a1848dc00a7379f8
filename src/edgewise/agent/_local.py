"""Local endpoints on loopback for apps on the device.

`GET /healthz`, `GET /status` (pipelines, versions, slots, last sync, buffer depth),
`POST /telemetry` (apps add events, metrics or samples to the durable buffer), and every
other path goes to the runtime's inference API (`/v1/pipelines/...`). The routes are a
plain handler served by `edgewise._httpd.HttpServer`: no web framework and no ASGI server
is loaded for three routes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import orjson

from edgewise._httpd import (
    BUSY_POLL_US,
    Answer,
    Deferred,
    Handler,
    Headers,
    HttpServer,
    error_answer,
)
from edgewise.agent._buffer import BufferFull

__all__ = ["LocalServer", "make_local_app"]

MAX_BODY = 8 * 1024 * 1024
MAX_RECORDS = 10_000
MAX_DEPTH = 64  # levels of objects and lists in a record's data


def _json(status: int, body: Any) -> Answer:
    return status, json.dumps(body, default=str).encode(), ()


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and lists nest more than `limit` levels in `value` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            inner: Any = item.values()
        elif isinstance(item, list):
            inner = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in inner)
    return False


def _parse_records(raw: bytes) -> list[tuple[str, str, dict[str, Any], float]]:
    # orjson: nesting is bounded (a ValueError; the standard library's parser recursed
    # into a RecursionError), and NaN or Infinity, which are not JSON, are refused.
    doc = orjson.loads(raw)
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
        if _deeper_than(data, MAX_DEPTH):  # the buffer writes it with the standard library
            raise ValueError(f"data must not nest deeper than {MAX_DEPTH} levels")
        ts = item.get("ts", now)
        if not isinstance(ts, int | float):
            raise ValueError("ts must be a number")
        out.append((cls, kind, data, float(ts)))
    return out


def _store(add: Callable[[list[Any]], int], records: list[Any]) -> int | Answer:
    # The device's disk failing is the app's business (it may keep the records and try
    # later), not an internal error.
    try:
        return add(records)
    except BufferFull as exc:
        return error_answer(507, "insufficient_storage", str(exc.strerror))
    except sqlite3.OperationalError as exc:  # read-only, failing
        return error_answer(503, "storage_unavailable", f"telemetry buffer: {exc}")


def _stored(result: int | Answer) -> Answer:
    return result if isinstance(result, tuple) else _json(200, {"stored": result})


def make_local_app(
    status: Callable[[], dict[str, Any]],
    add_telemetry: Callable[[list[tuple[str, str, dict[str, Any], float]]], int],
    inference: Callable[[], Handler | None],
) -> Handler:
    """The loopback routes as a handler for `HttpServer` (which bounds bodies at 8 MiB).

    Args:
        status: the agent's status document.
        add_telemetry: stores records; returns how many.
        inference: the runtime's inference API, or None while no runtime runs.
    """

    def later(fn: Callable[[], Any], answer: Callable[[Any], Answer]) -> Deferred:
        # Blocking work (the status document, the buffer's disk) runs off the loop.
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        return Deferred(fut, lambda: answer(fut.result()))

    def app(method: str, path: str, headers: Headers, body: bytes) -> Answer | Deferred:
        if path == "/healthz":
            return _json(200, {"ok": True})
        if path == "/status":
            return later(status, lambda doc: _json(200, doc))
        if path == "/telemetry":
            if method != "POST":
                return error_answer(405, "method_not_allowed", "use POST")
            try:
                records = _parse_records(body)
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                return error_answer(400, "bad_request", str(exc))
            return later(lambda: _store(add_telemetry, records), _stored)
        inner = inference()
        if inner is None:
            return error_answer(404, "not_found", f"no route {path}")
        return inner(method, path, headers, body)

    return app


class LocalServer(HttpServer):
    """The loopback API's server: `HttpServer` on 127.0.0.1 with the agent's limits."""

    def __init__(self, app: Handler, port: int, busy_poll_us: float = BUSY_POLL_US) -> None:
        super().__init__(app, "127.0.0.1", port, max_body_bytes=MAX_BODY, busy_poll_us=busy_poll_us)
