"""Telemetry batches: what an agent uploads to `POST /device/v1/telemetry`.

Every record carries a per-device sequence number, strictly increasing from 1 and
surviving agent restarts, so the control plane can store each `(device, seq)` exactly
once however often a batch is retried. The body is gzip-compressed JSON of a
`TelemetryBatch` sent with `Content-Encoding: gzip`; the request signature covers the
compressed bytes as sent.

Example:
    >>> batch = TelemetryBatch(records=[TelemetryRecord(seq=1, cls="event", ts=0.0,
    ...     kind="install.started", data={})])
    >>> decode_batch(encode_batch(batch)) == batch
    True
"""

from __future__ import annotations

import base64
import binascii
import gzip
import itertools
import json
import zlib
from collections.abc import Mapping
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgewise.bundle import canonical_json, key_id, verify_signature

__all__ = [
    "MAX_SEQ",
    "TELEMETRY_CLASSES",
    "TelemetryAck",
    "TelemetryBatch",
    "TelemetryClass",
    "TelemetryRecord",
    "decode_batch",
    "encode_batch",
    "inflate_batch",
    "sign_ack",
    "verify_ack",
]

TelemetryClass = Literal["event", "metric", "sample"]
# Highest priority first: a full buffer evicts from the end of this tuple.
TELEMETRY_CLASSES: tuple[TelemetryClass, ...] = ("event", "metric", "sample")

# Sequence numbers are stored as SQL BIGINT.
MAX_SEQ = 2**63 - 1

# A decompression bomb guard: no honest batch comes near this.
_MAX_DECODED_BYTES = 64 * 1024 * 1024


class TelemetryRecord(BaseModel):
    """One telemetry record as produced on the device."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1, le=MAX_SEQ, description="per device, from 1, strictly increasing")
    cls: TelemetryClass
    ts: float = Field(allow_inf_nan=False)  # stored as a number: NaN is not one
    kind: str = Field(min_length=1, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


def _zero_dropped() -> dict[str, int]:
    return {c: 0 for c in TELEMETRY_CLASSES}


class TelemetryBatch(BaseModel):
    """A batch of records plus the device's cumulative drop counters per class."""

    model_config = ConfigDict(extra="forbid")

    records: list[TelemetryRecord] = Field(default_factory=list)
    dropped: dict[str, int] = Field(default_factory=_zero_dropped)

    @field_validator("records")
    @classmethod
    def _strictly_increasing(cls, records: list[TelemetryRecord]) -> list[TelemetryRecord]:
        seqs = [r.seq for r in records]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError("record seq must be strictly increasing within a batch")
        return records

    @field_validator("dropped")
    @classmethod
    def _known_classes(cls, dropped: dict[str, int]) -> dict[str, int]:
        unknown = set(dropped) - set(TELEMETRY_CLASSES)
        if unknown:
            raise ValueError(f"unknown telemetry classes in dropped: {sorted(unknown)}")
        if any(v < 0 for v in dropped.values()):
            raise ValueError("dropped counts must be >= 0")
        return {c: int(dropped.get(c, 0)) for c in TELEMETRY_CLASSES}


class TelemetryAck(BaseModel):
    """The control plane's answer to a telemetry upload."""

    accepted: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    acked_seq: int = Field(ge=0, description="highest seq stored contiguously from 1")


_ACK_SIGNED = ("accepted", "duplicates", "acked_seq", "last_seq")


def _ack_bytes(device_id: str, body: Mapping[str, Any]) -> bytes:
    # What an ack's signature covers: its figures, the batch it answers and the device
    # it is for (so one device's ack cannot be replayed to another).
    return canonical_json({"device": device_id, **{k: body.get(k) for k in _ACK_SIGNED}})


def sign_ack(
    ack: TelemetryAck, device_id: str, last_seq: int, private_key: Ed25519PrivateKey
) -> dict[str, Any]:
    """An ack in its wire form over MQTT, signed with the control plane's key.

    Over MQTT anyone who may publish to the broker could send an ack; an agent that
    checks this signature believes only the control plane's. Agents that do not check
    it read the same fields as before (`last_seq` and the `TelemetryAck` ones).
    """
    body: dict[str, Any] = {**ack.model_dump(), "last_seq": int(last_seq)}
    body["key_id"] = key_id(private_key)
    body["signature"] = base64.b64encode(private_key.sign(_ack_bytes(device_id, body))).decode()
    return body


def verify_ack(
    body: Mapping[str, Any], device_id: str, trusted: Mapping[str, Ed25519PublicKey]
) -> TelemetryAck:
    """The ack in `body`, once its signature is checked against the control-plane keys.

    Raises:
        ValueError: unsigned, signed by a key not in `trusted`, or a bad signature.
        pydantic.ValidationError: not an ack.
    """
    ack = TelemetryAck.model_validate(body)
    key = trusted.get(str(body.get("key_id")))
    if key is None:
        raise ValueError("ack not signed by a trusted control-plane key")
    try:
        signature = base64.b64decode(str(body.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("ack signature is not base64") from None
    if not verify_signature(key, signature, _ack_bytes(device_id, body)):
        raise ValueError("bad ack signature")
    return ack


def encode_batch(batch: TelemetryBatch, level: int = 6) -> bytes:
    """The gzip-compressed JSON body of a telemetry upload."""
    raw = json.dumps(batch.model_dump(mode="json"), separators=(",", ":")).encode()
    # mtime=0 keeps the bytes deterministic, so a retried batch signs identically.
    return gzip.compress(raw, compresslevel=level, mtime=0)


def inflate_batch(body: bytes) -> bytes:
    """The JSON bytes of a gzip-compressed upload body (one gzip member or several).

    zlib straight, not `gzip.GzipFile`, whose Python-level reader cost a control plane
    ~10 % of its ingest time; the gzip trailer's CRC and length are checked all the same.

    Raises:
        ValueError: the body is not gzip, or too large once decompressed.
    """
    limit = _MAX_DECODED_BYTES + 1
    parts: list[bytes] = []
    size = 0
    rest = body
    while rest and size < limit:
        member = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
        try:
            part = member.decompress(rest, limit - size)
        except zlib.error as exc:
            raise ValueError(f"body is not valid gzip: {exc}") from exc
        parts.append(part)
        size += len(part)
        if not member.eof:
            if size >= limit:
                break
            raise ValueError("body is not valid gzip: it ends inside a member")
        # Another member, or padding with zero bytes (allowed, as gzip allows it), or
        # anything else (refused by the next round's header check).
        rest = member.unused_data.lstrip(b"\x00")
    if size > _MAX_DECODED_BYTES:
        raise ValueError("decompressed telemetry batch is too large")
    return b"".join(parts)


def decode_batch(body: bytes) -> TelemetryBatch:
    """Parse a gzip-compressed upload body.

    Raises:
        ValueError: the body is not gzip, too large once decompressed, or not a valid batch.
    """
    raw = inflate_batch(body)
    try:
        return TelemetryBatch.model_validate_json(raw)
    except Exception as exc:  # pydantic.ValidationError and JSON errors alike
        raise ValueError(f"invalid telemetry batch: {exc}") from exc
