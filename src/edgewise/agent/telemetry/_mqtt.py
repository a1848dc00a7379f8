"""Telemetry upload over MQTT: the device half of `edgewise.control.telemetry`'s MQTT ingest.

`MqttTelemetryUplink.send(batch)` has the shape `TelemetryDrain` expects of its `send`:
it publishes the gzip batch, signed, with QoS 1 to `edgewise/telemetry/<device id>`
and waits for the control plane's ack on `edgewise/devices/<device id>/telemetry/ack`;
no ack in time raises `RetryableError`, and the records stay in the buffer (the
control plane's (device, seq) keys make the eventual re-send harmless).

Anyone who can publish to the broker can send an ack. The control plane signs its own
(`edgewise.protocol.sign_ack`), and an uplink given the trust root's control-plane keys
(`trusted=`) believes no other. Either way only an ack for the batch being awaited is
taken (the rest, retained ones included, are dropped, so an ack sent ahead cannot be
waiting for a later batch, and a flood of them holds no memory).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.agent._backoff import RetryableError
from edgewise.events import topic_level
from edgewise.protocol import (
    TelemetryAck,
    TelemetryBatch,
    encode_batch,
    sign_request,
    verify_ack,
)

__all__ = ["MqttTelemetryUplink"]

_TOPIC = "edgewise/telemetry/{device_id}"
_ACK_TOPIC = "edgewise/devices/{device_id}/telemetry/ack"


class MqttTelemetryUplink:
    """Publishes signed telemetry batches and waits for their acks (one at a time)."""

    def __init__(
        self,
        device_id: str,
        private_key: Ed25519PrivateKey,
        host: str = "127.0.0.1",
        port: int = 1883,
        clock: Callable[[], float] = time.time,
        ack_timeout_s: float = 10.0,
        trusted: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        """Connect to the broker as `device_id` and listen for acks.

        With `trusted` (the control-plane keys of the device's trust root, as for
        desired state) only acks the control plane signed count: one forged by another
        broker client would otherwise have the batch deleted from the buffer unstored.

        Raises:
            ValueError: `device_id` cannot be one topic level (a `+` or `#` in it would
                subscribe to other devices' acks).
            ConnectionError: the broker did not accept the connection.
        """
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device_id = topic_level(device_id)
        self._key = private_key
        self._trusted = trusted
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        self.topic = _TOPIC.format(device_id=device_id)
        self._cond = threading.Condition()
        self._awaited: int | None = None  # the last seq of the batch being sent
        self._ack: TelemetryAck | None = None
        self._ready = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}", protocol=mqtt.MQTTv5
        )
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._ready.set()
        client.on_message = self._on_message
        self._client = client
        client.connect(host, port)
        client.loop_start()
        if not self._ready.wait(5.0):
            client.disconnect()  # closes the socket, and the loop ends
            client.loop_stop()
            raise ConnectionError(f"MQTT broker {host}:{port} did not accept the device")

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(_ACK_TOPIC.format(device_id=self.device_id), qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.retain:  # the control plane never retains an ack
            return
        try:
            body = json.loads(msg.payload)
            if self._trusted is None:
                ack = TelemetryAck.model_validate(body)
            else:  # unsigned, or not by the control plane: not believed
                ack = verify_ack(body, self.device_id, self._trusted)
            last = int(body.get("last_seq", 0))
        except Exception:  # any payload at all (RecursionError too): an exception out of
            return  # this callback would end paho's network thread, and with it the uplink
        with self._cond:
            if last == self._awaited:
                self._ack = ack
                self._cond.notify_all()

    def send(self, batch: TelemetryBatch) -> TelemetryAck:
        """Publish one batch and wait for its ack.

        Only an ack naming this batch's last seq and arriving while it is awaited counts
        (signed by the control plane, when the uplink has its keys); one that came too
        late is dropped and the batch is sent again.

        Raises:
            RetryableError: the broker refused the publish or no ack came in time.
        """
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        body = encode_batch(batch)
        headers = sign_request(self._key, self.device_id, "MQTT", self.topic, body, self.clock())
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(headers.items())
        last = batch.records[-1].seq if batch.records else 0
        with self._cond:  # before the publish: the ack may come back before we wait
            self._awaited, self._ack = last, None
        try:
            info = self._client.publish(self.topic, body, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RetryableError(f"MQTT publish refused (rc={info.rc})")
            deadline = time.monotonic() + self.ack_timeout_s
            with self._cond:
                while self._ack is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RetryableError("no telemetry ack over MQTT in time")
                    self._cond.wait(remaining)
                return self._ack
        finally:
            with self._cond:
                self._awaited, self._ack = None, None

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()
