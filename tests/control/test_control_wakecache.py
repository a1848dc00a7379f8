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
    p.deploy_digits(examples, "wake", "wake=yes")
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


def test_the_replica_watcher_passes_over_this_replicas_own_changes(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    from sqlalchemy import update

    from edgewise.control._app import notice_changes
    from edgewise.control._recompute import recompute_devices
    from edgewise.control._schema import devices

    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    p.trust(examples["pub"])
    assert p.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
    devs = [p.enroll() for _ in range(3)]
    pipelines = {"digits": {"model": "digits-mlp@1.0.0"}}
    r = p.api("POST", "/api/v1/deployments",
              json={"name": "own", "selector": "", "pipelines": pipelines})  # fmt: skip
    assert r.status_code == 201, r.text
    ids = [d.id for d in devs]
    for d in devs:  # a poll fills the cache
        assert d.get("/device/v1/desired").status_code == 200
    versions = [plane.notifier.version(i) for i in ids]
    # A bulk recompute here (the rollout driver's path) that finds every document out of
    # date: the cache holds the new documents and each device was woken once.
    with plane.store.engine.begin() as c:
        c.execute(update(devices).values(desired_hash="out-of-date"))
    since = p.clock() - 1.0
    assert recompute_devices(plane, ids) == 3
    entries = {i: plane.cache.get(i) for i in ids}
    # Wakes from other threads reach the loop in order: a request served after them
    # means they have all landed.
    assert devs[0].get("/device/v1/desired").status_code == 200
    versions = [plane.notifier.version(i) for i in ids]
    # The watcher reads those same rows back: this replica's own changes, passed over.
    assert notice_changes(plane, plane.store.changed_since(since), since) == 0
    assert {i: plane.cache.get(i) for i in ids} == entries
    # Another replica's change (a stamp this one never wrote) drops and wakes.
    row = plane.store.get_device(ids[2])
    assert plane.store.cas_desired(ids[2], row["desired_hash"], row["desired_revision"] + 1,
                                   "other", row["desired_signed"], p.clock() + 0.5)  # fmt: skip
    assert notice_changes(plane, plane.store.changed_since(since), since) == 1
    assert plane.cache.get(ids[2]) is None
    assert devs[0].get("/device/v1/desired").status_code == 200
    assert [plane.notifier.version(i) for i in ids] == [*versions[:2], versions[2] + 1]


def test_a_label_change_wakes_the_device_once_and_only_when_its_document_changes(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    from edgewise.control._app import notice_changes

    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    p.deploy_digits(examples, "once", "once=yes")
    dev = p.enroll()
    assert dev.get("/device/v1/desired").status_code == 200
    since = p.clock() - 1.0
    before = plane.notifier.version(dev.id)
    for labels, wakes in (({"once": "yes"}, 1), ({"other": "x"}, 0)):
        r = p.api("POST", f"/api/v1/devices/{dev.id}/labels", json={"set": labels})
        assert r.status_code == 200, r.text
        assert dev.get("/device/v1/desired").status_code == 200  # the wakes have landed
        assert plane.notifier.version(dev.id) - before == wakes
        before = plane.notifier.version(dev.id)
    assert plane.cache.get(dev.id).labels == {"once": "yes", "other": "x"}
    # The replica watcher passes over both label writes: this replica made them.
    assert notice_changes(plane, plane.store.changed_since(since), since) == 0


def test_stale_entries_are_those_whose_stored_stamp_moved_or_vanished() -> None:
    from edgewise.control._live import stale_entries

    cached = {"same": 1.0, "moved": 2.0, "gone": 3.0}
    stored = {"same": 1.0, "moved": 2.5, "uncached": 9.0}
    assert stale_entries(cached, stored) == {"moved": 2.5, "gone": 0.0}


def test_the_resync_catches_a_change_whose_commit_landed_after_the_watchers_look_back(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    from edgewise.control._app import notice_changes, resync
    from edgewise.control._recompute import recompute_devices

    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    p.deploy_digits(examples, "late", "late=yes")
    devs = [p.enroll() for _ in range(3)]
    ids = [d.id for d in devs]
    for d in devs:  # polls fill the cache from the store
        assert d.get("/device/v1/desired").status_code == 200
    # This replica's own writes, one device and in bulk, leave entries the resync agrees
    # with: nothing is dropped.
    r = p.api("POST", f"/api/v1/devices/{ids[0]}/labels", json={"set": {"late": "yes"}})
    assert r.status_code == 200, r.text
    for i in ids[1:]:
        assert plane.store.set_labels(i, {"late": "yes"}, p.clock())
    assert recompute_devices(plane, ids[1:]) == 2
    assert all(plane.cache.get(i) is not None for i in ids)
    assert resync(plane) == 0
    entries = {i: plane.cache.get(i) for i in ids}
    assert all(e is not None and e.labels == {"late": "yes"} for e in entries.values())
    # Another replica's change, stamped a minute before it committed: older than the
    # watcher looks back, so the watcher passes it over; the resync drops and wakes.
    assert devs[0].get("/device/v1/desired").status_code == 200  # earlier wakes landed
    versions = [plane.notifier.version(i) for i in ids]
    since = p.clock() - 1.0
    assert plane.store.set_status(ids[1], "decommissioned", p.clock() - 60.0)
    assert notice_changes(plane, plane.store.changed_since(since), since) == 0
    assert plane.cache.get(ids[1]) is entries[ids[1]]
    assert resync(plane) == 1
    assert plane.cache.get(ids[1]) is None
    assert {i: plane.cache.get(i) for i in (ids[0], ids[2])} == {
        i: entries[i] for i in (ids[0], ids[2])
    }
    assert devs[0].get("/device/v1/desired").status_code == 200
    assert [plane.notifier.version(i) for i in ids] == [versions[0], versions[1] + 1, versions[2]]
    assert devs[1].get("/device/v1/desired").status_code in (401, 403)
    assert resync(plane) == 0
