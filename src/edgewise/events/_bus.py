"""The event bus interface and its in-process implementation.

Topics are `/`-separated like MQTT's, and subscriptions use MQTT wildcards (`+` one
level, `#` the rest), so that code written against the in-process bus behaves the same
over Mosquitto. Payloads are JSON-able dicts; the MQTT adapter sends them as JSON.

Example:
    >>> bus = InProcessBus()
    >>> got = []
    >>> sub = bus.subscribe("device/+/events", lambda e: got.append(e.payload))
    >>> bus.publish("device/d1/events", {"kind": "degraded"})
    >>> got
    [{'kind': 'degraded'}]
    >>> sub.cancel()
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Event",
    "EventBus",
    "Handler",
    "InProcessBus",
    "Subscription",
    "topic_level",
    "topic_matches",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One message on the bus."""

    topic: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)


Handler = Callable[[Event], None]


# Characters Mosquitto refuses in a topic (MQTT 5 section 1.5.4, and its UTF-8 checks):
# controls (NUL among them), surrogates (not UTF-8 at all) and the noncharacters. The
# broker answers one by dropping the connection, and paho re-sends a queued QoS 1 publish
# after every reconnect: one such topic, built from a hostile id or label, would cut the
# bus off for good. So they are refused here, on both buses alike.
_REFUSED = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(p + 0xFFFE)}{chr(p + 0xFFFF)}" for p in range(0, 0x110000, 0x10000))
    + "]"
)
_MAX_TOPIC_BYTES = 65_535  # MQTT's length prefix


def _check_chars(kind: str, value: str) -> None:
    bad = _REFUSED.search(value)
    if bad is not None:
        raise ValueError(f"invalid {kind} {value!r}: holds {bad.group()!r}, which brokers refuse")
    if len(value.encode()) > _MAX_TOPIC_BYTES:
        raise ValueError(f"invalid {kind}: longer than {_MAX_TOPIC_BYTES} bytes")


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic {topic!r}: non-empty, no wildcards")
    _check_chars("topic", topic)


def _check_pattern(pattern: str) -> None:
    parts = pattern.split("/")
    if not pattern or any(
        ("#" in p and (p != "#" or i != len(parts) - 1)) for i, p in enumerate(parts)
    ):
        raise ValueError(f"invalid pattern {pattern!r}: '#' only as the whole last level")
    if any("+" in p and p != "+" for p in parts):
        raise ValueError(f"invalid pattern {pattern!r}: '+' only as a whole level")
    _check_chars("pattern", pattern)


def topic_level(value: str) -> str:
    """`value`, checked to be safe as one level of a topic built from an id or label.

    Example:
        >>> f"edgewise/devices/{topic_level('dev-1')}/desired"
        'edgewise/devices/dev-1/desired'

    Raises:
        ValueError: `value` is empty or holds `/`, `+`, `#` or a character brokers
            refuse: as a subscription it would reach other devices' topics, as a
            topic it would land in another level, or the broker would drop the
            connection over it.
    """
    if not value or any(c in value for c in "/+#"):
        raise ValueError(f"invalid topic level {value!r}: non-empty, no '/', '+' or '#'")
    _check_chars("topic level", value)
    return value


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT-style `pattern`.

    As in MQTT, a wildcard first level does not match a topic starting with `$`.
    """
    pat, top = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and pat[0] in ("+", "#"):
        return False
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


class Subscription:
    """A handle; `cancel()` stops delivery."""

    def __init__(self, cancel: Callable[[], None], pattern: str) -> None:
        self._cancel = cancel
        self.pattern = pattern

    def cancel(self) -> None:
        """Stop delivering to this handler (idempotent)."""
        self._cancel()


class EventBus(Protocol):
    """What the agent and control plane use, whichever transport is behind it."""

    def publish(self, topic: str, payload: dict[str, Any], qos: int = 0) -> None:
        """Send `payload` to every subscriber of `topic`."""
        ...

    def subscribe(self, pattern: str, handler: Handler, qos: int = 0) -> Subscription:
        """Deliver matching events to `handler` until the subscription is cancelled."""
        ...

    def close(self) -> None:
        """Release the transport."""
        ...


class InProcessBus:
    """Synchronous delivery in the publisher's thread; a failing handler is logged.

    Being synchronous, a handler that blocks holds up its publisher (and the handlers
    after it for that event), as any function call would; handlers may publish and
    cancel subscriptions, their own included, from inside a delivery.
    """

    def __init__(self) -> None:
        self._subs: dict[int, tuple[str, Handler]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.handler_errors = 0

    def publish(self, topic: str, payload: dict[str, Any], qos: int = 0) -> None:
        """Deliver to every matching handler, in subscription order."""
        _check_topic(topic)
        event = Event(topic, payload)
        with self._lock:
            targets = [(k, h) for k, (p, h) in self._subs.items() if topic_matches(p, topic)]
        for key, handler in targets:
            with self._lock:  # an earlier handler may have cancelled this one
                if key not in self._subs:
                    continue
            try:
                handler(event)
            except Exception:  # one subscriber must not break the others
                self.handler_errors += 1
                log.exception("event handler failed for %s", topic)

    def subscribe(self, pattern: str, handler: Handler, qos: int = 0) -> Subscription:
        """Register `handler` for `pattern`."""
        _check_pattern(pattern)
        with self._lock:
            key = self._next
            self._next += 1
            self._subs[key] = (pattern, handler)

        def cancel() -> None:
            with self._lock:
                self._subs.pop(key, None)

        return Subscription(cancel, pattern)

    def close(self) -> None:
        """Drop every subscription."""
        with self._lock:
            self._subs.clear()
