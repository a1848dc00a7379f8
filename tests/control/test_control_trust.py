"""The fleet's signed trust root through the control plane: rotate and revoke publishers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import key_id, load_private_key
from edgewise.protocol import sign_trust_root, trust_root_document

from .conftest import Device, Plane

ROOT = Ed25519PrivateKey.generate()
NEW_PUBLISHER = Ed25519PrivateKey.generate()


def _root(
    version: int,
    publishers: list[Ed25519PrivateKey],
    signers: list[Ed25519PrivateKey] | None = None,
) -> dict[str, Any]:
    doc = trust_root_document(
        version, [ROOT.public_key()], 1, [k.public_key() for k in publishers], 1.7e9 + version
    )
    return sign_trust_root(doc, signers or [ROOT])


def _doc(dev: Device) -> dict[str, Any]:
    r = dev.get("/device/v1/desired")
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()["document"]
    return document


def test_a_trust_root_reaches_devices_and_governs_the_registry(
    plane: Plane, examples: dict[str, Any]
) -> None:
    p = plane
    p.deploy_digits(examples, "base", "site=a")
    dev = p.enroll(labels={"site": "a"})
    before = _doc(dev)
    assert "trust_roots" not in before  # documents read as before while there is none
    assert p.api("GET", "/api/v1/trust-root").json()["version"] == 0

    examples_key = load_private_key(Path(examples["key"]))
    v1 = _root(1, [examples_key])
    r = p.api("POST", "/api/v1/trust-root", json=v1)
    assert r.status_code == 201, r.text
    assert r.json()["publishers"] == {key_id(examples_key): examples["pub"]}
    doc = _doc(dev)
    assert doc["revision"] == before["revision"] + 1 and doc["trust_roots"] == [v1]
    again = p.api("POST", "/api/v1/trust-root", json=copy.deepcopy(v1))
    assert again.status_code == 200 and _doc(dev)["revision"] == doc["revision"]

    # Publishers are the trust root's now: the old way in is closed, and says which way.
    r = p.api("POST", "/api/v1/publisher-keys", json={"public_key": examples["pub"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "trust_root_managed"

    # v2 revokes the examples key: its bundles are refused, devices get v1 and v2.
    v2 = _root(2, [NEW_PUBLISHER])
    assert p.api("POST", "/api/v1/trust-root", json=v2).status_code == 201
    pushed = p.push(examples["bundles"]["digits-mlp@1.1.0"])
    assert pushed.status_code in (400, 403, 422), pushed.text
    assert [k["key_id"] for k in p.api("GET", "/api/v1/publisher-keys").json()] == [
        key_id(NEW_PUBLISHER)
    ]
    assert _doc(dev)["trust_roots"] == [v2]  # the newest: a device behind fetches the chain
    shown = p.api("GET", "/api/v1/trust-root").json()
    assert (shown["version"], list(shown["publishers"])) == (2, [key_id(NEW_PUBLISHER)])
    audit = p.api("GET", "/api/v1/audit").json()
    assert [a["action"] for a in audit if a["action"] == "trust_root.install"] == [
        "trust_root.install"
    ] * 2


def test_trust_roots_that_must_not_be_trusted_are_refused_and_change_nothing(
    plane: Plane, examples: dict[str, Any]
) -> None:
    p = plane
    p.deploy_digits(examples, "base", "site=a")
    dev = p.enroll(labels={"site": "a"})
    examples_key = load_private_key(Path(examples["key"]))
    v1, v2 = _root(1, [examples_key]), _root(2, [examples_key, NEW_PUBLISHER])
    assert p.api("POST", "/api/v1/trust-root", json=v1).status_code == 201
    assert p.api("POST", "/api/v1/trust-root", json=v2).status_code == 201
    doc = _doc(dev)
    attacker = Ed25519PrivateKey.generate()
    forged = sign_trust_root(
        trust_root_document(3, [attacker.public_key()], 1, [attacker.public_key()], 0), [attacker]
    )
    tampered = copy.deepcopy(v2)
    tampered["document"]["version"] = 3
    for body, why in [
        (v1, "older"),  # a replayed old version
        (_root(2, [NEW_PUBLISHER]), "other content"),
        (forged, "root keys of version 2"),  # a control-plane token alone cannot
        (tampered, "not signed"),
        (_root(3, [examples_key], signers=[attacker]), "not signed"),
        ({"document": {"type": "edgewise-trust-root"}, "signatures": []}, "version"),
    ]:
        r = p.api("POST", "/api/v1/trust-root", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_trust_root" and why in r.json()["error"]["message"]
    for body in [{"document": {}}, {"document": 1, "signatures": []}, [], {"x": 1}]:
        r = p.api("POST", "/api/v1/trust-root", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    viewer = p.token("viewer")
    r = p.api("POST", "/api/v1/trust-root", token=viewer, json=v2)
    assert r.status_code == 403
    assert p.api("GET", "/api/v1/trust-root").json()["version"] == 2
    assert _doc(dev) == doc


def test_the_trust_cli_signs_offline_checks_the_chain_and_pushes(
    live_server: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    from .test_control_cli import run

    keys = tmp_path / "keys"
    for name in ("root", "root2", "ci", "ci2"):
        assert run(capsys, "keys", "generate", name, "--dir", str(keys))[0] == 0
    k = {n: str(keys / n) for n in ("root", "root2", "ci", "ci2")}
    v1, v2 = tmp_path / "v1.json", tmp_path / "v2.json"
    pub, key = {n: f"{p}.pub" for n, p in k.items()}, {n: f"{p}.key" for n, p in k.items()}
    sign = ("trust", "sign", "--version")
    code, out, err = run(capsys, *sign, "1", "--publisher", pub["ci"],
                         "--sign-with", key["root"], "--out", str(v1))  # fmt: skip
    assert code == 0 and "trust root v1: 1 publisher key(s), 1 of 1 root key(s)" in out, err
    # Rotating the root to root2 alone, without the old root's signature: refused, unwritten.
    code, out, err = run(capsys, *sign, "2", "--publisher", pub["ci2"],
                         "--sign-with", key["root2"], "--previous", str(v1),
                         "--out", str(v2))  # fmt: skip
    assert code == 1 and "not written" in err and "root keys of version 1" in err
    assert not v2.exists() and "Traceback" not in err
    code, out, err = run(capsys, *sign, "2", "--publisher", pub["ci2"],
                         "--publisher", pub["ci"], "--root", pub["root2"],
                         "--sign-with", key["root"], "--sign-with", key["root2"],
                         "--previous", str(v1), "--out", str(v2), "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["root_keys"] == [key_id(load_private_key(keys / "root2.key"))]
    assert run(capsys, "trust", "verify", str(v2), "--previous", str(v1))[0] == 0
    code, _, err = run(capsys, "trust", "verify", str(v1), "--previous", str(v2))
    assert code == 1 and "refused: version 1 is older than 2" in err
    code, _, err = run(capsys, "trust", "verify", str(tmp_path / "nope.json"))
    assert code == 1 and "cannot read" in err

    server = ["--server", live_server["base"], "--token", live_server["admin"]]
    assert run(capsys, "trust", "push", str(v1), *server)[0] == 0
    code, out, err = run(capsys, "trust", "push", str(v2), *server)
    assert code == 0 and out.startswith("trust root v2"), err
    code, out, err = run(capsys, "trust", "show", *server)
    assert code == 0 and "trust root v2" in out, err
    code, _, err = run(capsys, "trust", "push", str(v1), *server)
    assert code == 1 and "older" in err and "Traceback" not in err


def test_the_console_shows_the_trust_root_and_models_no_trusted_key_signed(
    plane: Plane, examples: dict[str, Any]
) -> None:
    p = plane
    p.trust(examples["pub"])
    assert p.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
    dev = p.enroll(labels={"site": "a"})
    origin = str(p.client.base_url)
    r = p.client.post("/login", data={"token": p.admin, "next": "/"}, headers={"origin": origin})
    assert r.status_code in (200, 303), r.text
    page = p.client.get("/models").text
    assert "No signed trust root" in page and "signer not trusted" not in page
    assert p.api("POST", "/api/v1/trust-root", json=_root(1, [NEW_PUBLISHER])).status_code == 201
    dev.get("/device/v1/desired")  # (the device has not reported a trust version yet)
    page = p.client.get("/models").text
    assert "Version 1: devices install what these publisher keys signed" in page
    assert key_id(NEW_PUBLISHER) in page and "signer not trusted" in page  # 1.0.0's key
    assert "v0: 1" in page  # the one device has reported no trust root yet


def test_a_trust_root_nested_deep_is_a_400_not_a_500(plane: Plane) -> None:
    # The route re-serialised the body through pydantic, whose depth limit raised: 500.
    nested: Any = {}
    for _ in range(300):
        nested = {"x": nested}
    body = {"document": {"type": "edgewise-trust-root", "deep": nested}, "signatures": []}
    r = plane.api("POST", "/api/v1/trust-root", json=body)
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] in ("bad_trust_root", "invalid_request", "bad_json")
