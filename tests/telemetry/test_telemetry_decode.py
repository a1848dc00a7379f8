"""The control plane's column decoder accepts and refuses exactly what the protocol model does."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from edgewise.control.telemetry._decode import TelemetryColumns, _fast, decode_upload
from edgewise.protocol import TelemetryBatch, TelemetryRecord, decode_batch, encode_batch


def _body(doc: Any) -> bytes:
    return gzip.compress(json.dumps(doc).encode(), mtime=0)


def _raw(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


def _rec(seq: Any = 1, **over: Any) -> dict[str, Any]:
    return {"seq": seq, "cls": "metric", "ts": 1.5, "kind": "cpu", "data": {"v": 1}, **over}


def _same(body: bytes) -> TelemetryColumns:
    """Decode with both; they must agree on the outcome and on the columns."""
    try:
        expected = TelemetryColumns.of(decode_batch(body))
    except ValueError:
        with pytest.raises(ValueError, match=r"invalid telemetry batch|not valid gzip"):
            decode_upload(body)
        raise
    got = decode_upload(body)
    assert (got.seq, got.cls, got.ts, got.kind) == (
        expected.seq,
        expected.cls,
        expected.ts,
        expected.kind,
    )
    assert [json.loads(d) for d in got.data] == [json.loads(d) for d in expected.data]
    assert got.windows == expected.windows and got.dropped == expected.dropped
    return got


def test_a_plain_batch_takes_the_fast_path_and_matches_the_model() -> None:
    window = TelemetryRecord(
        seq=3, cls="metric", ts=9.0, kind="window", data={"end": 9.0, "counts": {"ok": 2}}
    )
    batch = TelemetryBatch(
        records=[
            TelemetryRecord(seq=1, cls="event", ts=1.0, kind="boot", data={}),
            TelemetryRecord(seq=2, cls="sample", ts=2.0, kind="s", data={"x": "tab\there"}),
            window,
        ],
        dropped={"sample": 4},
    )
    raw = gzip.decompress(encode_batch(batch))
    assert _fast(raw) is not None
    got = _same(encode_batch(batch))
    assert got.windows == {3: window.data}
    assert got.dropped == {"event": 0, "metric": 0, "sample": 4}


@pytest.mark.parametrize(
    "doc",
    [
        {"records": [_rec(seq="3")]},  # pydantic coerces a numeric string
        {"records": [_rec(ts=2)]},  # an int timestamp
        {"records": [_rec(seq=True)]},  # lax mode: true is 1
        {"records": [{k: v for k, v in _rec().items() if k != "data"}]},  # data defaults to {}
        {"records": []},
        {},
    ],
)
def test_what_the_model_accepts_is_accepted_with_the_same_columns(doc: Any) -> None:
    _same(_body(doc))


@pytest.mark.parametrize(
    "doc",
    [
        {"records": [_rec(seq=0)]},
        {"records": [_rec(seq=2**63)]},  # beyond SQL BIGINT
        {"records": [_rec(seq=2), _rec(seq=2)]},
        {"records": [_rec(seq=3), _rec(seq=2)]},
        {"records": [_rec(cls="bogus")]},
        {"records": [_rec(cls=["metric"])]},
        {"records": [_rec(kind="")]},
        {"records": [_rec(kind="k" * 201)]},
        {"records": [_rec(data=[1, 2])]},
        {"records": [_rec(extra=1)]},
        {"records": [{"seq": 1, "cls": "metric", "ts": 1.0}]},
        {"records": [[1, "metric", 1.0, "k", {}]]},
        {"records": {"seq": 1}},
        {"records": [], "dropped": {"bogus": 1}},
        {"records": [], "dropped": {"sample": -1}},
        {"records": [], "other": 1},
        [1, 2, 3],
    ],
)
def test_what_the_model_refuses_is_refused(doc: Any) -> None:
    with pytest.raises(ValueError):
        _same(_body(doc))


def test_infinity_literals_and_bad_gzip_follow_the_model() -> None:
    got = _same(_raw('{"records":[{"seq":1,"cls":"metric","ts":Infinity,"kind":"k"}]}'))
    assert got.ts == [float("inf")]
    with pytest.raises(ValueError, match="gzip"):
        decode_upload(b"not gzip")
    with pytest.raises(ValueError):
        decode_upload(_raw('{"records": [}'))
