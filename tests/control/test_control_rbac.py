"""RBAC matrix: every operator route x every role, plus bad and scoped tokens."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.control import ROLE_PERMISSIONS, Permission, Role, open_store
from edgewise.control._api_admin import ROUTE_PERMISSIONS

from .conftest import Plane, TestClient, make_plane

ROLES = [r.value for r in Role]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, examples: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("rbac")
    store = open_store(f"sqlite:///{tmp / 'cp.db'}")
    app, clock, settings = make_plane(store, tmp / "data")
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        p = Plane(client, admin, clock, settings)
        p.trust(examples["pub"])
        assert p.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
        assert p.push(examples["bundles"]["digits-logreg@1.0.0"]).status_code == 201
        tokens = {role: p.token(role, name=role) for role in ROLES}
        revoked = p.token("admin", name="gone")
        rid = revoked.split("_")[1]
        assert p.api("DELETE", f"/api/v1/tokens/{rid}").status_code == 200
        tokens["revoked"] = revoked
        tokens["malformed"] = "not-a-token"
        dev = p.enroll(labels={"site": "store-12"})
        other = p.enroll(labels={"site": "store-99"})
        tokens["scoped"] = p.token("operator", scope="site=store-12", name="scoped")
        r = p.api(
            "POST",
            "/api/v1/deployments",
            json={"name": "base", "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}},
        )
        assert r.status_code == 201, r.text
        yield {
            "p": p,
            "tokens": tokens,
            "device": dev.id,
            "other": other.id,
            "bundle": examples["bundles"]["digits-mlp@1.0.0"],
            "app": app,
        }
    store.close()


def _request(world: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    values = {
        "device_id": world["device"],
        "token_id": "nonexistent",
        "name": "digits-mlp",
        "version": "1.0.0",
        "ref": "no-such-deployment",
        "rollout_id": "no-such-rollout",
    }
    url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
    bodies: dict[str, Any] = {
        "/api/v1/tokens": {"json": {"name": "x", "role": "viewer"}},
        "/api/v1/publisher-keys": {"json": {"public_key": "A" * 43 + "=", "name": "k"}},
        "/api/v1/enroll-tokens": {"json": {"labels": {"site": "store-12"}}},
        "/api/v1/devices/{device_id}/labels": {"json": {"set": {"x": "y"}}},
        "/api/v1/models": {
            "content": Path(world["bundle"]).read_bytes(),
            "headers": {"content-type": "application/octet-stream"},
        },
    }
    deployment = {
        "json": {
            "name": "rbac",
            "selector": "site=store-12",
            "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
        }
    }
    for p in ("/api/v1/deployments", "/api/v1/deployments/dry-run", "/api/v1/deployments/diff"):
        bodies[p] = deployment
    return url, (bodies.get(path, {}) if method in {"POST", "PUT", "PATCH"} else {})


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_PERMISSIONS))
@pytest.mark.parametrize("who", [*ROLES, "none", "malformed", "revoked"])
def test_route_allows_exactly_the_roles_that_hold_its_permission(
    world: dict[str, Any], method: str, path: str, who: str
) -> None:
    p: Plane = world["p"]
    url, kw = _request(world, method, path)
    headers = dict(kw.pop("headers", {}))
    if who != "none":
        headers["authorization"] = f"Bearer {world['tokens'][who]}"
    r = p.client.request(method, url, headers=headers, **kw)
    permission = ROUTE_PERMISSIONS[(method, path)]
    if who in {"none", "malformed", "revoked"}:
        assert r.status_code == 401, r.text
    elif permission in ROLE_PERMISSIONS[Role(who)]:
        assert r.status_code not in {401, 403}, r.text
        assert r.status_code < 500, r.text
    else:
        assert r.status_code == 403, r.text
    assert "error" in r.json() if r.status_code >= 400 else True


def test_every_route_is_in_the_matrix(world: dict[str, Any]) -> None:
    app = world["app"]
    api_routes = {
        (m.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        if path.startswith("/api/v1")
        for m in ops
    }
    assert api_routes == set(ROUTE_PERMISSIONS)
    assert set(ROUTE_PERMISSIONS.values()) <= set(Permission)


def test_scoped_operator_cannot_deploy_beyond_its_scope(world: dict[str, Any]) -> None:
    p: Plane = world["p"]
    tok = world["tokens"]["scoped"]
    body = {
        "name": "wide",
        "selector": "site in (store-12,store-99)",
        "pipelines": {"digits": {"model": "digits-logreg@1.0.0"}},
    }
    r = p.api("POST", "/api/v1/deployments", token=tok, json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "out_of_scope"
    r = p.api(
        "POST",
        "/api/v1/deployments",
        token=tok,
        json={**body, "name": "everything", "selector": ""},
    )
    assert r.status_code == 403
    r = p.api(
        "POST",
        "/api/v1/deployments",
        token=tok,
        json={**body, "name": "narrow", "selector": "site=store-12,hw=x"},
    )
    assert r.status_code == 201, r.text


def test_scoped_operator_sees_and_touches_only_its_devices(world: dict[str, Any]) -> None:
    p: Plane = world["p"]
    tok = world["tokens"]["scoped"]
    listed = {d["id"] for d in p.api("GET", "/api/v1/devices", token=tok).json()}
    assert world["device"] in listed and world["other"] not in listed
    assert p.api("GET", f"/api/v1/devices/{world['other']}", token=tok).status_code == 404
    r = p.api("POST", f"/api/v1/devices/{world['other']}/decommission", token=tok)
    assert r.status_code == 404
    r = p.api(
        "POST",
        f"/api/v1/devices/{world['device']}/labels",
        token=tok,
        json={"set": {"site": "store-99"}},
    )
    assert r.status_code == 403
    r = p.api("POST", "/api/v1/enroll-tokens", token=tok, json={"labels": {"site": "store-99"}})
    assert r.status_code == 403
    r = p.api("DELETE", "/api/v1/deployments/base", token=tok)
    assert r.status_code == 403
