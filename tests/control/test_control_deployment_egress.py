"""Egress policy per deployment: through the API into the matching devices' desired state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgewise.control import open_store
from edgewise.protocol import EgressPolicy

from .conftest import Device, Plane, make_plane

SERVER_DEFAULT = {"groups": ["events", "counts"], "redact": ["serial_number"]}
STRICT = {"groups": ["counts"], "redact": ["face", "plate"]}
CAPTURE = {"groups": ["counts", "samples"], "capture": {"enabled": True, "rate": 0.1}}


@pytest.fixture
def egress_plane(tmp_path: Path) -> Any:
    """A SQLite plane whose server setting gives a default egress policy."""
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    app, clock, settings = make_plane(store, tmp_path / "data", egress=SERVER_DEFAULT)
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Plane(client, admin, clock, settings)
    store.close()


def _setup(p: Plane, examples: dict[str, Any]) -> None:
    p.trust(examples["pub"])
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
        assert p.push(examples["bundles"][ref]).status_code == 201


def _egress(dev: Device) -> dict[str, Any]:
    r = dev.get("/device/v1/desired")
    assert r.status_code == 200, r.text
    return dict(r.json()["document"]["egress"])


def _full(policy: dict[str, Any]) -> dict[str, Any]:
    """A policy as the control plane stores and sends it: every default spelled out."""
    return EgressPolicy.model_validate(policy).model_dump(mode="json")


def _deploy(p: Plane, name: str, selector: str, priority: int, egress: Any = None) -> Any:
    body: dict[str, Any] = {
        "name": name,
        "selector": selector,
        "priority": priority,
        "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
    }
    if egress is not None:
        body["egress"] = egress
    return p.api("POST", "/api/v1/deployments", json=body)


def test_the_strongest_matching_deployment_with_a_policy_wins_else_the_server_default(
    egress_plane: Plane, examples: dict[str, Any]
) -> None:
    p = egress_plane
    _setup(p, examples)
    a = p.enroll(labels={"site": "a"})
    b = p.enroll(labels={"site": "b"})
    assert _egress(a) == SERVER_DEFAULT  # nothing deployed: the server's default
    assert _deploy(p, "base", "", 0).status_code == 201  # sets no policy
    assert _egress(a) == SERVER_DEFAULT
    pilot = _deploy(p, "pilot", "site=a", 10, STRICT)
    assert pilot.status_code == 201 and pilot.json()["egress"] == _full(STRICT)
    assert _deploy(p, "top", "site=a", 20).status_code == 201  # stronger, but sets none
    assert _egress(a) == _full(STRICT)
    assert _egress(b) == SERVER_DEFAULT
    assert _deploy(p, "fleet", "", 5, CAPTURE).status_code == 201
    assert _egress(a) == _full(STRICT)  # 10 beats 5
    assert _egress(b) == _full(CAPTURE)
    assert EgressPolicy.from_desired(_egress(b)).allows("samples")  # what the agent reads
    assert p.api("GET", "/api/v1/deployments/pilot").json()["egress"] == _full(STRICT)
    assert p.api("DELETE", "/api/v1/deployments/pilot").status_code == 200
    assert _egress(a) == _full(CAPTURE)
    assert p.api("DELETE", "/api/v1/deployments/fleet").status_code == 200
    assert _egress(a) == SERVER_DEFAULT


def test_revisions_carry_the_policy_and_promotion_applies_it(
    egress_plane: Plane, examples: dict[str, Any]
) -> None:
    p = egress_plane
    _setup(p, examples)
    dev = p.enroll(labels={"site": "a"})
    assert _deploy(p, "base", "", 0, STRICT).status_code == 201
    path = "/api/v1/deployments/base/revisions"
    pipes = {"digits": {"model": "digits-mlp@1.0.0"}}
    r = p.api("POST", path, json={"pipelines": pipes, "egress": CAPTURE})
    assert r.status_code == 201 and r.json()["revision"] == 2
    assert _egress(dev) == _full(STRICT)  # not promoted: devices keep the stable revision
    r = p.api("POST", path, json={"pipelines": pipes, "egress": CAPTURE, "promote": True})
    assert r.status_code == 200  # same content as revision 2: no new revision
    newer = {"digits": {"model": "digits-mlp@1.1.0"}}
    r = p.api("POST", path, json={"pipelines": newer, "promote": True})  # no egress: kept
    assert r.status_code == 201 and r.json()["egress"] == _full(CAPTURE)
    assert _egress(dev) == _full(CAPTURE)
    r = p.api("POST", path, json={"pipelines": newer, "egress": None, "promote": True})
    assert r.status_code == 201 and r.json()["egress"] is None
    assert _egress(dev) == SERVER_DEFAULT
    history = p.api("GET", path).json()["revisions"]
    assert [h["egress"] for h in history] == [
        _full(STRICT),
        _full(CAPTURE),
        _full(CAPTURE),
        None,
    ]


@pytest.mark.parametrize(
    "egress",
    [
        {"groups": ["bogus"]},
        {"redact": [""]},
        {"capture": {"enabled": True, "rate": 2.0}},
        {"unknown": 1},
        "counts",
    ],
)
def test_a_bad_policy_is_refused_with_4xx(
    egress_plane: Plane, examples: dict[str, Any], egress: Any
) -> None:
    p = egress_plane
    _setup(p, examples)
    r = _deploy(p, "x", "", 0, egress)
    assert r.status_code == 422 and "error" in r.json(), r.text
    assert _deploy(p, "x", "", 0).status_code == 201
    r = p.api(
        "POST",
        "/api/v1/deployments/x/revisions",
        json={"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}, "egress": egress},
    )
    assert r.status_code == 422 and "error" in r.json(), r.text
    assert len(p.api("GET", "/api/v1/deployments/x/revisions").json()["revisions"]) == 1


def test_cli_create_and_update_carry_the_policy(
    live_server: dict[str, Any],
    examples: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from .test_control_cli import run

    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    assert run(capsys, "server", "trust-key", str(examples["dir"] / "examples.pub"), *conn)[0] == 0
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
        assert run(capsys, "model", "push", str(examples["bundles"][ref]), *conn)[0] == 0
    pipe = ["-p", "digits=digits-mlp@1.0.0"]
    code, _, err = run(capsys, "deploy", "create", "--name", "b", *pipe, "--egress", "{", *conn)
    assert code == 1 and "--egress is not valid JSON" in err
    code, out, err = run(
        capsys, "deploy", "create", "--name", "b", *pipe, "--egress", '{"groups": ["x"]}', *conn
    )
    assert code == 1 and "422" in err and "Traceback" not in err
    code, out, _ = run(
        capsys, "deploy", "create", "--name", "b", *pipe, "--egress", json.dumps(STRICT), *conn
    )
    assert code == 0 and '"redact": ["face", "plate"]' in out
    policy = tmp_path / "egress.json"
    policy.write_text(json.dumps(CAPTURE))
    code, out, _ = run(
        capsys,
        "deploy",
        "update",
        "b",
        "-p",
        "digits=digits-mlp@1.1.0",
        "--egress",
        str(policy),
        "--json",
        *conn,
    )
    assert code == 0 and json.loads(out)["egress"] == _full(CAPTURE)
    code, out, _ = run(
        capsys, "deploy", "update", "b", "-p", "digits=digits-mlp@1.0.0", "--json", *conn
    )
    assert code == 0 and json.loads(out)["egress"] == _full(CAPTURE)  # kept
    code, out, _ = run(
        capsys, "deploy", "update", "b", *pipe, "--egress", "none", "--promote", "--json", *conn
    )
    assert code == 0 and json.loads(out)["egress"] is None
