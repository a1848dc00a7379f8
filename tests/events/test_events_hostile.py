"""The event plane and the MQTT paths against a hostile broker and a flaky network.

Anyone who can publish to Mosquitto is taken as an attacker: garbage on every topic the
agent and the bus subscribe to, floods, retained messages, forged wake-ups and acks,
ids holding wildcards. The broker-down cases run a private Mosquitto, killed (SIGKILL),
frozen (SIGSTOP) and restarted by the test; the shared one is never touched.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent._backoff import RetryableError
from edgewise.agent._wake import MqttWake
from edgewise.agent.telemetry import MqttTelemetryUplink
from edgewise.bundle import key_id
from edgewise.events import Event, EventBus, InProcessBus, MqttBus, topic_level, topic_matches
from edgewise.protocol import TelemetryBatch, TelemetryRecord

pytestmark = pytest.mark.mqtt


# -- helpers ------------------------------------------------------------------------------


def _until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met in {timeout} s")
        time.sleep(0.01)


class Inbox:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Event]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.events) >= n, timeout)
            return list(self.events)


class CountingEvent(threading.Event):
    """A real `threading.Event` that also counts its `set()` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


class PrivateBroker:
    """A Mosquitto of this test's own, to kill, freeze and restart on the same port."""

    def __init__(self, binary: str, conf_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.host = "127.0.0.1"
        self.binary = binary
        self.conf = conf_dir / "mosquitto.conf"
        # Deep queues: a flood must reach the client under test, not be shed by the broker.
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nmax_queued_messages 100000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateBroker:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
            except OSError:
                return False
            return True

        _until(listening, 10, "private broker listening")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def broker(require_binary: Callable[[str, str], str], tmp_path: Path) -> Iterator[PrivateBroker]:
    b = PrivateBroker(require_binary("mosquitto", "mosquitto"), tmp_path).start()
    try:
        yield b
    finally:
        if b.proc is not None and b.proc.poll() is None:
            b.thaw()
        b.kill()


@pytest.fixture
def root() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


def _publisher(host: str, port: int) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()
    return client


def _publish_all(
    host: str, port: int, topic: str, payloads: list[bytes], retain: bool = False
) -> None:
    """Publish each payload with QoS 1 from a client of its own, and wait for the broker."""
    client = _publisher(host, port)
    try:
        infos = [client.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


# -- topics built from ids and labels ------------------------------------------------------


@pytest.mark.parametrize("value", ["+", "#", "a/b", "dev-1/#", "a\x00b", "", "a\x1fb"])
def test_an_id_that_is_not_one_topic_level_is_refused_everywhere(
    value: str, mqtt_broker: tuple[str, int]
) -> None:
    # Before: MqttWake("+") subscribed to every device's wake-ups, MqttWake("#") died on
    # its network thread, and the uplink listened to every device's acks.
    with pytest.raises(ValueError, match="invalid topic level"):
        topic_level(value)
    with pytest.raises(ValueError, match="invalid topic level"):
        MqttWake(*mqtt_broker, value, threading.Event())
    with pytest.raises(ValueError, match="invalid topic level"):
        MqttTelemetryUplink(value, Ed25519PrivateKey.generate(), *mqtt_broker)


@pytest.fixture(params=["inprocess", "mqtt"])
def bus(request: pytest.FixtureRequest) -> Iterator[EventBus]:
    if request.param == "inprocess":
        b: EventBus = InProcessBus()
    else:
        b = MqttBus(*request.getfixturevalue("mqtt_broker"))
    yield b
    b.close()


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x7f", "\x85", "\ufffe", "\U0001ffff"])
def test_a_topic_with_a_character_brokers_refuse_is_refused_and_the_bus_stays_up(
    bus: EventBus, root: str, char: str
) -> None:
    # Before: Mosquitto dropped the connection over such a topic, paho re-sent the QoS 1
    # publish after each reconnect, and the bus never delivered anything again.
    inbox = Inbox()
    bus.subscribe(f"{root}/#", inbox, qos=1)
    with pytest.raises(ValueError, match="brokers refuse"):
        bus.publish(f"{root}/a{char}b", {"n": 0}, qos=1)
    with pytest.raises(ValueError, match="brokers refuse"):
        bus.subscribe(f"{root}/a{char}/#", Inbox(), qos=1)
    bus.publish(f"{root}/ok", {"n": 1}, qos=1)
    assert [e.payload for e in inbox.wait_for(1)] == [{"n": 1}]


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [("#", "$SYS/broker/uptime", False), ("+/x", "$x/x", False), ("$SYS/#", "$SYS/a", True)],
)
def test_a_wildcard_first_level_does_not_match_a_dollar_topic(
    pattern: str, topic: str, match: bool
) -> None:
    # As Mosquitto does: before, the in-process bus delivered $-topics to "#".
    assert topic_matches(pattern, topic) is match


# -- garbage, floods, stuck handlers on the MQTT bus ---------------------------------------


def test_garbage_of_every_kind_is_counted_and_what_follows_still_arrives(
    broker: PrivateBroker, root: str
) -> None:
    bus = MqttBus(broker.host, broker.port, max_payload_bytes=1024 * 1024)
    try:
        inbox = Inbox()
        bus.subscribe(f"{root}/#", inbox, qos=1)
        garbage = [
            b"",
            b"\xff\xfe\x00 not utf-8",
            b"null",
            b"[1, 2]",
            b'"a string"',
            b"1e999999",
            b"9" * 10_000,  # past Python's int-from-string digit limit
            b'{"a":' * 100_000,  # truncated and past the recursion limit
            b"[" * 200_000 + b"]" * 200_000,
            b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}',  # a valid object, over the cap
        ]
        _publish_all(broker.host, broker.port, f"{root}/garbage", garbage)
        _until(lambda: bus.undecodable == len(garbage), 30, "every piece of garbage counted")
        bus.publish(f"{root}/after", {"ok": True}, qos=1)
        got = inbox.wait_for(1)
        assert [e.payload for e in got] == [{"ok": True}]
    finally:
        bus.close()


def test_a_flood_is_delivered_or_counted_and_the_bus_keeps_working(
    broker: PrivateBroker, root: str
) -> None:
    bus = MqttBus(broker.host, broker.port)
    try:
        inbox = Inbox()
        bus.subscribe(f"{root}/flood", inbox, qos=1)
        n = 10_000
        _publish_all(broker.host, broker.port, f"{root}/flood", [b'{"i": 1}'] * n)
        _until(lambda: len(inbox.events) + bus.overflowed == n, 60, "all 10,000 accounted for")
        before = len(inbox.events)
        bus.publish(f"{root}/flood", {"after": True}, qos=1)
        assert inbox.wait_for(before + 1)[-1].payload == {"after": True}
    finally:
        bus.close()


def test_a_stuck_handler_holds_up_neither_the_other_subscribers_nor_close(
    mqtt_broker: tuple[str, int], root: str
) -> None:
    # Before: handlers ran on paho's network thread, so one that blocked stopped every
    # delivery (and the keep-alives), and close() waited for it forever.
    release = threading.Event()
    entered = threading.Event()

    def stuck(event: Event) -> None:
        entered.set()
        release.wait(60)

    bus = MqttBus(*mqtt_broker)
    try:
        inbox = Inbox()
        bus.subscribe(f"{root}/t", stuck, qos=1)
        bus.subscribe(f"{root}/t", inbox, qos=1)
        for i in range(3):
            bus.publish(f"{root}/t", {"i": i}, qos=1)
        assert [e.payload["i"] for e in inbox.wait_for(3)] == [0, 1, 2]
        assert entered.wait(10)
        closer = threading.Thread(target=bus.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "close() waited for a stuck handler"
    finally:
        release.set()
        bus.close()


def test_each_subscription_gets_a_payload_of_its_own(
    mqtt_broker: tuple[str, int], root: str
) -> None:
    # Handlers run at once on their own threads: a shared dict changed by one would race
    # (or simply change) what the others read.
    seen: list[dict[str, Any]] = []
    inbox = Inbox()

    def mutating(event: Event) -> None:
        event.payload["changed"] = True
        seen.append(event.payload)

    bus = MqttBus(*mqtt_broker)
    try:
        bus.subscribe(f"{root}/t", mutating, qos=1)
        bus.subscribe(f"{root}/t", inbox, qos=1)
        bus.publish(f"{root}/t", {"n": 1}, qos=1)
        (got,) = inbox.wait_for(1)
        _until(lambda: len(seen) == 1, 10, "the mutating handler ran")
        assert got.payload is not seen[0]
        assert got.payload == {"n": 1}
    finally:
        bus.close()


def test_a_full_mailbox_drops_and_counts_instead_of_growing(
    mqtt_broker: tuple[str, int], root: str
) -> None:
    release = threading.Event()
    handled: list[int] = []

    def slow(event: Event) -> None:
        release.wait(60)
        handled.append(event.payload["i"])

    bus = MqttBus(*mqtt_broker, max_pending=5)
    try:
        bus.subscribe(f"{root}/t", slow, qos=1)
        n = 50
        for i in range(n):
            bus.publish(f"{root}/t", {"i": i}, qos=1)
        # One event in the handler and five waiting: everything else is dropped.
        _until(lambda: bus.overflowed >= n - 6, 30, "the overflow counted")
        release.set()
        _until(lambda: len(handled) + bus.overflowed == n, 30, "every event accounted for")
        assert len(handled) <= 6
        assert handled == sorted(handled)
    finally:
        release.set()
        bus.close()


# -- the broker dies, freezes, comes back --------------------------------------------------


def test_while_the_broker_is_down_publishes_queue_up_to_a_bound_and_the_rest_are_counted(
    broker: PrivateBroker, root: str
) -> None:
    bus = MqttBus(broker.host, broker.port, max_queued=5)
    try:
        inbox = Inbox()
        bus.subscribe(f"{root}/#", inbox, qos=1)
        broker.kill()
        _until(lambda: not bus.connected, 10, "the bus noticed the broker is gone")
        for i in range(8):
            bus.publish(f"{root}/q", {"i": i}, qos=1)
        bus.publish(f"{root}/q", {"qos0": True}, qos=0)  # at most once: lost, counted
        assert bus.dropped == 3 + 1
        broker.start()
        _until(lambda: bus.connected, 60, "the bus reconnected")
        # The subscription was renewed and the queued publishes sent, in order.
        assert [e.payload["i"] for e in inbox.wait_for(5, 30)] == [0, 1, 2, 3, 4]
        bus.publish(f"{root}/q", {"i": 99}, qos=1)
        assert inbox.wait_for(6)[-1].payload == {"i": 99}
    finally:
        bus.close()


def test_close_and_stop_are_prompt_while_the_broker_is_down(broker: PrivateBroker) -> None:
    bus = MqttBus(broker.host, broker.port)
    woken = threading.Event()
    wake = MqttWake(broker.host, broker.port, f"dev-{uuid.uuid4().hex[:8]}", woken)
    wake.start()
    assert wake.connected.wait(10)
    broker.kill()
    _until(lambda: not bus.connected and not wake.connected.is_set(), 10, "both noticed")
    closers = [threading.Thread(target=bus.close), threading.Thread(target=wake.stop)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
    assert not any(t.is_alive() for t in closers)


def test_a_subscribe_the_broker_never_acknowledged_leaves_no_handler_behind(
    broker: PrivateBroker, root: str
) -> None:
    # Before: the TimeoutError left the handler registered and renewed on every connect,
    # so it got messages after all (and a caller that retried got each one twice).
    bus = MqttBus(broker.host, broker.port)
    try:
        late, marker = Inbox(), Inbox()
        broker.freeze()
        try:
            with pytest.raises(TimeoutError):
                bus.subscribe(f"{root}/late", late, qos=1, timeout_s=0.5)
        finally:
            broker.thaw()
        bus.subscribe(f"{root}/marker", marker, qos=1)
        bus.publish(f"{root}/late", {"n": 1}, qos=1)
        bus.publish(f"{root}/marker", {"n": 2}, qos=1)
        marker.wait_for(1)
        assert marker.events and late.events == []
    finally:
        bus.close()


# -- forged wake-ups -----------------------------------------------------------------------


def test_a_flood_of_wake_ups_is_one_wake_per_interval(broker: PrivateBroker) -> None:
    # Before: each message set the event, so a flood had the agent poll the control plane
    # in a tight loop (each poll with wait 0), as fast as it answered.
    device = f"dev-{uuid.uuid4().hex[:8]}"
    woken = CountingEvent()
    wake = MqttWake(broker.host, broker.port, device, woken, min_interval_s=3600, clock=lambda: 0)
    wake.start()
    try:
        assert wake.connected.wait(10)
        n = 10_000
        topic = f"edgewise/devices/{device}/desired"
        _publish_all(broker.host, broker.port, topic, [b"\xff garbage"] * n)
        _until(lambda: wake.messages == n, 60, "the whole flood received")
        assert woken.sets == 1
        assert wake.wakes == 1
    finally:
        wake.stop()


def test_a_wake_up_inside_the_interval_is_deferred_not_lost(broker: PrivateBroker) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    woken = threading.Event()
    wake = MqttWake(broker.host, broker.port, device, woken, min_interval_s=0.2)
    wake.start()
    try:
        assert wake.connected.wait(10)
        topic = f"edgewise/devices/{device}/desired"
        _publish_all(broker.host, broker.port, topic, [b"{}"])
        assert woken.wait(10)
        woken.clear()
        _publish_all(broker.host, broker.port, topic, [b"{}"])
        assert woken.wait(10), "the second wake-up was lost"
    finally:
        wake.stop()


def test_a_retained_wake_up_does_not_wake_the_agent(broker: PrivateBroker) -> None:
    # Before: a retained message woke the agent on every (re)connect, however old it was.
    device = f"dev-{uuid.uuid4().hex[:8]}"
    topic = f"edgewise/devices/{device}/desired"
    _publish_all(broker.host, broker.port, topic, [b'{"revision": 1}'], retain=True)
    woken = CountingEvent()
    wake = MqttWake(broker.host, broker.port, device, woken, min_interval_s=0)
    wake.start()
    try:
        _until(lambda: wake.messages == 1, 10, "the retained message delivered")
        assert not woken.is_set()
        _publish_all(broker.host, broker.port, topic, [b'{"revision": 2}'])
        _until(lambda: wake.messages == 2, 10, "the live message delivered")
        assert woken.is_set()
        assert woken.sets == 1
        assert wake.retained == 1
    finally:
        wake.stop()


# -- forged telemetry acks -----------------------------------------------------------------


def _batch(seqs: range) -> TelemetryBatch:
    return TelemetryBatch(
        records=[TelemetryRecord(seq=s, cls="event", ts=1.0, kind="e") for s in seqs]
    )


def _forged_ack(last_seq: int) -> bytes:
    body = {"accepted": last_seq, "duplicates": 0, "acked_seq": last_seq, "last_seq": last_seq}
    return json.dumps(body).encode()


def test_an_ack_forged_ahead_of_its_batch_is_not_believed(broker: PrivateBroker) -> None:
    # Before: acks were kept by seq whenever they came, so one forged ahead (or retained
    # on the topic) answered the later batch at once, and the drain deleted records the
    # control plane never stored; a flood of them, each for another seq, was kept forever.
    device = f"dev-{uuid.uuid4().hex[:8]}"
    ack_topic = f"edgewise/devices/{device}/telemetry/ack"
    _publish_all(broker.host, broker.port, ack_topic, [_forged_ack(9)], retain=True)
    uplink = MqttTelemetryUplink(
        device, Ed25519PrivateKey.generate(), broker.host, broker.port, ack_timeout_s=1.0
    )
    try:
        _publish_all(broker.host, broker.port, ack_topic, [_forged_ack(3)])
        # No control plane is listening: the only acks are the forged ones.
        with pytest.raises(RetryableError):
            uplink.send(_batch(range(1, 2)))  # meanwhile the forged acks arrive
        with pytest.raises(RetryableError):
            uplink.send(_batch(range(1, 4)))
        with pytest.raises(RetryableError):
            uplink.send(_batch(range(1, 10)))
    finally:
        uplink.close()


def _forge_while_awaited(
    broker: PrivateBroker, devices: list[str], payload: Callable[[str, int], bytes]
) -> Any:
    """A rogue broker client: answers every batch these devices publish with a forged ack."""
    rogue = _publisher(broker.host, broker.port)
    subscribed = threading.Semaphore(0)

    def answer(client: Any, _u: Any, msg: Any) -> None:
        device = msg.topic.rsplit("/", 1)[-1]
        last = max(r["seq"] for r in json.loads(gzip.decompress(msg.payload))["records"])
        client.publish(f"edgewise/devices/{device}/telemetry/ack", payload(device, last), qos=1)

    rogue.on_message = answer
    rogue.on_subscribe = lambda *_: subscribed.release()
    for device in devices:
        rogue.subscribe(f"edgewise/telemetry/{device}", qos=1)
    for _ in devices:
        assert subscribed.acquire(timeout=10)
    return rogue


@pytest.mark.parametrize("signer", ["none", "stranger"])
def test_an_ack_forged_while_its_batch_is_awaited_is_believed_only_without_keys(
    broker: PrivateBroker, signer: str
) -> None:
    # A client of the broker answering the batch at once, before the control plane
    # does, had the drain delete records the control plane never stored.
    from edgewise.protocol import TelemetryAck, sign_ack

    stranger, control_plane = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()

    def forged(device: str, last: int) -> bytes:
        ack = TelemetryAck(accepted=last, duplicates=0, acked_seq=last)
        if signer == "none":
            return _forged_ack(last)
        return json.dumps(sign_ack(ack, device, last, stranger)).encode()

    device = f"dev-{uuid.uuid4().hex[:8]}"
    rogue = _forge_while_awaited(broker, [device, f"{device}-k"], forged)
    trusting = MqttTelemetryUplink(
        device, Ed25519PrivateKey.generate(), broker.host, broker.port, ack_timeout_s=2.0
    )
    checking = MqttTelemetryUplink(
        f"{device}-k", Ed25519PrivateKey.generate(), broker.host, broker.port,
        ack_timeout_s=1.0, trusted={key_id(control_plane): control_plane.public_key()},
    )  # fmt: skip
    try:
        if signer == "none":  # an uplink without keys still believes the forger
            assert trusting.send(_batch(range(1, 4))).acked_seq == 3
        with pytest.raises(RetryableError):
            checking.send(_batch(range(1, 4)))
    finally:
        for c in (trusting, checking):
            c.close()
        rogue.disconnect()
        rogue.loop_stop()


def test_an_ack_the_control_plane_signed_is_believed(broker: PrivateBroker) -> None:
    from edgewise.protocol import TelemetryAck, sign_ack

    control_plane = Ed25519PrivateKey.generate()
    device = f"dev-{uuid.uuid4().hex[:8]}"

    def genuine(device: str, last: int) -> bytes:
        ack = TelemetryAck(accepted=last, duplicates=0, acked_seq=last)
        return json.dumps(sign_ack(ack, device, last, control_plane)).encode()

    def for_another_device(_device: str, last: int) -> bytes:
        ack = TelemetryAck(accepted=last, duplicates=0, acked_seq=last)
        return json.dumps(sign_ack(ack, "dev-other", last, control_plane)).encode()

    trusted = {key_id(control_plane): control_plane.public_key()}
    for answer, believed in ((genuine, True), (for_another_device, False)):
        rogue = _forge_while_awaited(broker, [device], answer)
        up = MqttTelemetryUplink(
            device, Ed25519PrivateKey.generate(), broker.host, broker.port,
            ack_timeout_s=1.0, trusted=trusted,
        )  # fmt: skip
        try:
            if believed:
                assert up.send(_batch(range(1, 3))).acked_seq == 2
            else:  # a genuine ack replayed from another device's topic
                with pytest.raises(RetryableError):
                    up.send(_batch(range(1, 3)))
        finally:
            up.close()
            rogue.disconnect()
            rogue.loop_stop()


# -- the in-process bus --------------------------------------------------------------------


def test_a_handler_cancelled_by_an_earlier_one_gets_nothing_more() -> None:
    # Before: the handlers for an event were fixed before delivery, so one cancelled by
    # an earlier handler of the same event was still called after its cancel().
    bus = InProcessBus()
    later = Inbox()
    subs = {}

    def first(event: Event) -> None:
        subs["later"].cancel()

    bus.subscribe("t", first)
    subs["later"] = bus.subscribe("t", later)
    bus.publish("t", {"n": 1})
    assert later.events == []


def test_handlers_may_publish_and_cancel_themselves_from_inside_a_delivery(
    bus: EventBus, root: str
) -> None:
    inbox = Inbox()
    subs = {}

    def relay(event: Event) -> None:
        subs["relay"].cancel()
        bus.publish(f"{root}/out", {"relayed": event.payload["n"]}, qos=1)

    subs["relay"] = bus.subscribe(f"{root}/in", relay, qos=1)
    bus.subscribe(f"{root}/out", inbox, qos=1)
    bus.publish(f"{root}/in", {"n": 1}, qos=1)
    assert [e.payload for e in inbox.wait_for(1)] == [{"relayed": 1}]
    bus.publish(f"{root}/in", {"n": 2}, qos=1)
    bus.publish(f"{root}/out", {"marker": True}, qos=1)
    assert [e.payload for e in inbox.wait_for(2)] == [{"relayed": 1}, {"marker": True}]
