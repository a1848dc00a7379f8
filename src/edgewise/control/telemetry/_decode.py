"""Decoding telemetry uploads on the control plane: straight to columns, no record objects.

The wire format is the protocol's (`edgewise.protocol.TelemetryBatch`, gzip JSON); the
control plane does not need one pydantic object per record to store it. Building those
objects cost about 9 us a record, most of it allocator and garbage-collector work on
objects that live only until the rows are written. `decode_upload` decodes the body
with msgspec into structs that the garbage collector does not track, checks the rules
a column at a time, and keeps five plain lists: seq, class, timestamp, kind, and each
record's `data` as the JSON text it arrived as (syntax-checked, never parsed into
objects), which is what the log stores. The parsed `data` of `window` records, which
the ingest decodes into `telemetry_windows`, is kept as well. About 0.6 us a record
against 1.6 us when `data` was parsed with orjson and serialised back.

Anything the fast path does not recognise as a plainly valid batch (a coercible value
such as `"seq": "3"`, NaN literals, an error of any kind) is handed to pydantic's
`TelemetryBatch` validation, so what is accepted and what is refused, and with which
message, stays exactly the protocol model's.

Usage::

    cols = decode_upload(body)          # raises ValueError -> a 422
    cols = TelemetryColumns.of(batch)   # from an already validated batch
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from pydantic_core import to_json

from edgewise.protocol import MAX_SEQ, TELEMETRY_CLASSES, TelemetryBatch, inflate_batch

__all__ = ["TelemetryColumns", "decode_upload", "is_window"]

_CLASSES = frozenset(TELEMETRY_CLASSES)


def is_window(cls: str, kind: str) -> bool:
    """Whether a record is an agent's window (decoded into `telemetry_windows`)."""
    return cls == "metric" and kind == "window"


def _json_text(data: Any) -> str:
    # pydantic-core's serialiser for data that came through pydantic (NaN and friends).
    # The model's parser takes NaN and Infinity (and 1e400 as infinity), which are not
    # JSON: PostgreSQL's json column refused them, a 500 for the whole upload (and on
    # MQTT a chunk of other devices' batches left unacknowledged). They are stored as
    # null, on SQLite alike.
    return to_json(data, fallback=str, inf_nan_mode="null").decode()


@dataclass(slots=True)
class TelemetryColumns:
    """One validated batch as parallel columns, seq strictly increasing.

    Attributes:
        seq: per-device sequence numbers, strictly increasing.
        cls: telemetry class per record (event, metric, sample).
        ts: device timestamp per record.
        kind: record kind per record.
        data: each record's `data` as compact JSON text (what the log stores).
        windows: parsed `data` of the window records, by seq.
        dropped: the device's cumulative drop counters, one per class.
    """

    seq: list[int] = field(default_factory=list)
    cls: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    windows: dict[int, dict[str, Any]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        """The number of records."""
        return len(self.seq)

    @classmethod
    def of(cls, batch: TelemetryBatch) -> TelemetryColumns:
        """The columns of a validated protocol batch."""
        recs = batch.records
        return cls(
            [r.seq for r in recs],
            [r.cls for r in recs],
            [r.ts for r in recs],
            [r.kind for r in recs],
            [_json_text(r.data) for r in recs],
            {r.seq: r.data for r in recs if is_window(r.cls, r.kind)},
            dict(batch.dropped),
        )

    def sliced(self, start: int, stop: int | None = None) -> TelemetryColumns:
        """Records `start:stop` (the drop counters travel along)."""
        seq = self.seq[start:stop]
        windows = self.windows
        if windows and (start or stop is not None):
            keep = set(seq)
            windows = {s: d for s, d in windows.items() if s in keep}
        return TelemetryColumns(
            seq,
            self.cls[start:stop],
            self.ts[start:stop],
            self.kind[start:stop],
            self.data[start:stop],
            windows,
            self.dropped,
        )

    def picked(self, positions: Iterable[int]) -> TelemetryColumns:
        """The records at `positions` (ascending), drop counters along."""
        idx = list(positions)
        seq = [self.seq[i] for i in idx]
        keep = set(seq)
        return TelemetryColumns(
            seq,
            [self.cls[i] for i in idx],
            [self.ts[i] for i in idx],
            [self.kind[i] for i in idx],
            [self.data[i] for i in idx],
            {s: d for s, d in self.windows.items() if s in keep},
            self.dropped,
        )


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    seq: int
    cls: str
    ts: float
    kind: str
    data: msgspec.Raw = msgspec.Raw(b"{}")


class _Batch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    records: list[_Record] = []
    dropped: dict[str, int] | msgspec.UnsetType = msgspec.UNSET  # null goes to pydantic


_BATCH = msgspec.json.Decoder(_Batch)
_ANY = msgspec.json.Decoder()


def _fast(raw: bytes) -> TelemetryColumns | None:
    """The columns of a plainly valid batch; None where pydantic must decide.

    msgspec decodes the body into typed structs in C, strictly (no coercion: `"3"` for a
    seq, `true` for a number, `null` for the counters all go to pydantic), and leaves
    each record's `data` as its raw JSON text: syntax-checked, never turned into
    objects. That text is what the log stores, so parsing it into dicts and
    serialising them back (two thirds of the decode before) is skipped; only window
    records, which the ingest decodes, are parsed. The remaining rules run a column at
    a time over C-level iterators (`map`, `set`), not a Python loop per record.
    """
    try:
        doc = _BATCH.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included
        return None  # (nesting deeper than msgspec goes: pydantic refuses it by name)
    dropped: dict[str, int] = {c: 0 for c in TELEMETRY_CLASSES}
    if doc.dropped is not msgspec.UNSET:
        for k, v in doc.dropped.items():
            if k not in dropped or v < 0:
                return None
            dropped[k] = v
    records = doc.records
    if not records:
        return TelemetryColumns(dropped=dropped)
    seqs = [r.seq for r in records]
    classes = [r.cls for r in records]
    kinds = [r.kind for r in records]
    texts = [str(r.data, "utf-8") for r in records]
    if (
        seqs[0] < 1
        or seqs[-1] > MAX_SEQ
        or not all(map(operator.lt, seqs, itertools.islice(seqs, 1, None)))
        or not set(classes) <= _CLASSES
        or min(map(len, kinds)) < 1
        or max(map(len, kinds)) > 200
        or set(map(operator.itemgetter(0), texts)) != {"{"}  # each data is an object
    ):
        return None
    windows: dict[int, dict[str, Any]] = {}
    if "window" in kinds:
        try:  # msgspec keeps ints beyond 64 bits exact, as pydantic (orjson makes floats)
            windows = {
                s: _ANY.decode(t)
                for s, c, k, t in zip(seqs, classes, kinds, texts, strict=True)
                if is_window(c, k)
            }
        except msgspec.DecodeError:  # 1e400 and the like: the model's call
            return None
    return TelemetryColumns(seqs, classes, [r.ts for r in records], kinds, texts, windows, dropped)


def decode_upload(body: bytes) -> TelemetryColumns:
    """Parse a gzip-compressed telemetry upload into columns.

    Raises:
        ValueError: the body is not gzip, too large once decompressed, or not a valid
            `TelemetryBatch` (the message is pydantic's).
    """
    raw = inflate_batch(body)
    cols = _fast(raw)
    if cols is not None:
        return cols
    try:
        batch = TelemetryBatch.model_validate_json(raw)
    except Exception as exc:  # pydantic.ValidationError and JSON errors alike
        raise ValueError(f"invalid telemetry batch: {exc}") from exc
    return TelemetryColumns.of(batch)
