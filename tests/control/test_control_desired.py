"""Desired-state fetches: ETag, the fast 304 path, replay refusal, re-signing near expiry."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.bundle import public_key_from_b64
from edgewise.protocol import DesiredStateError, SignedDesiredState, verify_desired

from .conftest import Plane


def _trust(p: Plane) -> dict[str, Ed25519PublicKey]:
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    return {plane.key_id: plane.public_key}


def test_document_verifies_against_the_trust_root(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    dev = p.enroll()
    r = dev.get("/device/v1/desired")
    assert r.headers["etag"] == '"1"'
    signed = SignedDesiredState.model_validate_json(r.content)
    doc = verify_desired(signed, _trust(p), p.clock(), None)
    assert doc.device_id == dev.id and doc.expires_at > p.clock()


def test_unchanged_poll_is_a_304_and_its_replay_is_refused(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    dev = p.enroll()
    dev.get("/device/v1/desired")  # loads the device into the cache
    headers = {**dev.headers("GET", "/device/v1/desired"), "if-none-match": '"1"'}
    first = p.client.get("/device/v1/desired", headers=headers)
    assert first.status_code == 304 and first.headers["etag"] == '"1"'
    replay = p.client.get("/device/v1/desired", headers=headers)
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "replayed_nonce"


def test_bad_signature_on_the_poll_path_is_refused(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    dev = p.enroll()
    dev.get("/device/v1/desired")
    headers = {**dev.headers("GET", "/device/v1/desired"), "if-none-match": '"1"'}
    headers["X-Edgewise-Device"] = p.enroll().id
    r = p.client.get("/device/v1/desired", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"


def test_document_is_resigned_past_half_its_lifetime_without_a_new_revision(
    sqlite_plane: Plane,
) -> None:
    p = sqlite_plane
    dev = p.enroll()
    before = dev.get("/device/v1/desired").json()["document"]
    p.clock.now += p.settings.desired_ttl_s * 0.6
    r = dev.get("/device/v1/desired", **{"if-none-match": '"1"'})
    assert r.status_code == 200
    after = r.json()["document"]
    assert after["revision"] == before["revision"]
    assert after["expires_at"] > before["expires_at"]
    doc = verify_desired(
        SignedDesiredState.model_validate(r.json()),
        _trust(p),
        p.clock(),
        1,
        last_document=SignedDesiredState.model_validate(
            {"document": before, "key_id": "k", "signature": ""}
        ).document,
    )
    assert doc.revision == 1
    assert dev.get("/device/v1/desired", **{"if-none-match": '"1"'}).status_code == 304


def test_a_resign_keeps_the_fields_a_newer_replica_wrote(sqlite_plane: Plane) -> None:
    # A newer control-plane replica stored this revision with a field this build lacks;
    # re-signing it near expiry must change the times only, or the revision's content
    # changes under the agents that accepted it.
    from sqlalchemy import update

    from edgewise.bundle import canonical_json
    from edgewise.control._schema import devices
    from edgewise.protocol import ignored_fields

    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    dev = p.enroll()
    document = dev.get("/device/v1/desired").json()["document"]
    document["quota"] = {"max_rps": 5}
    document["critical"] = ["quota"]
    signature = base64.b64encode(plane.key.sign(canonical_json(document))).decode()
    newer = {"document": document, "key_id": plane.key_id, "signature": signature}
    with plane.store.engine.begin() as c:
        c.execute(update(devices).where(devices.c.id == dev.id).values(desired_signed=newer))
    plane.cache.drop(dev.id)
    p.clock.now += p.settings.desired_ttl_s * 0.6
    r = dev.get("/device/v1/desired", **{"if-none-match": '"1"'})
    assert r.status_code == 200
    signed = SignedDesiredState.model_validate(r.json())
    after = signed.signed_document()
    assert after["expires_at"] > document["expires_at"]
    assert {k: v for k, v in after.items() if k not in ("issued_at", "expires_at")} == {
        k: v for k, v in document.items() if k not in ("issued_at", "expires_at")
    }
    assert ignored_fields(after) == ["quota"]
    # Signed over what it holds: an agent that knows `quota` would take it; this one
    # (which does not) refuses it for that, not for a bad signature.
    with pytest.raises(DesiredStateError) as refused:
        verify_desired(signed, _trust(p), p.clock(), 1)
    assert (refused.value.reason, refused.value.detail) == (
        "needs a newer agent",
        "this agent does not know quota",
    )


def test_trust_root_names_the_signing_key(sqlite_plane: Plane, examples: dict[str, Any]) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .conftest import pubkey_b64

    tok = p.api("POST", "/api/v1/enroll-tokens", json={}).json()["token"]
    body = p.client.post(
        "/device/v1/enroll",
        json={"token": tok, "public_key": pubkey_b64(Ed25519PrivateKey.generate())},
    ).json()
    ((kid, b64),) = body["trust_root"]["control_plane"].items()
    assert kid in _trust(p)
    assert public_key_from_b64(b64) is not None
    assert len(body["trust_root"]["publishers"]) == 1


def test_bad_wait_values_are_client_errors(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    for q in ("wait=-1", "wait=abc", "wait=1e9"):
        r = dev.get(f"/device/v1/desired?{q}")
        assert 400 <= r.status_code < 500 and "error" in r.json(), q
