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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Event", "EventBus", "Handler", "InProcessBus", "Subscription", "topic_matches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One message on the bus."""

    topic: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)


Handler = Callable[[Event], None]


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic {topic!r}: non-empty, no wildcards")


def _check_pattern(pattern: str) -> None:
    parts = pattern.split("/")
    if not pattern or any(
        ("#" in p and (p != "#" or i != len(parts) - 1)) for i, p in enumerate(parts)
    ):
        raise ValueError(f"invalid pattern {pattern!r}: '#' only as the whole last level")
    if any("+" in p and p != "+" for p in parts):
        raise ValueError(f"invalid pattern {pattern!r}: '+' only as a whole level")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT-style `pattern`."""
    pat, top = pattern.split("/"), topic.split("/")
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
    """Synchronous delivery in the publisher's thread; a failing handler is logged."""

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
            targets = [h for p, h in self._subs.values() if topic_matches(p, topic)]
        for handler in targets:
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
