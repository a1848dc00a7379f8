"""The MQTT adapter: the same `EventBus` over Mosquitto (paho-mqtt 2).

Payloads travel as JSON objects; a message that is not one is counted and dropped.
Subscriptions are remembered and renewed on every (re)connect, so a broker restart
does not silently end delivery. Handlers run on paho's network thread: keep them short.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from edgewise.events._bus import (
    Event,
    Handler,
    Subscription,
    _check_pattern,
    _check_topic,
    topic_matches,
)

__all__ = ["MqttBus"]

log = logging.getLogger(__name__)


class MqttBus:
    """An `EventBus` on an MQTT broker."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "",
        connect_timeout_s: float = 5.0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._lock = threading.Lock()
        self._subs: dict[int, tuple[str, int, Handler]] = {}
        self._next = 0
        self._connected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self._early: set[int] = set()
        self.undecodable = 0
        self.handler_errors = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *a: self._connected.clear()
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._connected.wait(connect_timeout_s):
            self._client.loop_stop()
            raise ConnectionError(f"MQTT broker {host}:{port} did not accept the connection")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        with self._lock:
            patterns = {(p, q) for p, q, _ in self._subs.values()}
        for pattern, qos in patterns:
            client.subscribe(pattern, qos=qos)
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        # The ack can arrive before subscribe() has recorded its mid: remember it.
        with self._lock:
            ack = self._acks.pop(mid, None)
            if ack is None:
                self._early.add(mid)
        if ack is not None:
            ack.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            # Whatever any publisher sends: an exception out of this callback would end
            # paho's network thread, and with it every subscription of this bus.
            self.undecodable += 1
            return
        event = Event(msg.topic, payload)
        with self._lock:
            targets = [h for p, _, h in self._subs.values() if topic_matches(p, msg.topic)]
        for handler in targets:
            try:
                handler(event)
            except Exception:
                self.handler_errors += 1
                log.exception("event handler failed for %s", msg.topic)

    def publish(self, topic: str, payload: dict[str, Any], qos: int = 0) -> None:
        """Publish `payload` as JSON (queued by paho; QoS 1/2 retried by it)."""
        _check_topic(topic)
        self._client.publish(topic, json.dumps(payload, default=str), qos=qos)

    def subscribe(
        self, pattern: str, handler: Handler, qos: int = 0, timeout_s: float = 5.0
    ) -> Subscription:
        """Subscribe and wait for the broker's acknowledgement."""
        _check_pattern(pattern)
        with self._lock:
            key = self._next
            self._next += 1
            self._subs[key] = (pattern, qos, handler)
            ack = threading.Event()
        _, mid = self._client.subscribe(pattern, qos=qos)
        with self._lock:
            if mid is None or mid in self._early:
                self._early.discard(mid or 0)
                ack.set()
            else:
                self._acks[mid] = ack
        if not ack.wait(timeout_s):
            raise TimeoutError(f"broker did not acknowledge the subscription to {pattern!r}")

        def cancel() -> None:
            with self._lock:
                if self._subs.pop(key, None) is None:
                    return
                still = any(p == pattern for p, _, _ in self._subs.values())
            if not still:
                self._client.unsubscribe(pattern)

        return Subscription(cancel, pattern)

    def close(self) -> None:
        """Disconnect from the broker."""
        self._client.disconnect()
        self._client.loop_stop()
