from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from edgewise.events import Event, EventBus, InProcessBus, MqttBus, topic_matches


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("#", "x/y", True),
        ("a/+/c", "a/b/d", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching_follows_mqtt_wildcards(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


class Inbox:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Event]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.events) >= n, timeout)
            return list(self.events)


@pytest.fixture(params=["inprocess", "mqtt"])
def bus(request: pytest.FixtureRequest) -> Iterator[EventBus]:
    if request.param == "inprocess":
        b: EventBus = InProcessBus()
    else:
        host, port = request.getfixturevalue("mqtt_broker")
        b = MqttBus(host, port)
    yield b
    b.close()


@pytest.fixture
def root() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


def test_subscribers_get_matching_events_in_order(bus: EventBus, root: str) -> None:
    inbox, other = Inbox(), Inbox()
    bus.subscribe(f"{root}/device/+/events", inbox)
    bus.subscribe(f"{root}/elsewhere/#", other)
    for i in range(3):
        bus.publish(f"{root}/device/d1/events", {"seq": i}, qos=1)
    bus.publish(f"{root}/device/d1/metrics", {"ignored": True}, qos=1)
    got = inbox.wait_for(3)
    assert [e.payload for e in got] == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    assert got[0].topic == f"{root}/device/d1/events"
    assert other.events == []


def test_cancelled_subscription_stops_delivery(bus: EventBus, root: str) -> None:
    first, second = Inbox(), Inbox()
    sub = bus.subscribe(f"{root}/#", first)
    bus.subscribe(f"{root}/x", second)
    bus.publish(f"{root}/x", {"n": 1}, qos=1)
    second.wait_for(1)
    first.wait_for(1)
    sub.cancel()
    bus.publish(f"{root}/x", {"n": 2}, qos=1)
    assert [e.payload["n"] for e in second.wait_for(2)] == [1, 2]
    assert [e.payload["n"] for e in first.events] == [1]


def test_a_failing_handler_does_not_stop_the_others(bus: EventBus, root: str) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    inbox = Inbox()
    bus.subscribe(f"{root}/t", broken)
    bus.subscribe(f"{root}/t", inbox)
    bus.publish(f"{root}/t", {"ok": True}, qos=1)
    assert inbox.wait_for(1)[0].payload == {"ok": True}


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#"])
def test_publishing_to_a_wildcard_or_empty_topic_is_refused(bus: EventBus, topic: str) -> None:
    with pytest.raises(ValueError, match="invalid topic"):
        bus.publish(topic, {})


@pytest.mark.parametrize("pattern", ["a/#/b", "a/b+", ""])
def test_malformed_patterns_are_refused(bus: EventBus, pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid pattern"):
        bus.subscribe(pattern, Inbox())


def test_mqtt_bus_drops_and_counts_non_json_messages(
    mqtt_broker: tuple[str, int], root: str
) -> None:
    import paho.mqtt.publish as publish

    bus = MqttBus(*mqtt_broker)
    try:
        inbox = Inbox()
        bus.subscribe(f"{root}/raw", inbox, qos=1)
        host, port = mqtt_broker
        publish.single(f"{root}/raw", b"\xff not json", qos=1, hostname=host, port=port)
        deep = b"[" * 100_000 + b"]" * 100_000  # nesting past the parser's recursion limit
        publish.single(f"{root}/raw", deep, qos=1, hostname=host, port=port)
        bus.publish(f"{root}/raw", {"after": 1}, qos=1)
        assert inbox.wait_for(1)[0].payload == {"after": 1}
        deadline = time.monotonic() + 5  # two publishers: no ordering between them
        while bus.undecodable < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bus.undecodable == 2
        assert len(inbox.events) == 1
    finally:
        bus.close()


def test_mqtt_bus_refuses_an_unreachable_broker() -> None:
    with pytest.raises(OSError):
        MqttBus("127.0.0.1", 1, connect_timeout_s=1)
