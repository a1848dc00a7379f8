"""Optional MQTT wake-up: a message on `edgewise/devices/{id}/desired` polls at once.

HTTP stays the source of truth: the message carries nothing the agent trusts, it only
shortens the wait before the next signed poll. paho-mqtt runs its own network thread
and reconnects by itself.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["MqttWake"]


class MqttWake:
    """Sets `event` whenever the device's desired-state topic receives a message."""

    def __init__(self, host: str, port: int, device_id: str, event: threading.Event) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = f"edgewise/devices/{device_id}/desired"
        self.event = event
        self.messages = 0
        self.connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgewise-agent-{device_id}",
            clean_session=False,  # QoS 1 messages sent while we were away still arrive
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 30)
        self._host, self._port = host, port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not getattr(rc, "is_failure", False):
            client.subscribe(self.topic, qos=1)
            self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages += 1
        self.event.set()

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried)."""
        self._client.connect_async(self._host, self._port, keepalive=60)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()
