"""Devices: enrollment tokens, enrollment, labels, decommission, reports, telemetry.

Functions over a `ControlPlane`; the routes call them after authorising the caller.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgewise.control._identity import hash_token, new_secret_token, public_key_from_b64
from edgewise.control._plane import ApiError, ControlPlane, Principal, digest, ensure_json
from edgewise.control._preflight import DeviceView, reported_digest
from edgewise.control._rbac import in_scope, labels_pin_scope
from edgewise.control._selector import LabelError, SelectorError, parse_selector, validate_labels
from edgewise.control._store import ConflictError
from edgewise.protocol import Report, TelemetryBatch

__all__ = [
    "EnrollRequest",
    "EnrollTokenRequest",
    "agent_version",
    "create_enroll_token",
    "decommission",
    "device_view",
    "device_views",
    "enroll",
    "ingest_telemetry",
    "list_devices",
    "report_item",
    "set_labels",
    "visible_device",
]


class EnrollTokenRequest(BaseModel):
    """`POST /api/v1/enroll-tokens`."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, str] = Field(default_factory=dict)
    ttl_s: float = Field(default=86400.0, gt=0, le=365 * 86400.0)
    max_uses: int = Field(default=1, ge=1, le=1_000_000)


class EnrollRequest(BaseModel):
    """`POST /device/v1/enroll`."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    public_key: str = Field(min_length=1, max_length=100)
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)


def _check_labels(labels: dict[str, str]) -> None:
    try:
        validate_labels(labels)
    except (LabelError, SelectorError) as exc:
        raise ApiError(400, "bad_labels", str(exc)) from None


def create_enroll_token(
    plane: ControlPlane, req: EnrollTokenRequest, who: Principal
) -> dict[str, Any]:
    """Mint an enrollment token; a scoped operator's labels must pin devices inside its scope.

    A device may ask for more labels than its token's (the token's win where both set
    one), so the token's labels alone must keep every device enrolled with it inside
    the scope: for `site!=b`, `site=a` does; no `site` label would let it claim `site=b`.
    """
    _check_labels(req.labels)
    if not labels_pin_scope(who.scope, req.labels):
        raise ApiError(
            403,
            "out_of_scope",
            "enrollment labels must keep every device enrolled with them inside the "
            f"token's scope {str(who.scope)!r} (set the labels its selector names)",
        )
    token_id, secret = new_secret_token("ewe")
    now = plane.clock()
    row = {
        "id": token_id,
        "token_hash": hash_token(secret),
        "labels": req.labels,
        "expires_at": now + req.ttl_s,
        "max_uses": req.max_uses,
        "uses": 0,
        "created_at": now,
        "created_by": who.actor,
        "revoked": False,
    }
    plane.store.insert_enroll_token(row)
    plane.audit(
        who.actor, "enroll_token.create", f"enroll_token:{token_id}", digest(req.model_dump()), "ok"
    )
    return {
        "id": token_id,
        "token": secret,
        "labels": req.labels,
        "expires_at": row["expires_at"],
        "max_uses": req.max_uses,
    }


def enroll(plane: ControlPlane, req: EnrollRequest) -> dict[str, Any]:
    """Enroll a device: consume the token, store the key, compute its desired state."""
    try:
        public_key_from_b64(req.public_key)
    except ValueError as exc:
        raise ApiError(400, "bad_key", str(exc)) from None
    _check_labels(req.labels)
    ensure_json(req.capabilities, "capabilities")
    now = plane.clock()
    token, reason = plane.store.use_enroll_token(hash_token(req.token), now)
    if token is None:
        plane.audit(
            "device:?", "device.enroll", "device:?", digest(req.public_key), f"refused: {reason}"
        )
        raise ApiError(401, "bad_enroll_token", f"enrollment token {reason}")
    # The token's labels win: a device must not talk itself into another site's rollouts.
    labels = {**req.labels, **token["labels"]}
    device_id = f"dev-{secrets.token_hex(8)}"
    try:
        plane.store.insert_device(
            {
                "id": device_id,
                "public_key": req.public_key,
                "labels": labels,
                "capabilities": req.capabilities,
                "status": "active",
                "enrolled_at": now,
            }
        )
    except ConflictError:
        raise ApiError(409, "conflict", "this public key is already enrolled") from None
    plane.recompute(device_id)
    plane.audit(
        f"device:{device_id}",
        "device.enroll",
        f"device:{device_id}",
        digest(req.model_dump(exclude={"token"})),
        f"ok via enroll_token:{token['id']}",
    )
    return {
        "device_id": device_id,
        "trust_root": plane.trust_root(),
        "settings": plane.agent_settings(),
    }


def agent_vocabularies(
    plane: ControlPlane, rows: list[dict[str, Any]]
) -> dict[str, frozenset[str] | None]:
    """Per device row, the spec terms its agent reported knowing (None: unknown)."""
    digests = {r["id"]: reported_digest(r["report_agent"]) for r in rows}
    known = plane.store.vocabularies(digests.values())
    return {device_id: known.get(d) for device_id, d in digests.items()}


def device_views(plane: ControlPlane, rows: list[dict[str, Any]]) -> list[DeviceView]:
    """Device rows as pre-flight reads them: labels, capabilities, agent vocabulary."""
    vocabularies = agent_vocabularies(plane, rows)
    return [
        DeviceView(
            id=r["id"],
            labels=r["labels"],
            capabilities=r.get("capabilities") or {},
            vocabulary=vocabularies.get(r["id"]),
        )
        for r in rows
    ]


def agent_version(report_agent: Any) -> str | None:
    """The agent build a device last reported running (None before a report).

    The devices pre-flight and rollouts hold back are found by it.
    """
    version = report_agent.get("version") if isinstance(report_agent, dict) else None
    return str(version) if version else None


def device_view(plane: ControlPlane, row: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    """The operator-facing shape of a device."""
    now = plane.clock()
    last_seen = row["last_seen"]
    view: dict[str, Any] = {
        "id": row["id"],
        "labels": row["labels"],
        "status": row["status"],
        "enrolled_at": row["enrolled_at"],
        "last_seen": last_seen,
        "online": (
            row["status"] == "active"
            and last_seen is not None
            and now - last_seen <= plane.settings.online_window_s
        ),
        "desired_revision": row["desired_revision"],
        "reported_revision": row["report_revision"],
        "agent_version": agent_version(row["report_agent"]),
    }
    if detail:
        view["capabilities"] = row["capabilities"]
        view["public_key"] = row["public_key"]
        view["errors"] = row["report_errors"] or []
        # How many spec terms its agent said it knows (pre-flight checks specs against
        # them); None when it never said.
        terms = agent_vocabularies(plane, [row])[row["id"]]
        view["agent"] = dict(row["report_agent"] or {})
        view["agent"]["spec_terms"] = None if terms is None else len(terms)
        view["reported_at"] = row["reported_at"]
        # When the device built that report, by its own clock: against reported_at it
        # shows the device's clock skew plus the report's delay on the way.
        view["report_sent_at"] = row["report_sent_at"]
        view["pipelines"] = {
            p["pipeline"]: {
                k: p[k] for k in ("model", "version", "slot", "status", "reason", "timeline")
            }
            | {"updated_at": p["updated_at"]}
            for p in plane.store.device_pipelines(row["id"])
        }
        signed = row["desired_signed"]
        view["desired"] = signed["document"] if signed else None
    return view


def list_devices(
    plane: ControlPlane, who: Principal, selector: str | None, online: bool | None
) -> list[dict[str, Any]]:
    """Devices visible to the caller, filtered by selector and online state."""
    try:
        sel = parse_selector(selector) if selector else None
    except SelectorError as exc:
        raise ApiError(400, "bad_selector", str(exc)) from None
    # Pending last-seen times belong in the answer; flush them first.
    plane.store.touch_last_seen(plane.seen.take())
    out = []
    for row in plane.store.list_devices():
        if not in_scope(who.scope, row["labels"]):
            continue
        if sel is not None and not sel.matches(row["labels"]):
            continue
        view = device_view(plane, row)
        if online is not None and view["online"] != online:
            continue
        out.append(view)
    return out


def visible_device(plane: ControlPlane, who: Principal, device_id: str) -> dict[str, Any]:
    """A device row the caller may see (404 otherwise, so scope does not leak ids)."""
    row = plane.store.get_device(device_id)
    if row is None or not in_scope(who.scope, row["labels"]):
        raise ApiError(404, "not_found", f"no device {device_id}")
    return row


def set_labels(
    plane: ControlPlane,
    who: Principal,
    device_id: str,
    set_: dict[str, str],
    remove: list[str],
) -> dict[str, Any]:
    """Change labels; a scoped caller must leave the device inside its scope."""
    visible_device(plane, who, device_id)
    _check_labels(set_)

    def change(current: dict[str, str]) -> dict[str, str]:
        # On the labels as they are when written: another replica may be changing
        # others of this device's labels at the same moment.
        if not in_scope(who.scope, current):
            raise ApiError(404, "not_found", f"no device {device_id}")
        labels = {k: v for k, v in current.items() if k not in set(remove)} | set_
        if not in_scope(who.scope, labels):
            raise ApiError(403, "out_of_scope", "new labels would move the device out of scope")
        return labels

    now = plane.clock()
    if plane.store.change_labels(device_id, change, now) is None:
        raise ApiError(404, "not_found", f"no device {device_id}")
    # Labels reach a device only through its desired document: the recompute wakes its
    # long-poll when that changes, once. The cached labels go now; the mark tells this
    # replica's watcher that the write was its own.
    plane.changes.mark([device_id], now)
    plane.cache.drop(device_id)
    plane.recompute(device_id)
    plane.audit(who.actor, "device.label", f"device:{device_id}", digest([set_, remove]), "ok")
    fresh = plane.store.get_device(device_id)
    assert fresh is not None
    return device_view(plane, fresh, detail=True)


def decommission(plane: ControlPlane, who: Principal, device_id: str) -> dict[str, Any]:
    """Revoke a device's key: every later request from it is refused."""
    visible_device(plane, who, device_id)
    plane.store.set_status(device_id, "decommissioned", plane.clock())
    plane.device_changed(device_id)
    plane.audit(who.actor, "device.decommission", f"device:{device_id}", digest(device_id), "ok")
    return {"id": device_id, "status": "decommissioned"}


def report_order(sent_at: float | None, signed_ts: int) -> float:
    """The key that orders a device's reports (the newest is kept).

    When the agent built the report, else the request's signed timestamp (older
    agents and the simulator send no `sent_at`).

    Raises:
        ApiError: 422 when `sent_at` is later than the request that carries it was
            signed (a report's newest-wins key must not run ahead of its own clock).
    """
    if sent_at is None:
        return float(signed_ts)
    if sent_at > signed_ts + 2:  # the header is whole seconds: allow its rounding
        raise ApiError(422, "invalid_request", "sent_at: later than the request's signed timestamp")
    return sent_at


def report_item(
    plane: ControlPlane, device_id: str, report: Report, signed_ts: int
) -> tuple[str, Any, float]:
    """A checked report as `SqlStore.save_reports` takes it (pure but for the clock).

    Its `sent_at` is always set: to the request's signed timestamp when the agent sent
    none (the store keeps the newest report by it).
    """
    for name, pipeline in report.pipelines.items():
        if len(name) > 200 or len(pipeline.model) > 200 or len(pipeline.version) > 64:
            raise ApiError(422, "invalid_request", "pipeline, model or version name too long")
    if report.capabilities is not None:  # free-form, as at enrollment
        ensure_json(report.capabilities, "capabilities")
    # A parsed report holds no NaN or infinity (its models refuse them): JSON as it is.
    data = report.model_dump(mode="json")
    data["sent_at"] = report_order(report.sent_at, signed_ts)
    return device_id, data, plane.clock()


def ingest_telemetry(plane: ControlPlane, device_id: str, batch: TelemetryBatch) -> dict[str, int]:
    """Store a telemetry batch exactly once per (device, seq)."""
    if any(len(r.kind) > 200 for r in batch.records):
        raise ApiError(422, "invalid_request", "telemetry kind longer than 200 characters")
    records = [r.model_dump(mode="json") for r in batch.records]
    ensure_json([r["data"] for r in records], "telemetry data")
    accepted, dups, acked = plane.store.insert_telemetry(device_id, records, plane.clock())
    return {"accepted": accepted, "duplicates": dups, "acked_seq": acked}
