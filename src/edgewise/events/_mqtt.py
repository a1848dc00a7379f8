"""The MQTT adapter: the same `EventBus` over Mosquitto (paho-mqtt 2).

Payloads travel as JSON objects. Anyone who can publish to the broker can reach a
subscriber, and the network and broker fail, so the bus assumes both:

- a message that is not a JSON object of at most `max_payload_bytes` is counted in
  `undecodable` and dropped (an exception out of paho's callback would end its network
  thread, and with it every subscription of the bus);
- each subscription has its own delivery thread and a mailbox of at most `max_pending`
  events: a slow or stuck handler holds up only itself, never paho's network thread
  (keep-alives, acks, reconnects), the other subscriptions or `close`; what its full
  mailbox cannot take is counted in `overflowed` and dropped;
- while the broker is away paho reconnects with backoff (1 s doubling to 30 s) and every
  (re)connect renews the subscriptions; QoS 1/2 publishes wait in a queue of at most
  `max_queued` and are sent on reconnect, while QoS 0 publishes and what the full queue
  cannot take are counted in `dropped`;
- `close` waits neither for the broker nor, beyond `close_timeout_s`, for a stuck handler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
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


class _Mailbox:
    """One subscription's delivery: a bounded queue and a thread running the handler."""

    def __init__(self, bus: MqttBus, pattern: str, qos: int, handler: Handler) -> None:
        self.pattern, self.qos, self.handler = pattern, qos, handler
        self.events: queue.Queue[Event | None] = queue.Queue(bus.max_pending)
        self.open = True
        self.thread = threading.Thread(
            target=self._run, args=(bus,), name=f"mqtt-bus {pattern}", daemon=True
        )
        self.thread.start()

    def offer(self, event: Event) -> bool:
        """Queue `event` unless the mailbox is full; never blocks."""
        try:
            self.events.put_nowait(event)
        except queue.Full:
            return False
        return True

    def close(self) -> None:
        """Deliver nothing more (a handler running now finishes on its own)."""
        self.open = False
        with contextlib.suppress(queue.Full):  # a full mailbox: the thread sees `open`
            self.events.put_nowait(None)

    def _run(self, bus: MqttBus) -> None:
        while True:
            event = self.events.get()
            if event is None or not self.open:
                return
            try:
                self.handler(event)
            except Exception:  # one subscriber must not break the others
                bus._count("handler_errors")
                log.exception("event handler failed for %s", event.topic)


class MqttBus:
    """An `EventBus` on an MQTT broker."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "",
        connect_timeout_s: float = 5.0,
        max_payload_bytes: int = 256 * 1024,
        max_pending: int = 1000,
        max_queued: int = 10_000,
        close_timeout_s: float = 2.0,
    ) -> None:
        """Connect to the broker at host:port.

        Raises:
            OSError: the broker is unreachable.
            ConnectionError: it did not accept the connection in `connect_timeout_s`.
        """
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.max_payload_bytes = max_payload_bytes
        self.max_pending = max_pending
        self.close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._subs: dict[int, _Mailbox] = {}
        self._next = 0
        self._connected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self.undecodable = 0
        self.handler_errors = 0
        self.overflowed = 0
        self.dropped = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *a: self._connected.clear()
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(1, 30)
        self._client.max_queued_messages_set(max_queued)
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._connected.wait(connect_timeout_s):
            self._client.disconnect()  # closes the socket, and the loop ends
            self._client.loop_stop()
            raise ConnectionError(f"MQTT broker {host}:{port} did not accept the connection")

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now."""
        return self._connected.is_set()

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    # -- paho callbacks (network thread: never block, never raise) ----------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        with self._lock:
            patterns = {(b.pattern, b.qos) for b in self._subs.values()}
        for pattern, qos in patterns:
            try:
                client.subscribe(pattern, qos=qos)
            except Exception:  # checked when subscribed; this thread must survive regardless
                log.exception("could not renew the subscription to %r", pattern)
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        with self._lock:
            ack = self._acks.pop(mid, None)  # None: a renewal, or a subscribe that gave up
        if ack is not None:
            ack.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            if len(msg.payload) > self.max_payload_bytes:
                raise ValueError("payload too large")
            topic = msg.topic  # decoded from UTF-8 by paho
            payload = json.loads(msg.payload)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            self._count("undecodable")
            return
        with self._lock:
            targets = [b for b in self._subs.values() if topic_matches(b.pattern, topic)]
        for i, box in enumerate(targets):
            # A payload of its own for each subscription: their handlers run at once on
            # their own threads, and one that changes its dict must not race the others.
            event = Event(topic, payload if i == 0 else json.loads(msg.payload))
            if not box.offer(event):
                self._count("overflowed")

    # -- the EventBus interface ---------------------------------------------------------

    def publish(self, topic: str, payload: dict[str, Any], qos: int = 0) -> None:
        """Publish `payload` as JSON: QoS 0 only if connected, QoS 1/2 queued (bounded)."""
        import paho.mqtt.client as mqtt

        _check_topic(topic)
        info = self._client.publish(topic, json.dumps(payload, default=str), qos=qos)
        # NO_CONN for QoS 1/2 means queued for the reconnect; for QoS 0 it means lost.
        queued = qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not queued:
            self._count("dropped")

    def subscribe(
        self, pattern: str, handler: Handler, qos: int = 0, timeout_s: float = 5.0
    ) -> Subscription:
        """Subscribe and wait for the broker's acknowledgement.

        While the broker is away the subscription is only recorded, and renewed on
        reconnect.

        Raises:
            ValueError: `pattern` is not a valid subscription.
            TimeoutError: the broker did not acknowledge in `timeout_s`; nothing of the
                subscription is left behind.
        """
        _check_pattern(pattern)
        box = _Mailbox(self, pattern, qos, handler)
        ack = threading.Event()
        with self._lock:
            # Under the lock: the ack, on the network thread, must find its mid recorded.
            try:
                _, mid = self._client.subscribe(pattern, qos=qos)
            except Exception:
                box.close()
                raise
            key = self._next
            self._next += 1
            self._subs[key] = box
            if mid is None:  # not connected: _on_connect subscribes
                ack.set()
            else:
                self._acks[mid] = ack

        def cancel() -> None:
            with self._lock:
                if self._subs.pop(key, None) is None:
                    return
                still = any(b.pattern == pattern for b in self._subs.values())
            box.close()
            if not still:
                self._client.unsubscribe(pattern)

        if not ack.wait(timeout_s):
            with self._lock:
                self._acks.pop(mid or 0, None)
            cancel()  # a caller told it failed must not get deliveries, nor retry into two
            raise TimeoutError(f"broker did not acknowledge the subscription to {pattern!r}")
        return Subscription(cancel, pattern)

    def close(self) -> None:
        """Disconnect from the broker and stop delivering (idempotent)."""
        with self._lock:
            boxes = list(self._subs.values())
            self._subs.clear()
        for box in boxes:
            box.close()
        self._client.disconnect()
        self._client.loop_stop()
        deadline = time.monotonic() + self.close_timeout_s
        for box in boxes:
            if box.thread is not threading.current_thread():  # close() from a handler
                box.thread.join(max(0.0, deadline - time.monotonic()))
