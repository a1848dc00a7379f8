"""Optional MQTT wake-up: a message on `edgewise/devices/{id}/desired` polls at once.

HTTP stays the source of truth: the message carries nothing the agent trusts, it only
shortens the wait before the next signed poll. Since anyone who can publish to the
broker can send one, the wake-up is shaped so that a forged one costs no more than a
poll:

- the payload is never read;
- retained messages are ignored (the control plane never retains; a retained one would
  wake the agent on every reconnect, long after it was sent);
- wake-ups are at most one per `min_interval_s`: one arriving sooner is deferred to the
  end of the interval, never lost, and a flood of them is one poll per interval rather
  than a tight loop of polls against the control plane.

paho-mqtt runs its own network thread and reconnects by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgewise.events import topic_level

__all__ = ["MqttWake"]


class MqttWake:
    """Sets `event` whenever the device's desired-state topic receives a message."""

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        event: threading.Event,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Listen for `device_id`'s wake-ups (after `start`).

        Raises:
            ValueError: `device_id` cannot be one topic level (a `+` or `#` in it would
                subscribe to other devices' topics).
        """
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = f"edgewise/devices/{topic_level(device_id)}/desired"
        self.event = event
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.messages = 0
        self.retained = 0
        self.wakes = 0
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._last: float | None = None
        self._deferred: threading.Timer | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgewise-agent-{device_id}",
            clean_session=False,  # QoS 1 messages sent while we were away still arrive
        )
        self._client.on_connect = self._on_connect
        # `connected` means listening: set by the broker's subscription ack, not the
        # connection's, as a wake-up sent between the two would be lost.
        self._client.on_subscribe = lambda *a: self.connected.set()
        self._client.on_disconnect = lambda *a: self.connected.clear()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 30)
        self._host, self._port = host, port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not getattr(rc, "is_failure", False):
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages += 1
        if msg.retain:
            self.retained += 1
            return
        with self._lock:
            if self._deferred is not None:
                return  # a wake-up is already due at the end of the interval
            now = self.clock()
            wait = 0.0 if self._last is None else self._last + self.min_interval_s - now
            if wait > 0:
                self._deferred = threading.Timer(wait, self._fire)
                self._deferred.daemon = True
                self._deferred.start()
                return
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            self._deferred = None
            self._last = self.clock()
            self.wakes += 1
        self.event.set()

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried)."""
        self._client.connect_async(self._host, self._port, keepalive=60)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.cancel()
