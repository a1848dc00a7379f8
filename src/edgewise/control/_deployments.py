"""Deployments: validate, pin models to digests, pre-flight, store, recompute devices.

A request names models as `name@version` (or `{"name", "version"}` in a pipeline spec);
the control plane pins each to the registered bundle's sha256, so a deployment means the
same bytes forever. Pre-flight (pure, `_preflight`) runs before every create and is what
`deploy dry-run` shows; its hard conflicts refuse the create with their messages.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgewise.control._desiredcalc import desired_content
from edgewise.control._fleet import device_views
from edgewise.control._plane import ApiError, ControlPlane, Principal, digest, ensure_json
from edgewise.control._preflight import preflight
from edgewise.control._rbac import in_scope, selector_in_scope, selector_overlaps_scope
from edgewise.control._selector import SelectorError, parse_selector
from edgewise.control._store import ConflictError
from edgewise.protocol import STRICT_STAGE_PARAMS, EgressPolicy, PipelineSpec, spec_terms

__all__ = [
    "DeploymentRequest",
    "create_deployment",
    "delete_deployment",
    "deployment_view",
    "diff_deployment",
    "dry_run",
    "egress_json",
    "visible_deployment",
    "visible_to",
]


class DeploymentRequest(BaseModel):
    """`POST /api/v1/deployments` (also the body of dry-run and diff)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    selector: str = Field(default="", max_length=2000)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    pipelines: dict[str, dict[str, Any]] | list[dict[str, Any]] = Field(min_length=1)
    egress: EgressPolicy | None = Field(
        default=None,
        description="egress policy for the matching devices (the strongest deployment "
        "that sets one wins); omitted: the server's default",
    )


def egress_json(policy: EgressPolicy | None) -> dict[str, Any] | None:
    """A request's egress policy as stored (JSON, every default spelled out), or None."""
    return None if policy is None else policy.model_dump(mode="json")


def _ref(value: Any, role: str, pipeline: str) -> dict[str, Any]:
    if isinstance(value, str):
        name, sep, version = value.partition("@")
        if not sep:
            raise ApiError(400, "unpinned", f"pipeline {pipeline!r}: {role} must be name@version")
        return {"name": name, "version": version}
    if isinstance(value, dict):
        return value
    raise ApiError(400, "bad_pipeline", f"pipeline {pipeline!r}: {role} must be name@version")


def _normalise(req: DeploymentRequest) -> dict[str, dict[str, Any]]:
    """Pipeline name -> raw spec dict with model refs as objects and `name` set."""
    items = (
        list(req.pipelines.items())
        if isinstance(req.pipelines, dict)
        else [(str(p.get("name", "")), p) for p in req.pipelines]
    )
    out: dict[str, dict[str, Any]] = {}
    for name, raw in items:
        spec = dict(raw)
        spec.setdefault("name", name)
        if spec["name"] != name or not name:
            raise ApiError(400, "bad_pipeline", f"pipeline {name!r}: name mismatch or missing")
        if name in out:
            raise ApiError(400, "bad_pipeline", f"pipeline {name!r} given twice")
        spec["model"] = _ref(spec.get("model"), "model", name)
        if spec.get("fallback") is not None:
            spec["fallback"] = _ref(spec["fallback"], "fallback", name)
        cascade = spec.get("cascade")
        if isinstance(cascade, dict) and cascade.get("model") is not None:
            spec["cascade"] = {**cascade, "model": _ref(cascade["model"], "cascade", name)}
        out[name] = spec
    return out


def _validated(specs: dict[str, dict[str, Any]]) -> dict[str, PipelineSpec]:
    out = {}
    for name, spec in specs.items():
        try:
            # A built-in stage's misspelt parameter, or a value it cannot use, is refused
            # here, before any device sees it (devices drop unknown names and log them).
            out[name] = PipelineSpec.model_validate(spec, context=STRICT_STAGE_PARAMS)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])  # empty for the whole spec
            message = str(first["msg"]).removeprefix("Value error, ")
            detail = f"{where}: {message}" if where else message
            raise ApiError(422, "invalid_pipeline", f"pipeline {name!r}: {detail}") from None
        if out[name].model.version is None:
            raise ApiError(400, "unpinned", f"pipeline {name!r}: model must pin a version")
    return out


def _travelling(spec: PipelineSpec) -> dict[str, Any]:
    """A spec as devices get it: what the operator set, not the defaults.

    An agent from before a field existed parses a spec that leaves it out (specs are
    strict), so upgrading the control plane first breaks no deployment; only one that
    uses a newer field needs newer agents (pre-flight names the devices whose agents
    reported they do not know it; an older one refuses it).
    """
    return spec.model_dump(mode="json", exclude_defaults=True)


def _preflight_view(spec: PipelineSpec) -> dict[str, Any]:
    """The shape `_preflight` reads: refs as `name@version` strings."""
    view: dict[str, Any] = {"model": spec.model.key}
    if spec.fallback is not None:
        view["fallback"] = spec.fallback.key
    if spec.cascade is not None and spec.cascade.model is not None:
        view["cascade"] = {"model": spec.cascade.model.key}
    view["postprocess"] = [
        {"name": step.type, "label_schema": step.params.get("label_schema")}
        for step in spec.postprocess
    ]
    view["terms"] = spec_terms(_travelling(spec))
    return view


def _models_for(plane: ControlPlane, specs: dict[str, PipelineSpec]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs.values():
        refs = [spec.model, spec.fallback, spec.cascade.model if spec.cascade else None]
        for ref in refs:
            if ref is None or ref.version is None:
                continue
            row = plane.store.get_model(ref.name, ref.version)
            if row is not None:
                rows[ref.key] = row
    return rows


def _check(
    plane: ControlPlane, req: DeploymentRequest, who: Principal
) -> tuple[str, dict[str, PipelineSpec], dict[str, dict[str, Any]], Any]:
    try:
        selector = str(parse_selector(req.selector))
    except SelectorError as exc:
        raise ApiError(400, "bad_selector", f"selector: {exc}") from None
    if not selector_in_scope(who.scope, selector):
        raise ApiError(
            403, "out_of_scope", f"selector {selector!r} reaches beyond the token's scope"
        )
    specs = _validated(_normalise(req))
    models = _models_for(plane, specs)
    rows = [
        r
        for r in plane.store.list_devices()
        if r["status"] == "active" and in_scope(who.scope, r["labels"])
    ]
    devices = device_views(plane, rows)
    result = preflight(
        selector,
        {name: _preflight_view(s) for name, s in specs.items()},
        {key: row["manifest"] for key, row in models.items()},
        devices,
    )
    return selector, specs, models, result


def dry_run(plane: ControlPlane, req: DeploymentRequest, who: Principal) -> dict[str, Any]:
    """What a create would do: matching devices, incompatible ones, conflicts."""
    _, _, _, result = _check(plane, req, who)
    return {
        "matching": result.matching,
        "incompatible": result.incompatible,
        "conflicts": result.conflicts,
        "ok": not result.conflicts,
    }


def _pin(spec: PipelineSpec, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ref(r: Any) -> dict[str, Any] | None:
        if r is None:
            return None
        row = models[r.key]
        if row["yanked"]:
            raise ApiError(409, "yanked", f"model {r.key} is yanked")
        if r.sha256 is not None and r.sha256 != row["sha256"]:
            raise ApiError(409, "digest_mismatch", f"model {r.key} has digest {row['sha256']}")
        return {
            "name": row["name"],
            "version": row["version"],
            "sha256": row["sha256"],
            "size": row["size"],
            "url": f"/device/v1/artifacts/{row['sha256']}",
        }

    pinned_spec = _travelling(spec)
    main = ref(spec.model)
    assert main is not None
    pinned_spec["model"] = {
        "name": main["name"],
        "version": main["version"],
        "sha256": main["sha256"],
    }
    fallback = ref(spec.fallback)
    if fallback is not None:
        pinned_spec["fallback"] = {k: fallback[k] for k in ("name", "version", "sha256")}
    cascade = ref(spec.cascade.model if spec.cascade else None)
    if cascade is not None:
        pinned_spec["cascade"]["model"] = {k: cascade[k] for k in ("name", "version", "sha256")}
    return {"model": main, "fallback": fallback, "cascade": cascade, "spec": pinned_spec}


def _prepare(
    plane: ControlPlane, req: DeploymentRequest, who: Principal
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The deployment row to store, and the matching devices that cannot run it."""
    selector, specs, models, result = _check(plane, req, who)
    if result.conflicts:
        raise ApiError(409, "preflight_conflict", "; ".join(result.conflicts))
    pipelines = {name: _pin(spec, models) for name, spec in sorted(specs.items())}
    ensure_json(pipelines, "pipelines")
    egress = egress_json(req.egress)
    body: dict[str, Any] = {"selector": selector, "priority": req.priority, "pipelines": pipelines}
    if egress is not None:  # absent from the hash when unset: older hashes stay valid
        body["egress"] = egress
    row = {
        "id": f"dep-{secrets.token_hex(6)}",
        "name": req.name,
        **body,
        "egress": egress,
        "content_hash": hashlib.sha256(digest(body).encode()).hexdigest(),
        "created_at": plane.clock(),
        "created_by": who.actor,
    }
    return row, result.incompatible


def create_deployment(
    plane: ControlPlane, req: DeploymentRequest, who: Principal
) -> tuple[dict[str, Any], bool]:
    """Create (idempotently by name and content) and recompute affected devices.

    The view also holds `incompatible`: the matching devices that cannot run it, with
    why (pre-flight's; they do not refuse the create), so nobody learns it from the
    devices' failures.
    """
    row, incompatible = _prepare(plane, req, who)
    try:
        stored, created = plane.store.create_deployment(row)
    except ConflictError as exc:
        plane.audit(
            who.actor,
            "deployment.create",
            f"deployment:{req.name}",
            digest(req.model_dump()),
            "refused: conflict",
        )
        raise ApiError(409, "conflict", str(exc)) from None
    if created:
        plane.audit(
            who.actor,
            "deployment.create",
            f"deployment:{stored['id']}",
            digest(req.model_dump()),
            "ok",
        )
    plane.recompute_all()
    return deployment_view(stored) | {"incompatible": incompatible}, created


def deployment_view(row: dict[str, Any]) -> dict[str, Any]:
    """The operator-facing shape of a deployment."""
    return {
        k: row[k]
        for k in ("id", "name", "selector", "priority", "pipelines", "created_at", "created_by")
    } | {"seq": row["seq"], "egress": row.get("egress")}


def visible_to(who: Principal, row: dict[str, Any]) -> bool:
    """Whether a scoped caller may see a deployment: it can reach a device in scope.

    The fleet-wide base layer is visible (it shapes the caller's devices); another
    site's deployment is not (its name, models and selector are that site's business).
    """
    return selector_overlaps_scope(who.scope, str(row["selector"]))


def visible_deployment(plane: ControlPlane, who: Principal, ref: str) -> dict[str, Any]:
    """A deployment row the caller may see (404 otherwise, so scope does not leak names)."""
    row = plane.store.get_deployment(ref)
    if row is None or not visible_to(who, row):
        raise ApiError(404, "not_found", f"no deployment {ref}")
    return row


def delete_deployment(plane: ControlPlane, ref: str, who: Principal) -> None:
    """Delete a deployment; matching devices fall back to the next layer."""
    row = visible_deployment(plane, who, ref)  # another site's: 404, as when reading it
    if not selector_in_scope(who.scope, row["selector"]):
        raise ApiError(403, "out_of_scope", "deployment reaches beyond the token's scope")
    plane.store.delete_deployment(row["id"])
    plane.audit(who.actor, "deployment.delete", f"deployment:{row['id']}", digest(ref), "ok")
    plane.recompute_all()


def _summary(content: dict[str, Any]) -> dict[str, str]:
    return {
        name: f"{p['model']['name']}@{p['model']['version']} ({p['deployment']})"
        for name, p in content["pipelines"].items()
    }


def diff_deployment(plane: ControlPlane, req: DeploymentRequest, who: Principal) -> dict[str, Any]:
    """Per device, how its pipelines would change if this deployment were created."""
    row, _ = _prepare(plane, req, who)
    current = plane.store.list_deployments()
    existing = next((d for d in current if d["name"] == req.name), None)
    proposed = [d for d in current if d["name"] != req.name]
    proposed.append(
        {
            **row,
            "id": existing["id"] if existing else "(new)",
            "seq": max([d["seq"] for d in current], default=0) + 1,
        }
    )
    changes: dict[str, Any] = {}
    for dev in plane.store.list_devices():
        if dev["status"] != "active" or not in_scope(who.scope, dev["labels"]):
            continue
        old = desired_content(current, dev["labels"], plane.settings.egress)
        new = desired_content(proposed, dev["labels"], plane.settings.egress)
        before, after = _summary(old), _summary(new)
        delta: dict[str, Any] = {
            name: {"from": before.get(name), "to": after.get(name)}
            for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name)
        }
        if old["egress"] != new["egress"]:
            delta["egress"] = {"from": old["egress"], "to": new["egress"]}
        if delta:
            changes[dev["id"]] = delta
    return {"devices_changed": len(changes), "changes": changes}
