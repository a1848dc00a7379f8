"""Refusals against real processes: bad desired states, failed health checks, no disk."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import canonical_json
from edgewise.protocol import SignedDesiredState, sign_desired

from ._harness import AgentProc, ControlPlaneProc, TamperProxy, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(shared_cp: ControlPlaneProc) -> Iterator[TamperProxy]:
    p = TamperProxy(shared_cp.url)
    try:
        yield p
    finally:
        p.close()


def _pipeline(cp: ControlPlaneProc, dev: str) -> dict:  # type: ignore[type-arg]
    return cp.device(dev).get("pipelines", {}).get("digits") or {}


def _active(cp: ControlPlaneProc, dev: str, version: str) -> bool:
    p = _pipeline(cp, dev)
    return p.get("status") == "active" and p.get("version") == version


def test_replayed_expired_and_foreign_desired_states_are_refused_and_reported(
    shared_cp: ControlPlaneProc,
    proxy: TamperProxy,
    agent_factory: Callable[..., AgentProc],
) -> None:
    cp = shared_cp
    agent = agent_factory(cp, "dev", server=proxy.url)
    try:
        agent.start()
        agent.wait_up()
        dev = agent.device_id()
        cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
        wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
        old = SignedDesiredState.model_validate_json(proxy.last_desired or b"")
        cp.deploy("digits-int8", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
        wait_for(lambda: _active(cp, dev, "1.1.0"), 90, "1.1.0 active")
        current = SignedDesiredState.model_validate_json(proxy.last_desired or b"")
        assert current.document.revision > old.document.revision

        from edgewise.control._identity import load_or_create_signing_key

        cp_key = load_or_create_signing_key(cp.data)
        newer = current.document.model_copy(update={"revision": current.document.revision + 5})
        expired = newer.model_copy(update={"expires_at": time.time() - 10})
        cases = {
            "stale revision": old,
            "unknown signer": sign_desired(newer, Ed25519PrivateKey.generate()),
            "bad signature": sign_desired(newer, Ed25519PrivateKey.generate(), current.key_id),
            "expired": sign_desired(expired, cp_key),
        }
        for reason, signed in cases.items():
            proxy.replace = (signed.model_dump_json().encode(), f'"{signed.document.revision}"')
            wanted = f"desired state refused: {reason}"
            wait_for(lambda w=wanted: w in cp.device(dev)["errors"], 60, wanted)
            assert agent.infer()["model"].startswith("digits-mlp@1.1.0")
        proxy.replace = None
        assert json.loads(json.dumps(agent.status()))["revision"] == current.document.revision
    finally:
        agent.kill()


def _events(cp: ControlPlaneProc, dev: str, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with sqlite3.connect(cp.data / "edgewise.db") as db:
        rows = db.execute(
            "SELECT data FROM telemetry WHERE device_id = ? AND kind = ? ORDER BY seq",
            (dev, kind),
        ).fetchall()
    return [json.loads(data) for (data,) in rows]


def test_a_newer_control_planes_document_is_followed_unless_it_marks_an_unknown_field_critical(
    shared_cp: ControlPlaneProc,
    proxy: TamperProxy,
    agent_factory: Callable[..., AgentProc],
) -> None:
    from edgewise.control._identity import load_or_create_signing_key

    cp = shared_cp
    cp_key = load_or_create_signing_key(cp.data)
    agent = agent_factory(cp, "dev", server=proxy.url)

    def send(document: dict, tamper: Callable[[dict], None] | None = None) -> None:  # type: ignore[type-arg]
        signature = base64.b64encode(cp_key.sign(canonical_json(document))).decode()
        body = {"document": document, "key_id": current.key_id, "signature": signature}
        if tamper is not None:
            tamper(body["document"])
        proxy.replace = (json.dumps(body).encode(), f'"{document["revision"]}"')

    try:
        agent.start()
        agent.wait_up()
        dev = agent.device_id()
        cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
        wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
        current = SignedDesiredState.model_validate_json(proxy.last_desired or b"")
        # What a later control plane might add: a field at the top, in a pipeline and in
        # a model reference. This agent reads past them and keeps following.
        newer = current.signed_document()
        newer["revision"] += 5
        newer["quota"] = {"gb": 3}
        newer["pipelines"]["digits"]["window"] = "night"
        newer["pipelines"]["digits"]["model"]["encryption"] = "aes-gcm"
        send(newer)
        wait_for(lambda: agent.status()["revision"] == newer["revision"], 60, "newer accepted")
        accepted = wait_for(
            lambda: [
                e
                for e in _events(cp, dev, "desired.accepted")
                if e["revision"] == newer["revision"]
            ],
            60,
            "accepted event",
        )
        assert accepted == [
            {
                "revision": newer["revision"],
                "ignored": ["pipelines.model.encryption", "pipelines.window", "quota"],
            }
        ]
        assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
        # Kept as signed: after a restart it is read back and the same document is a no-op.
        agent.kill()
        agent.start()
        agent.wait_up()
        assert agent.status()["revision"] == newer["revision"]
        assert agent.infer()["model"].startswith("digits-mlp@1.0.0")

        critical = {**newer, "revision": newer["revision"] + 1, "critical": ["quota"]}
        send(critical)
        wanted = "desired state refused: needs a newer agent: this agent does not know quota"
        wait_for(lambda: wanted in cp.device(dev)["errors"], 60, wanted)
        assert agent.status()["revision"] == newer["revision"]
        assert agent.infer()["model"].startswith("digits-mlp@1.0.0")

        send({**newer, "revision": newer["revision"] + 2}, lambda doc: doc["quota"].update(gb=300))
        wanted = "desired state refused: bad signature"
        wait_for(lambda: wanted in cp.device(dev)["errors"], 60, wanted)
        assert agent.status()["revision"] == newer["revision"]
        assert agent.infer()["model"].startswith("digits-mlp@1.0.0")

        # Not a signed document at all: refused and reported, not an agent error.
        proxy.replace = (b'{"document": {"revision": "x"}}', '"x"')
        wanted = "desired state refused: malformed: document."
        wait_for(lambda: any(e.startswith(wanted) for e in cp.device(dev)["errors"]), 60, wanted)
        assert not [e for e in cp.device(dev)["errors"] if e.startswith("agent error")]
        # Answered again and again (this proxy does not hold the long-poll): said once.
        refused = wait_for(
            lambda: (r := _events(cp, dev, "desired.refused"))[2:] and r, 60, "refused events"
        )
        assert [e["reason"] for e in refused] == [
            "needs a newer agent",
            "bad signature",
            "malformed",
        ]
        assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
    finally:
        proxy.replace = None
        agent.kill()


def test_bundle_failing_its_health_check_is_never_switched_to(
    shared_cp: ControlPlaneProc,
    agent_factory: Callable[..., AgentProc],
    example_bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    from edgewise.bundle import extract, load_public_key, pack, read_manifest, sign

    cp = shared_cp
    # A correctly signed bundle whose health samples expect the wrong outputs.
    src = tmp_path / "bad"

    extract(example_bundles["digits-mlp@1.1.0"], src, [load_public_key(example_bundles["_pub"])])
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = "1.2.0"
    for sample in manifest["health"]["samples"]:
        for name, value in sample["expected"].items():
            if name == "label":
                sample["expected"][name] = [(int(v) + 1) % 10 for v in value]
    (src / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "digits-mlp-1.2.0.ewb"
    pack(src, out)
    sign(out, example_bundles["_pub"].with_suffix(".key"))
    assert read_manifest(out).version == "1.2.0"
    cp.push(out)

    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
    cp.deploy("digits-bad", "digits-mlp@1.2.0", priority=10, tag=agent.tag)
    wait_for(lambda: _pipeline(cp, dev).get("status") == "failed", 90, "failed reported")
    p = _pipeline(cp, dev)
    assert p["reason"].startswith("health check failed"), p["reason"]
    assert p["version"] == "1.2.0"
    assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
    assert agent.status()["pipelines"]["digits"]["version"] == "1.0.0"


def test_install_that_would_not_fit_is_refused_before_download(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent = agent_factory(cp, "dev", "--disk-reserve-mb", str(10**9))
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _pipeline(cp, dev).get("status") == "failed", 90, "failed reported")
    assert _pipeline(cp, dev)["reason"].startswith("insufficient disk")
    cache = agent.data / "cache"
    assert not list(cache.glob("*.part")) and not list(cache.glob("*.ewb"))
