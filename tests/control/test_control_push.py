"""Desired-state pushes: this replica's new revisions reach `on_desired` hooks, and with a
broker configured they reach the agent's MQTT wake-up (real Mosquitto)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from sqlalchemy import update

from edgewise.agent._wake import MqttWake
from edgewise.control._recompute import recompute_devices
from edgewise.control._schema import devices

from .conftest import Plane


def _revision(p: Plane, device_id: str) -> int:
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    return int(plane.store.get_device(device_id)["desired_revision"])


def test_each_new_revision_this_replica_commits_reaches_the_hooks_once(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    p.deploy_digits(examples, "push", "push=yes")
    devs = [p.enroll() for _ in range(3)]
    seen: list[tuple[str, int]] = []

    def broken(device_id: str, revision: int) -> None:
        raise RuntimeError("broker gone")

    plane.on_desired.extend([broken, lambda d, r: seen.append((d, r))])
    # The one-device path: a label change that brings the deployment in.
    r = p.api("POST", f"/api/v1/devices/{devs[0].id}/labels", json={"set": {"push": "yes"}})
    assert r.status_code == 200, r.text
    assert seen == [(devs[0].id, _revision(p, devs[0].id))]
    # A label change that changes nothing the device runs: no new revision, no push.
    r = p.api("POST", f"/api/v1/devices/{devs[0].id}/labels", json={"set": {"other": "x"}})
    assert r.status_code == 200, r.text
    assert len(seen) == 1
    # The bulk path (rollout waves), finding every document out of date.
    ids = [d.id for d in devs]
    with plane.store.engine.begin() as c:
        c.execute(update(devices).values(desired_hash="out-of-date"))
    assert recompute_devices(plane, ids) == 3
    assert sorted(seen[1:]) == sorted((i, _revision(p, i)) for i in ids)
    assert devs[0].get("/device/v1/desired").status_code == 200  # a failing hook harms nothing


@pytest.mark.mqtt
def test_with_a_broker_a_new_revision_wakes_the_agent_over_mqtt(
    sqlite_plane: Plane, examples: dict[str, Any], mqtt_broker: tuple[str, int]
) -> None:
    p = sqlite_plane
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    runtime = p.client.app.state.telemetry_runtime  # type: ignore[attr-defined]
    host, port = mqtt_broker
    runtime.config = dataclasses.replace(runtime.config, mqtt=f"{host}:{port}")
    p.deploy_digits(examples, "push", "push=yes")
    dev = p.enroll()
    woken = threading.Event()
    wake = MqttWake(*mqtt_broker, dev.id, woken)
    wake.start()
    runtime.start()
    try:
        assert wake.connected.wait(10)
        r = p.api("POST", f"/api/v1/devices/{dev.id}/labels", json={"set": {"push": "yes"}})
        assert r.status_code == 200, r.text
        assert woken.wait(10), "no wake-up arrived over MQTT"
        assert wake.messages == 1
    finally:
        runtime.stop()
        wake.stop()
    assert plane.on_desired == []  # stopping the consumer stops the pushes
