"""The device cache after a change: woken long-polls answer from memory, never stale."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.control._live import CachedDevice, DeviceCache

from .conftest import Plane


def _item(revision: int) -> CachedDevice:
    return CachedDevice(
        public_key=Ed25519PrivateKey.generate().public_key(),
        status="active",
        labels={},
        revision=revision,
        signed_json=b"{}",
        expires_at=2.0,
        issued_at=1.0,
    )


def test_a_load_that_started_before_a_drop_is_not_cached() -> None:
    cache = DeviceCache()
    since = cache.generation()
    cache.drop("d1")
    assert cache.put("d1", _item(1), since) is False
    assert cache.get("d1") is None


def test_a_load_that_started_before_a_replace_does_not_overwrite_it() -> None:
    cache = DeviceCache()
    loader_since = cache.generation()
    writer_since = cache.generation()
    cache.replace("d1", _item(2), writer_since)
    assert cache.put("d1", _item(1), loader_since) is False
    cached = cache.get("d1")
    assert cached is not None and cached.revision == 2


def test_a_replace_racing_another_change_drops_the_entry_instead() -> None:
    cache = DeviceCache()
    cache.put("d1", _item(1))
    since = cache.generation()
    cache.drop("d1")  # e.g. a decommission committed meanwhile
    cache.replace("d1", _item(2), since)
    assert cache.get("d1") is None


def test_an_unchecked_put_still_caches() -> None:
    cache = DeviceCache()
    assert cache.put("d1", _item(1)) is True
    assert cache.get("d1") is not None


def test_a_label_change_leaves_the_new_document_in_the_cache(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    assert p.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
    r = p.api(
        "POST",
        "/api/v1/deployments",
        json={
            "name": "wake",
            "selector": "wake=yes",
            "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
        },
    )
    assert r.status_code == 201, r.text
    dev = p.enroll()
    before = dev.get("/device/v1/desired")
    assert before.status_code == 200
    r = p.api("POST", f"/api/v1/devices/{dev.id}/labels", json={"set": {"wake": "yes"}})
    assert r.status_code == 200, r.text

    cached = p.client.app.state.plane.cache.get(dev.id)  # type: ignore[attr-defined]
    assert cached is not None
    assert cached.labels == {"wake": "yes"}
    assert cached.revision > int(before.headers["etag"].strip('"'))
    after = dev.get("/device/v1/desired")
    assert after.status_code == 200
    assert after.headers["etag"] == f'"{cached.revision}"'
    assert after.content == cached.signed_json
    assert "digits" in after.json()["document"]["pipelines"]
