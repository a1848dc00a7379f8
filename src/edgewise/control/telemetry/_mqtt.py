"""Telemetry ingest over MQTT: a shared subscription, QoS 1, exactly-once by (device, seq).

Wire format (the device side is `edgewise.agent.telemetry.MqttTelemetryUplink`):

- a device publishes to `edgewise/telemetry/<device id>`, QoS 1, MQTT 5, the payload
  being the same gzip-compressed `TelemetryBatch` as the HTTP body, and the four
  `X-Edgewise-*` signature headers as user properties, signed as method `MQTT` over
  the topic (the signature covers the compressed bytes as published);
- the control plane answers on `edgewise/devices/<device id>/telemetry/ack` (QoS 1)
  with the `TelemetryAck` JSON plus `last_seq`, the highest seq of the batch it acks,
  signed with its key (`key_id`, `signature`: `edgewise.protocol.sign_ack`), so an
  agent believes no ack another broker client forged.

The same connection pushes desired-state changes: when this control plane commits a new
desired revision for a device it publishes `{"revision": n}` to
`edgewise/devices/<device id>/desired` (QoS 1), where the agent's `MqttWake` listens and
polls at once. The push carries no state: the signed document still comes over HTTPS.

Every control plane subscribes to `$share/edgewise/edgewise/telemetry/#`, so the broker
hands each message to one of them. Messages are acknowledged to the broker (manual
PUBACK) only after the database transaction that stored them committed: a control
plane that dies mid-batch leaves them to be redelivered, and the (device, seq) keys
make the redelivery a no-op where it was stored after all. A worker thread verifies and
decodes what arrived meanwhile, and a second one writes each such chunk with one
`ingest_many` call (batched writes), so decoding overlaps the database work.

What waits to be verified is bounded. QoS 1 messages are bounded by the broker: the
consumer announces a Receive Maximum (`max_inflight`), so the broker sends no more
unacknowledged ones than that. QoS 0 messages have no such window (agents never send
telemetry at QoS 0, but any broker client can), so past `max_queued` waiting messages
they are shed and counted (`stats.shed`) instead of growing the queue without bound.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.control.telemetry._decode import TelemetryColumns, decode_upload
from edgewise.control.telemetry._ingest import TelemetryIngest
from edgewise.protocol import sign_ack

__all__ = [
    "ACK_TOPIC",
    "SHARED_SUBSCRIPTION",
    "TELEMETRY_TOPIC",
    "WAKE_TOPIC",
    "MqttIngest",
    "MqttIngestStats",
]

log = logging.getLogger("edgewise.control.telemetry.mqtt")

TELEMETRY_TOPIC = "edgewise/telemetry/{device_id}"
WAKE_TOPIC = "edgewise/devices/{device_id}/desired"
ACK_TOPIC = "edgewise/devices/{device_id}/telemetry/ack"
SHARED_SUBSCRIPTION = "$share/edgewise/edgewise/telemetry/#"
_PREFIX = "edgewise/telemetry/"

# verify(headers, topic, body) -> device id; raises on a bad signature or unknown device.
Verifier = Callable[[Mapping[str, str], str, bytes], str]


@dataclass
class MqttIngestStats:
    """Counters of one consumer."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    invalid: int = 0
    failed_batches: int = 0
    shed: int = 0  # QoS 0 messages dropped unread: the queue was full


@dataclass(frozen=True)
class _Msg:
    mid: int
    qos: int
    topic: str
    payload: bytes
    headers: dict[str, str]


class MqttIngest:
    """One control plane's MQTT telemetry consumer (start, then stop)."""

    def __init__(
        self,
        ingest: TelemetryIngest,
        verify: Verifier,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "",
        max_batch: int = 200,
        max_delay_s: float = 0.05,
        subscription: str = SHARED_SUBSCRIPTION,
        ack_key: Ed25519PrivateKey | None = None,
        max_inflight: int = 1000,
        max_queued: int = 2000,
    ) -> None:
        """Consume `subscription` on the broker at host:port into `ingest`.

        With `ack_key` (the control plane's signing key) every ack is signed, so an
        agent can tell it from one forged by anyone who may publish to the broker.
        """
        self.ingest = ingest
        self.ack_key = ack_key
        self.verify = verify
        self.host, self.port = host, port
        self.client_id = client_id
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.subscription = subscription
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.stats = MqttIngestStats()
        self._queue: queue.Queue[_Msg | None] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        # Decoded chunks waiting for the write stage: at most two ahead of it.
        self._writes: queue.Queue[tuple[list[tuple[str, TelemetryColumns]], list[_Msg]] | None]
        self._writes = queue.Queue(maxsize=2)
        self._worker: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._client: Any = None

    def start(self, timeout_s: float = 5.0) -> None:
        """Connect, subscribe and start the worker.

        Raises:
            ConnectionError: the broker did not accept the connection or subscription.
        """
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        client.on_disconnect = lambda *a: self._connected.clear()
        self._client = client
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self.max_inflight
        client.connect(self.host, self.port, properties=props)
        client.loop_start()
        if not (self._connected.wait(timeout_s) and self._subscribed.wait(timeout_s)):
            client.loop_stop()
            raise ConnectionError(f"MQTT broker {self.host}:{self.port} refused telemetry ingest")
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-write", daemon=True)
        self._writer.start()
        self._worker = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Finish what is queued, then disconnect."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
            self._worker = None
        if self._writer is not None:
            self._writer.join(timeout=10)
            self._writer = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def push_desired(self, device_id: str, revision: int) -> None:
        """Tell the device its desired state changed (QoS 1).

        paho queues the message while the broker is away. Thread-safe: recomputes run
        on worker threads.
        """
        client = self._client
        if client is not None:
            body = json.dumps({"revision": revision}).encode()
            client.publish(WAKE_TOPIC.format(device_id=device_id), body, qos=1)

    # -- paho callbacks (network thread: keep short) ----------------------------------

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        client.subscribe(self.subscription, qos=1)
        self._connected.set()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        pairs = getattr(props, "UserProperty", None) or []
        if msg.qos == 0 and self._queue.qsize() >= self.max_queued:
            self.stats.shed += 1
            return
        headers = {str(k): str(v) for k, v in pairs}
        self._queue.put(_Msg(msg.mid, msg.qos, msg.topic, bytes(msg.payload), headers))

    # -- worker -----------------------------------------------------------------------

    def _take(self) -> tuple[list[_Msg], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        msgs = [first]
        stop = False
        deadline = self.max_delay_s
        while len(msgs) < self.max_batch:
            try:
                item = self._queue.get(timeout=deadline)
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            msgs.append(item)
            deadline = 0.0 if self._queue.qsize() else self.max_delay_s / 10
        return msgs, stop

    def _run(self) -> None:
        # The decode stage: verifies and decodes the next messages while the write stage
        # stores the previous ones (the database work overlaps the decoding).
        while True:
            msgs, stop = self._take()
            if msgs:
                self._writes.put(self._decode(msgs))
            if stop:
                self._writes.put(None)
                return

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            self._store(*job)

    def _decode(self, msgs: list[_Msg]) -> tuple[list[tuple[str, TelemetryColumns]], list[_Msg]]:
        items: list[tuple[str, TelemetryColumns]] = []
        done: list[_Msg] = []
        for m in msgs:
            self.stats.received += 1
            if not m.topic.startswith(_PREFIX):
                self.stats.invalid += 1
                done.append(m)
                continue
            try:
                device_id = self.verify(m.headers, m.topic, m.payload)
            except Exception as exc:  # bad signature, unknown device, replay: drop it
                log.info("refused MQTT telemetry on %s: %s", m.topic, exc)
                self.stats.rejected += 1
                done.append(m)
                continue
            if m.topic != _PREFIX + device_id:
                self.stats.rejected += 1
                done.append(m)
                continue
            try:
                batch = decode_upload(m.payload)
            except ValueError:
                self.stats.invalid += 1
                done.append(m)
                continue
            items.append((device_id, batch))
            done.append(m)
        return items, done

    def _store(self, items: list[tuple[str, TelemetryColumns]], done: list[_Msg]) -> None:
        if items:
            try:
                result = self.ingest.ingest_many(items)
            except Exception:  # the database is down: let the broker redeliver later
                log.exception("MQTT telemetry ingest failed; messages left unacknowledged")
                self.stats.failed_batches += 1
                return
            self.stats.stored += result.inserted
            for (device_id, batch), ack in zip(items, result.acks, strict=True):
                self.stats.duplicates += ack.duplicates
                last = batch.seq[-1] if batch.seq else 0
                if self.ack_key is not None:
                    body = sign_ack(ack, device_id, last, self.ack_key)
                else:
                    body = {**ack.model_dump(), "last_seq": last}
                self._client.publish(ACK_TOPIC.format(device_id=device_id), json.dumps(body), qos=1)
        for m in done:
            if m.qos > 0:
                self._client.ack(m.mid, m.qos)
