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

import gzip
import itertools
import json
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
