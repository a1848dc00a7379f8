"""MQTT ingest with the real Mosquitto: exactly-once under duplicates and reordering,
shared subscription across two control planes, and the egress policy on the wire."""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from edgewise.agent import TelemetryBuffer
from edgewise.agent.telemetry import MqttTelemetryUplink, WindowAggregator
from edgewise.control import _schema as cs
from edgewise.control.telemetry._ingest import TelemetryIngest
from edgewise.control.telemetry._mqtt import MqttIngest
from edgewise.protocol import (
    EgressPolicy,
    TelemetryBatch,
    TelemetryRecord,
    encode_batch,
    sign_request,
    verify_request,
)

from .conftest import FakeClock


class Fleet:
    """Device keys for the test's devices and a verifier over them."""

    def __init__(self, store: Any) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.store = store

    def add(self) -> str:
        device_id = f"mq-{uuid.uuid4().hex[:10]}"
        self.keys[device_id] = Ed25519PrivateKey.generate()
        self.store.insert_device(
            {
                "id": device_id,
                "public_key": device_id,
                "labels": {},
                "capabilities": {},
                "status": "active",
                "enrolled_at": 1.0,
            }
        )
        return device_id

    def verify(self, headers: Mapping[str, str], topic: str, body: bytes) -> str:
        device_id = headers.get("X-Edgewise-Device", "")
        key = self.keys[device_id].public_key()
        return verify_request(headers, "MQTT", topic, body, key, time.time()).device_id


@pytest.fixture
def fleet(store: Any) -> Fleet:
    return Fleet(store)


@pytest.fixture
def consumers(store: Any, fleet: Fleet, mqtt_broker: tuple[str, int]) -> Iterator[list[MqttIngest]]:
    group = f"$share/t{uuid.uuid4().hex[:8]}/edgewise/telemetry/#"  # isolated from other tests
    out = []
    for i in range(2):
        c = MqttIngest(
            TelemetryIngest(store.engine),
            fleet.verify,
            *mqtt_broker,
            client_id=f"cp{i}-{uuid.uuid4().hex[:6]}",
            subscription=group,
        )
        c.start()
        out.append(c)
    yield out
    for c in out:
        c.stop()


def _stored(store: Any, device: str) -> list[int]:
    tel = cs.telemetry
    with store.engine.connect() as c:
        return list(
            c.execute(
                select(tel.c.seq).where(tel.c.device_id == device).order_by(tel.c.seq)
            ).scalars()
        )


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _batch(seqs: range) -> TelemetryBatch:
    return TelemetryBatch(
        records=[TelemetryRecord(seq=s, cls="event", ts=1.0, kind="e") for s in seqs]
    )


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_duplicated_and_reordered_batches_over_mqtt_are_stored_once(
    store: Any, fleet: Fleet, consumers: list[MqttIngest], mqtt_broker: tuple[str, int]
) -> None:
    device = fleet.add()
    uplink = MqttTelemetryUplink(device, fleet.keys[device], *mqtt_broker)
    try:
        acks = [
            uplink.send(_batch(r))
            for r in (range(1, 11), range(21, 31), range(11, 21), range(1, 11))
        ]
    finally:
        uplink.close()
    assert [a.acked_seq for a in acks] == [10, 10, 30, 30]
    assert [a.accepted for a in acks] == [10, 10, 10, 0]
    # The same signed message published three times (a device retrying after a lost ack).
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(*mqtt_broker)
    raw.loop_start()
    topic = f"edgewise/telemetry/{device}"
    for r in (range(31, 41), range(31, 41), range(35, 46)):
        body = encode_batch(_batch(r))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(
            sign_request(fleet.keys[device], device, "MQTT", topic, body, time.time()).items()
        )
        raw.publish(topic, body, qos=1, properties=props).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    _wait(lambda: _stored(store, device) == list(range(1, 46)))
    assert sum(c.stats.stored for c in consumers) == 45


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_shared_subscription_splits_devices_between_control_planes(
    store: Any, fleet: Fleet, consumers: list[MqttIngest], mqtt_broker: tuple[str, int]
) -> None:
    devices = [fleet.add() for _ in range(12)]
    for d in devices:
        up = MqttTelemetryUplink(d, fleet.keys[d], *mqtt_broker)
        try:
            for lo in range(1, 31, 10):
                up.send(_batch(range(lo, lo + 10)))
        finally:
            up.close()
    for d in devices:
        assert _stored(store, d) == list(range(1, 31))
    received = [c.stats.received for c in consumers]
    assert sum(received) >= 36 and min(received) > 0  # both planes took a share


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_forged_and_misrouted_messages_are_refused(
    store: Any, fleet: Fleet, consumers: list[MqttIngest], mqtt_broker: tuple[str, int]
) -> None:
    victim, attacker = fleet.add(), fleet.add()
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(*mqtt_broker)
    raw.loop_start()
    body = encode_batch(_batch(range(1, 5)))
    # Signed by the attacker for its own topic, published on the victim's topic.
    own = f"edgewise/telemetry/{attacker}"
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = list(
        sign_request(fleet.keys[attacker], attacker, "MQTT", own, body, time.time()).items()
    )
    raw.publish(f"edgewise/telemetry/{victim}", body, qos=1, properties=props).wait_for_publish(5)
    raw.publish(f"edgewise/telemetry/{victim}", b"not gzip", qos=1).wait_for_publish(5)
    raw.disconnect()
    raw.loop_stop()
    _wait(lambda: sum(c.stats.rejected for c in consumers) >= 2)
    assert _stored(store, victim) == [] and _stored(store, attacker) == []


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_egress_policy_holds_on_the_wire_and_in_the_database(
    store: Any,
    fleet: Fleet,
    consumers: list[MqttIngest],
    mqtt_broker: tuple[str, int],
    tmp_path: Any,
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    device = fleet.add()
    seen: list[bytes] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.on_message = lambda _c, _u, msg: seen.append(bytes(msg.payload))
    spy.connect(*mqtt_broker)
    spy.subscribe(f"edgewise/telemetry/{device}", qos=1)
    spy.loop_start()
    assert subscribed.wait(5)
    # Capture off (the default), and a redacted field in the resources the device reads.
    clock = FakeClock()
    policy = EgressPolicy(redact=["serial_number"])
    agg = WindowAggregator("cam", model="m", version="1", policy=policy, clock=clock)
    buffer = TelemetryBuffer(tmp_path / "t.db")
    uplink = MqttTelemetryUplink(device, fleet.keys[device], *mqtt_broker)
    try:
        for _ in range(3):
            agg.observe(np.random.default_rng(0).random((20, 4)), [0.2] * 20, [0] * 20)
            clock.advance(10)
            buffer.append(agg.close(resources={"cpu_percent": 3.0, "serial_number": "SN-SECRET"}))
        batch = buffer.peek()
        uplink.send(batch)
    finally:
        uplink.close()
        buffer.close()
    _wait(lambda: len(seen) >= 1)
    spy.disconnect()
    spy.loop_stop()
    wire = b"".join(gzip.decompress(p) for p in seen)
    assert b"SN-SECRET" not in wire and b"serial_number" not in wire
    assert b'"cls":"sample"' not in wire
    with store.engine.connect() as c:
        rows = c.execute(
            select(cs.telemetry.c.cls, cs.telemetry.c.data).where(
                cs.telemetry.c.device_id == device
            )
        ).all()
    assert rows and {r.cls for r in rows} == {"metric"}
    assert "SN-SECRET" not in json.dumps([r.data for r in rows])
