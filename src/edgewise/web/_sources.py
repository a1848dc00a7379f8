"""Where the console's data comes from: control-plane reads and in-process API calls.

Two kinds of read. Parts of the control plane that the console renders in bulk (devices,
reported pipelines, telemetry, models, deployments) are read through the store and the
control modules' view functions, with the caller's scope applied. Parts that other
parts own and may not exist yet in a given build (rollouts, alerts) are read through the
operator API in process (`httpx.ASGITransport` on the running app) with the signed-in
token: the API's RBAC answers for the console, and a missing route is an empty state,
not an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from edgewise.control import ApiError, ControlPlane, Principal
from edgewise.control import _schema as t
from edgewise.control._fleet import agent_version
from edgewise.control._rbac import in_scope
from edgewise.control._selector import SelectorError, parse_selector

__all__ = [
    "ApiAnswer",
    "api_call",
    "api_segment",
    "device_labels",
    "device_rows",
    "model_telemetry",
    "pipelines_by_device",
    "recent_telemetry",
]

_INTERNAL_BASE = "http://console.internal"


@dataclass(frozen=True)
class ApiAnswer:
    """The status and JSON body of an in-process API call.

    `missing` is true when the route itself does not exist in this build (an empty
    state), as opposed to a 404 for an unknown object.
    """

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status < 300

    @property
    def missing(self) -> bool:
        """The route is not part of this control plane."""
        if self.status == 405:
            return True
        if self.status != 404:
            return False
        message = ""
        if isinstance(self.body, Mapping):
            message = str(self.body.get("error", {}).get("message", ""))
        return message == "Not Found"

    @property
    def message(self) -> str:
        """The error message of a non-2xx answer."""
        if isinstance(self.body, Mapping) and isinstance(self.body.get("error"), Mapping):
            return str(self.body["error"].get("message", ""))
        return f"HTTP {self.status}"


def api_segment(value: str) -> str:
    """`value` as one path segment of an API call: `/`, `?`, `#` and NUL cannot leave it.

    Dots are encoded too: `..` as a rollout id must not step up to another route
    (httpx resolves dot segments before sending).
    """
    return quote(value, safe="").replace(".", "%2E")


async def api_call(app: FastAPI, token: str, method: str, path: str, body: Any = None) -> ApiAnswer:
    """Call the operator API in process as the signed-in operator."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=_INTERNAL_BASE) as client:
        resp = await client.request(
            method,
            path,
            json=body,
            headers={"authorization": f"Bearer {token}"},
        )
    try:
        data = resp.json()
    except ValueError:
        data = None
    return ApiAnswer(resp.status_code, data)


def pipelines_by_device(plane: ControlPlane) -> dict[str, list[dict[str, Any]]]:
    """Reported pipelines of every device in one query (timelines left out)."""
    dp = t.device_pipelines
    cols = [dp.c.device_id, dp.c.pipeline, dp.c.model, dp.c.version, dp.c.slot, dp.c.status]
    out: dict[str, list[dict[str, Any]]] = {}
    with plane.store.engine.connect() as c:
        for row in c.execute(select(*cols)):
            out.setdefault(row.device_id, []).append(dict(row._mapping))
    return out


def device_rows(
    plane: ControlPlane, who: Principal, selector: str | None, online: bool | None
) -> list[dict[str, Any]]:
    """Devices as `fleet.list_devices` shows them, reading only the listed columns.

    The control plane's own listing loads every device's signed desired document; a
    page of 1,000 devices needs none of it. Same rules: pending last-seen times are
    flushed first, scope and selector filter, online = active and seen recently.

    Raises:
        ApiError: 400 for a selector that does not parse.
    """
    try:
        sel = parse_selector(selector) if selector else None
    except SelectorError as exc:
        raise ApiError(400, "bad_selector", str(exc)) from None
    plane.store.touch_last_seen(plane.seen.take())
    dev = t.devices
    cols = [
        dev.c.id,
        dev.c.labels,
        dev.c.status,
        dev.c.enrolled_at,
        dev.c.last_seen,
        dev.c.desired_revision,
        dev.c.report_revision,
        dev.c.report_agent,
    ]
    now = plane.clock()
    window = plane.settings.online_window_s
    out = []
    with plane.store.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(select(*cols).order_by(dev.c.id))]
    for row in rows:
        labels = dict(row["labels"])
        if not in_scope(who.scope, labels) or (sel is not None and not sel.matches(labels)):
            continue
        seen = row["last_seen"]
        row["online"] = row["status"] == "active" and seen is not None and now - seen <= window
        row["reported_revision"] = row.pop("report_revision")
        row["agent_version"] = agent_version(row.pop("report_agent"))
        if online is None or row["online"] == online:
            out.append(row)
    return out


def device_labels(plane: ControlPlane) -> dict[str, dict[str, str]]:
    """Labels of every device (only the columns scope checks need)."""
    dev = t.devices
    with plane.store.engine.connect() as c:
        return {row.id: dict(row.labels) for row in c.execute(select(dev.c.id, dev.c.labels))}


def recent_telemetry(plane: ControlPlane, device_id: str, limit: int = 500) -> list[dict[str, Any]]:
    """The device's latest telemetry records, oldest first."""
    tel = t.telemetry
    q = (
        select(tel.c.seq, tel.c.cls, tel.c.ts, tel.c.kind, tel.c.data)
        .where(tel.c.device_id == device_id)
        .order_by(tel.c.seq.desc())
        .limit(limit)
    )
    with plane.store.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(q)]
    rows.reverse()
    return rows


def _mentions(data: Mapping[str, Any], name: str, version: str) -> bool | None:
    """Whether a record names this model version (None: it names no model at all)."""
    model = data.get("model")
    if isinstance(model, Mapping):
        return model.get("name") == name and str(model.get("version")) == version
    if isinstance(model, str):
        if "@" in model:
            return model == f"{name}@{version}"
        return model == name and str(data.get("version", version)) == version
    return None


def model_telemetry(
    plane: ControlPlane,
    who: Principal,
    name: str,
    version: str,
    device_labels: Mapping[str, Mapping[str, str]],
    sample: int = 30,
    limit: int = 500,
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Metric records of a model version, from an even sample of the devices running it.

    Decoding every window of a large fleet would cost seconds per page; the newest
    `limit` windows of up to `sample` devices (spread evenly over the sorted ids, so
    the same devices are drawn on every refresh) show the trend and the shape of the
    histograms just as well. Records that name a model are kept only when they name
    this one; records that name none are attributed to the version the device reports.

    Returns:
        (device ids running it within the caller's scope, the sampled ids,
        records oldest first)
    """
    dp = t.device_pipelines
    with plane.store.engine.connect() as c:
        ids: list[str] = sorted(
            set(
                c.execute(
                    select(dp.c.device_id).where(dp.c.model == name, dp.c.version == version)
                ).scalars()
            )
        )
    ids = [d for d in ids if in_scope(who.scope, dict(device_labels.get(d, {})))]
    if not ids:
        return ids, [], []
    stride = max(1, len(ids) // sample)
    chosen = ids[::stride][:sample]
    tel = t.telemetry
    q = (
        select(tel.c.device_id, tel.c.ts, tel.c.cls, tel.c.kind, tel.c.data)
        .where(tel.c.device_id.in_(chosen), tel.c.cls == "metric")
        .order_by(tel.c.ts.desc())
        .limit(limit)
    )
    with plane.store.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(q)]
    rows = [r for r in rows if _mentions(r["data"] or {}, name, version) is not False]
    rows.reverse()
    return ids, chosen, rows
