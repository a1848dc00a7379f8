"""The control plane's column decoder accepts and refuses exactly what the protocol model does."""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        {"records": [], "dropped": None},
        {"records": [_rec(data=None)]},
        {"records": [_rec(data="{}")]},
        [1, 2, 3],
    ],
)
def test_what_the_model_refuses_is_refused(doc: Any) -> None:
    with pytest.raises(ValueError):
        _same(_body(doc))


def test_non_finite_timestamps_deep_nesting_and_bad_gzip_follow_the_model() -> None:
    for ts in ("Infinity", "NaN", "-Infinity", "1e400"):  # a time is a finite number
        with pytest.raises(ValueError, match="invalid telemetry batch"):
            _same(_raw('{"records":[{"seq":1,"cls":"metric","ts":' + ts + ',"kind":"k"}]}'))
    nested = "[" * 5000 + "]" * 5000
    deep = '{"records":[{"seq":1,"cls":"metric","ts":1,"kind":"k","data":{"a":' + nested + "}}]}"
    with pytest.raises(ValueError, match="invalid telemetry batch"):  # not RecursionError
        decode_upload(_raw(deep))
    with pytest.raises(ValueError, match="gzip"):
        decode_upload(b"not gzip")
    with pytest.raises(ValueError):
        decode_upload(_raw('{"records": [}'))


def test_data_is_kept_as_the_json_text_it_arrived_as_and_still_checked() -> None:
    pretty = (
        '{"records":[{"seq":1,"cls":"metric","ts":1,"kind":"k","data":\n {"a" :\t[1, 2], "a": 3}}]}'
    )
    got = _same(_raw(pretty))
    assert got.data == ['{"a" :\t[1, 2], "a": 3}'] and json.loads(got.data[0]) == {"a": 3}
    window = '{"records":[{"seq":4,"cls":"metric","ts":1,"kind":"window","data":{"end": 2.5}}]}'
    assert _same(_raw(window)).windows == {4: {"end": 2.5}}
    huge = window.replace("2.5", "1e400").replace("}}]", ',"n":-9223372036854775809}}]')
    assert _same(_raw(huge)).windows == {4: {"end": float("inf"), "n": -(2**63) - 1}}
    one = '{"records":[{"seq":1,"cls":"metric","ts":1,"kind":"k","data":%s}]}'
    for broken in ('{"a":}', '{"a":1', "{'a':1}", '{"a":1}}'):
        with pytest.raises(ValueError):
            _same(_raw(one % broken))
    _same(_raw(one % '{"a":NaN}'))  # not JSON, but the model's parser takes it: so do we


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**70]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
_KINDS = ["k", "window", "k" * 200]
_data = st.dictionaries(st.text(max_size=3), st.recursive(_values, st.lists, max_leaves=4))
_record = st.fixed_dictionaries(
    {
        "seq": st.integers(min_value=1, max_value=3),  # offset by position below
        "cls": st.sampled_from(["event", "metric", "sample"]),
        "ts": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-9, 9)),
        "kind": st.one_of(
            st.sampled_from(["k", "window", "k" * 200]), st.text(min_size=1, max_size=5)
        ),
    },
    optional={"data": _data},
)
# What to put in place of a field: each rule's edge, in both directions.
_EDGES: dict[str, list[Any]] = {
    "seq": [0, -1, 2**63, 2**63 - 1, "3", 1.0, True, None, 10**30],
    "cls": ["bogus", "", ["metric"], None, 1],
    "ts": ["1.5", None, True, 2**70, [1.0]],
    "kind": ["", "k" * 201, "k" * 200, "\u00e9" * 200, 1, None],
    "data": [None, [1], "x", 1, {"a": 2**70}, {"a": {"b": [None, 1.5e300]}}, {"a": 1e400}],
    "extra": [1, None],
}
_DROPPED = [{"event": -1}, {"event": 0}, {"bogus": 1}, None, [], {"sample": "3"}, {"sample": 1.5}]


@st.composite
def _documents(draw: st.DrawFn) -> Any:
    """A valid batch, then maybe one thing in it changed to an edge of some rule."""
    records = draw(st.lists(_record, min_size=1, max_size=4))
    for i, r in enumerate(records):
        r["seq"] += 3 * i
    doc: dict[str, Any] = {"records": records}
    if draw(st.booleans()):
        doc["dropped"] = draw(
            st.dictionaries(st.sampled_from(["event", "sample"]), st.integers(0, 9))
        )
    what = draw(st.sampled_from(["none", "dropped", "records", "other", "order", *["field"] * 6]))
    if what == "dropped":
        doc["dropped"] = draw(st.sampled_from(_DROPPED))
    elif what == "records":
        doc["records"] = draw(st.sampled_from([None, {}, "x", [None], [[1, "metric", 1.0, "k"]]]))
    elif what == "other":
        doc["other"] = 1
    elif what == "order" and len(records) > 1:
        i = draw(st.integers(1, len(records) - 1))
        records[i]["seq"] = records[i - 1]["seq"] - draw(st.integers(0, 1))
    elif what == "field" and records:
        name = draw(st.sampled_from(sorted(_EDGES)))
        record = records[draw(st.integers(0, len(records) - 1))]
        record[name] = draw(st.sampled_from(_EDGES[name]))
        if name == "data" and draw(st.booleans()):  # a window's data is parsed as well
            record.update(cls="metric", kind="window")
    return doc


@settings(max_examples=500, deadline=None)
@given(_documents())
def test_any_document_is_accepted_or_refused_as_the_model_does(doc: Any) -> None:
    with contextlib.suppress(ValueError):  # both refused it (`_same` checks that)
        _same(_body(doc))


def _gzipfile_inflate(body: bytes, limit: int) -> bytes:
    """What inflate_batch did with gzip.GzipFile: the reference for the zlib version."""
    import io

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
            raw = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error escaped it: a 500 then
        raise ValueError(f"body is not valid gzip: {exc}") from exc
    if len(raw) > limit:
        raise ValueError("decompressed telemetry batch is too large")
    return raw


def _bodies() -> list[bytes]:
    one = gzip.compress(b'{"records":[]}', mtime=0)
    big = gzip.compress(b"x" * 5000, mtime=0)
    named = io_gzip(b"{}", name="batch.json")
    corrupt_crc = one[:-8] + bytes([one[-8] ^ 1]) + one[-7:]
    wrong_size = one[:-4] + bytes([one[-4] ^ 1]) + one[-3:]
    return [
        b"",
        one,
        named,
        one + one,  # two members
        one + gzip.compress(b"x" * 3000, mtime=0),
        big,  # over the (lowered) limit
        one + big,
        one[:-1],  # ends inside a member
        one[:5],
        one + b"\x00\x00",  # padding
        one + b"\x00\x00" + one,
        one + b"junk",
        b"not gzip at all",
        corrupt_crc,
        wrong_size,
        one[:10] + b"\xff" * 10 + one[20:],  # a damaged deflate stream
    ]


def io_gzip(data: bytes, name: str) -> bytes:
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


@pytest.mark.parametrize("i", range(len(_bodies())))
def test_inflate_agrees_with_gzipfile_on_every_kind_of_body(
    i: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.protocol import _telemetry

    monkeypatch.setattr(_telemetry, "_MAX_DECODED_BYTES", 4096)
    body = _bodies()[i]
    try:
        expected: bytes | str = _gzipfile_inflate(body, 4096)
    except ValueError as exc:
        expected = "too large" if "too large" in str(exc) else "not gzip"
    try:
        got: bytes | str = _telemetry.inflate_batch(body)
    except ValueError as exc:
        got = "too large" if "too large" in str(exc) else "not gzip"
        assert str(exc).startswith(("body is not valid gzip", "decompressed telemetry"))
    assert got == expected
