"""The device side of the signed trust root: publishers added and revoked after enrollment."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent._identity import Identity, load_identity, save_identity
from edgewise.agent._trust import TRUST_FILE, TrustKeeper
from edgewise.bundle import key_id, load_private_key, pack, public_key_to_b64, sign
from edgewise.protocol import sign_trust_root, trust_root_document

from ._harness import AgentProc, ControlPlaneProc, wait_for

ROOT, ATTACKER = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def _root(
    version: int, publishers: list[Ed25519PrivateKey], signer: Ed25519PrivateKey = ROOT
) -> dict[str, Any]:
    root_key = signer.public_key()
    pubs = [k.public_key() for k in publishers]
    return sign_trust_root(trust_root_document(version, [root_key], 1, pubs, 0.0), [signer])


# -- the keeper, on real files ---------------------------------------------------------


def test_the_keeper_advances_persists_and_refuses_a_forged_link(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    identity = Identity(
        "dev-1", "http://127.0.0.1:9", {key_id(old): public_key_to_b64(old.public_key())}
    )
    save_identity(tmp_path, identity)
    keeper = TrustKeeper(tmp_path)
    v1, v2 = _root(1, [old, new]), _root(2, [new])
    change = keeper.advance([v1, v2], identity)
    assert change is not None and (change.version, change.previous, change.problem) == (2, 0, "")
    assert change.added == (key_id(new),) and change.removed == (key_id(old),)
    assert set(identity.publishers) == {key_id(new)}  # old revoked by v2
    assert keeper.advance([v1, v2], identity) is None  # the same chain again: nothing
    # A restart reads both back: the trust root and the publishers it set.
    again = TrustKeeper(tmp_path)
    stored = load_identity(tmp_path)
    assert again.version == 2 and stored is not None and set(stored.publishers) == {key_id(new)}
    forged = _root(3, [ATTACKER], signer=ATTACKER)
    change = again.advance([v1, v2, forged], stored)
    assert change is not None and change.version == 2 and "root keys of version 2" in change.problem
    assert set(stored.publishers) == {key_id(new)}


def test_a_trust_file_that_does_not_verify_is_no_trust_root(tmp_path: Path) -> None:
    keeper = TrustKeeper(tmp_path)
    identity = Identity("dev-1", "http://127.0.0.1:9")
    keeper.advance([_root(1, [ROOT])], identity)
    raw = json.loads((tmp_path / TRUST_FILE).read_text())
    raw["doc"]["document"]["publishers"] = {}  # edited on the device's disk
    (tmp_path / TRUST_FILE).write_text(json.dumps(raw))
    (tmp_path / f"{TRUST_FILE}.prev").unlink(missing_ok=True)
    assert TrustKeeper(tmp_path).version == 0


# -- end to end: a real control plane and a real agent -------------------------------------


def _signed_only_by(bundle: Path, key: Ed25519PrivateKey, version: str, out: Path) -> Path:
    """`bundle` as another version, packed afresh and signed by `key` alone."""
    src = out.parent / f"src-{version}"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(src)
    shutil.rmtree(src / "signatures", ignore_errors=True)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = version
    (src / "manifest.json").write_text(json.dumps(manifest))
    pack(src, out)
    sign(out, key)
    return out


def _running(
    cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc], bundles: dict[str, Path]
) -> tuple[AgentProc, str, Ed25519PrivateKey]:
    """A started agent, its device id, and the key that signed the example bundles."""
    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    return agent, agent.device_id(), load_private_key(bundles["_pub"].with_suffix(".key"))


def _pipeline(cp: ControlPlaneProc, dev: str) -> dict[str, Any]:
    return dict(cp.device(dev).get("pipelines", {}).get("digits") or {})


@pytest.mark.slow
def test_a_publisher_added_after_enrollment_installs_and_a_revoked_one_does_not(
    control_plane: ControlPlaneProc,
    agent_factory: Callable[..., AgentProc],
    example_bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    cp = control_plane
    agent, dev, examples_key = _running(cp, agent_factory, example_bundles)
    ci = Ed25519PrivateKey.generate()
    newer = _signed_only_by(
        example_bundles["digits-mlp@1.1.0"], ci, "1.2.0", tmp_path / "digits-mlp-1.2.0.ewb"
    )

    def refused() -> bool:
        p = _pipeline(cp, dev)
        return p.get("status") == "failed" and "no signature by a trusted key" in p["reason"]

    # A CI key the registry trusts, but the device enrolled trusting the examples key
    # alone: before trust roots, it could never install what CI signed.
    ci_b64 = public_key_to_b64(ci.public_key())
    cp.api("POST", "/publisher-keys", json={"public_key": ci_b64, "name": "ci"})
    cp.push(newer)
    cp.deploy("digits", "digits-mlp@1.2.0", tag=agent.tag)
    wait_for(refused, 90, "1.2.0 refused: the device does not trust the CI key")
    # v1 adds the CI key: the device takes it and tries the refused install again.
    cp.api("POST", "/trust-root", json=_root(1, [examples_key, ci]))
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 1, 60, "v1 on the device")
    wait_for(lambda: _pipeline(cp, dev).get("status") == "active", 90, "1.2.0 active")
    assert agent.infer()["model"].startswith("digits-mlp@1.2.0")

    # v2 revokes the examples key: a model it signed no longer installs on the device,
    # even one the registry took before, and the running model keeps serving.
    cp.api("POST", "/trust-root", json=_root(2, [ci]))
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 2, 60, "v2 on the device")
    cp.deploy("pinned", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
    wait_for(refused, 90, "1.1.0 refused: its only signer is revoked")
    assert agent.infer()["model"].startswith("digits-mlp@1.2.0")
    shown = cp.api("GET", "/trust-root")
    assert shown["version"] == 2 and shown["devices"] == {"2": 1}
    identity = json.loads((agent.data / "identity.json").read_text())["doc"]
    assert list(identity["publishers"]) == [key_id(ci)]


@pytest.mark.slow
def test_a_lost_control_plane_key_is_replaced_without_touching_a_device(
    control_plane: ControlPlaneProc,
    agent_factory: Callable[..., AgentProc],
    example_bundles: dict[str, Path],
) -> None:
    # Before: a control plane that lost its signing key (a data directory restored
    # without it, a key rotated after a theft) was refused by every device for good
    # ("unknown signer"): each had to be re-enrolled by hand.
    cp = control_plane
    agent, dev, examples_key = _running(cp, agent_factory, example_bundles)
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _pipeline(cp, dev).get("status") == "active", 90, "1.0.0 active")
    cp.api("POST", "/trust-root", json=_root(1, [examples_key]))
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 1, 60, "v1 on the device")

    cp.stop()
    new_key = Ed25519PrivateKey.generate()
    (cp.data / "control-plane.key").write_bytes(
        new_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cp.start()
    # The root key holder names the new control-plane key; the device, refusing the
    # new signer, fetches the trust root itself and checks it against its root key.
    v2 = sign_trust_root(
        trust_root_document(
            2, [ROOT.public_key()], 1, [examples_key.public_key()], 0.0,
            control_plane=[new_key.public_key()],
        ),
        [ROOT],
    )  # fmt: skip
    cp.api("POST", "/trust-root", json=v2)
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 2, 90, "v2 on the device")
    cp.deploy("newer", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
    wait_for(lambda: _pipeline(cp, dev).get("version") == "1.1.0", 90, "1.1.0 reported")
    wait_for(lambda: _pipeline(cp, dev).get("status") == "active", 90, "1.1.0 active")
    identity = json.loads((agent.data / "identity.json").read_text())["doc"]
    assert list(identity["control_plane"]) == [key_id(new_key)]
    # A trust root that would lock every device out is refused at the control plane.
    locked = sign_trust_root(
        trust_root_document(
            3, [ROOT.public_key()], 1, [examples_key.public_key()], 0.0,
            control_plane=[ATTACKER.public_key()],
        ),
        [ROOT],
    )  # fmt: skip
    r = httpx.post(cp.url + "/api/v1/trust-root", headers=cp.auth, json=locked, timeout=30)
    assert r.status_code == 400 and "lock every device out" in r.json()["error"]["message"]


@pytest.mark.slow
def test_a_device_off_through_a_root_rotation_walks_the_chain_when_back(
    control_plane: ControlPlaneProc,
    agent_factory: Callable[..., AgentProc],
    example_bundles: dict[str, Path],
) -> None:
    # Documents carry the newest version only; a device whose root keys did not sign it
    # fetches the chain and walks it, each link checked by the one before.
    cp = control_plane
    agent, dev, examples_key = _running(cp, agent_factory, example_bundles)
    cp.api("POST", "/trust-root", json=_root(1, [examples_key]))
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 1, 60, "v1 on the device")
    agent.kill()
    root2, ci = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pubs = [examples_key.public_key(), ci.public_key()]
    v2 = sign_trust_root(
        trust_root_document(2, [root2.public_key()], 1, pubs[:1], 0.0), [ROOT, root2]
    )
    v3 = sign_trust_root(trust_root_document(3, [root2.public_key()], 1, pubs, 0.0), [root2])
    cp.api("POST", "/trust-root", json=v2)
    cp.api("POST", "/trust-root", json=v3)
    agent.token = None
    agent.start()
    agent.wait_up()
    wait_for(lambda: cp.device(dev)["agent"].get("trust_version") == 3, 90, "v3 on the device")
    identity = json.loads((agent.data / "identity.json").read_text())["doc"]
    assert set(identity["publishers"]) == {key_id(examples_key), key_id(ci)}
    assert not [e for e in agent.status()["errors"] if e.startswith("trust root")]
