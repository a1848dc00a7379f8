"""A compromised but enrolled device sends telemetry made to hurt, signed as it should be.

What it sends is refused with a 4xx or stored so that it breaks no view, alert round,
retention run, `/metrics` scrape or rollout gate of anyone else, and moves no figure
of the honest devices beside it: counters and histograms that are no counts (negative,
NaN, 10**400, strings), bounds of its own, feature sketches that fit no reference,
times in the far future, NaN and NUL where PostgreSQL takes neither, names past their
columns, thousands of made-up pipelines, a window of millions of buckets.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Text, cast, func, select

from edgewise.control import _schema as cs
from edgewise.control.rollout import GateSpec
from edgewise.control.rollout._gates import evaluate_gates
from edgewise.control.telemetry import (
    RetentionPolicy,
    WindowFigures,
    WindowMeta,
    cohort_figures,
    decode_upload,
    fleet_view,
    merged_drift,
    plan_retention,
)
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._ingest import MAX_WINDOW_CHARS, TelemetryIngest
from edgewise.control.telemetry._mqtt import MqttIngest
from edgewise.control.telemetry._service import TelemetryService
from edgewise.control.telemetry._views import MAX_DEVICE_STREAMS
from edgewise.drift import DriftReference
from edgewise.protocol import sign_request

from .conftest import add_device
from .test_telemetry_http import Server, server  # noqa: F401  (the fixture)
from .test_telemetry_mqtt import Fleet, _stored, _wait

NOW = 1_700_000_000.0


def _data(end: float = NOW - 30, **over: Any) -> dict[str, Any]:
    """An honest window: 3 % errors, p95 between 1 and 5 ms."""
    return {
        "pipeline": "p",
        "model": "m",
        "version": "1",
        "start": end - 60,
        "end": end,
        "counts": {"ok": 194, "failed": 6},
        "latency": {"bounds": [1.0, 5.0], "stages": {"total": {"counts": [100, 100, 0]}}},
        **over,
    }


def _honest(n: int = 3) -> list[WindowFigures]:
    return [WindowFigures.from_record(f"honest-{i}", _data()) for i in range(n)]


def _raw(records: list[str]) -> bytes:
    """A gzip upload body from record JSON texts (NaN, 1e400 and 10**400 as written)."""
    return gzip.compress(('{"records":[' + ",".join(records) + "]}").encode(), mtime=0)


def _rec(
    seq: int, data: str, ts: float = NOW - 30, cls: str = "metric", kind: str = "window"
) -> str:
    return f'{{"seq":{seq},"cls":"{cls}","ts":{ts!r},"kind":{json.dumps(kind)},"data":{data}}}'


def _text(data: dict[str, Any], **raw: str) -> str:
    """`data` as JSON with some values replaced by raw JSON text (`NaN`, `1e400`...)."""
    text = json.dumps({**data, **{k: f"@{k}@" for k in raw}})
    for k, v in raw.items():
        text = text.replace(f'"@{k}@"', v)
    return text


# -- figures: what one hostile window does to everyone's figures (pure) ----------------


@pytest.mark.parametrize(
    "counts",
    [
        {"ok": 10**400, "failed": 0},  # had raised OverflowError: every view a 500
        {"ok": 0, "failed": -(10**6)},  # had hidden every other device's failures
        {"ok": -1000, "failed": -5},
        {"ok": 1e308, "failed": 1e308},  # past MAX_COUNT: garbage
        {"ok": 2**64, "failed": 2**64},
        {"ok": 1.5, "failed": 0.5},
    ],
)
def test_counters_that_are_no_counts_move_no_figure(counts: dict[str, Any]) -> None:
    hostile = WindowFigures.from_record("hostile", _data(counts=counts))
    assert hostile.requests == 0 and hostile.errors == 0
    honest = _honest()
    rows = fleet_view([hostile, *honest], NOW)
    assert (rows[0].requests, rows[0].errors) == (600, 18)
    assert cohort_figures([hostile, *honest]).error_rate == pytest.approx(0.03)


def test_a_negative_failure_count_cannot_pass_the_error_gate_for_a_failing_phase() -> None:
    failing = [
        WindowFigures.from_record(f"d{i}", _data(counts={"ok": 150, "failed": 50}))
        for i in range(3)
    ]
    control = [
        WindowFigures.from_record(f"c{i}", _data(counts={"ok": 200, "failed": 0})) for i in range(3)
    ]
    hider = WindowFigures.from_record("hider", _data(counts={"ok": 150, "failed": -150}))
    spec = GateSpec(max_error_rate_delta=0.05, min_inferences=10)
    gates = evaluate_gates(spec, {}, [], cohort_figures([*failing, hider]), cohort_figures(control))
    gate = gates.by_name("error_rate_delta")
    assert gate is not None and gate.outcome.value == "fail"


@pytest.mark.parametrize(
    "latency",
    [
        {"bounds": [1.0, 5.0], "stages": {"total": {"counts": [10**400, 0, 0]}}},  # OverflowError
        {"bounds": [1.0, 5.0], "stages": {"total": {"counts": [1e308, 1e308, 0]}}},  # OverflowError
        {"bounds": [1.0, 5.0], "stages": {"total": {"counts": [-(10**9), 0, 10]}}},
        {"bounds": [1.0, 5.0], "stages": {"total": {"counts": ["100", "100", "0"]}}},
        {"bounds": [5.0, 1.0], "stages": {"total": {"counts": [100, 100, 0]}}},  # unsorted
        {"bounds": [1.0, 1.0], "stages": {"total": {"counts": [100, 100, 0]}}},  # duplicate
        {"bounds": [1.0, 10**400], "stages": {"total": {"counts": [1, 2, 3]}}},
    ],
)
def test_latency_histograms_that_are_no_histograms_move_no_percentile(
    latency: dict[str, Any],
) -> None:
    hostile = WindowFigures.from_record("hostile", _data(latency=latency))
    assert hostile.latency == ()
    honest = _honest()
    mixed = fleet_view([*honest, hostile], NOW)[0]
    alone = fleet_view(honest, NOW)[0]
    assert (mixed.p50_ms, mixed.p95_ms, mixed.p99_ms) == (alone.p50_ms, alone.p95_ms, alone.p99_ms)
    assert cohort_figures([hostile, *honest]).p95_latency_ms == alone.p95_ms


def test_one_device_on_bounds_of_its_own_does_not_take_over_the_percentiles() -> None:
    # Its window sorts first (the oldest); the first window's bounds used to win, and
    # every other device's histogram was skipped as "other bounds".
    own = {"bounds": [0.001], "stages": {"total": {"counts": [10**6, 0]}}}
    hostile = WindowFigures.from_record("hostile", _data(end=NOW - 3000, latency=own))
    honest = _honest()
    alone = fleet_view(honest, NOW)[0]
    assert fleet_view([hostile, *honest], NOW)[0].p95_ms == alone.p95_ms == pytest.approx(4.6)

    def windows(name: str, counts: list[int]) -> list[WindowFigures]:
        latency = {"bounds": [1.0, 5.0], "stages": {"total": {"counts": counts}}}
        return [WindowFigures.from_record(f"{name}{i}", _data(latency=latency)) for i in range(3)]

    control = cohort_figures(windows("fast", [200, 0, 0]))  # p95 under 1 ms
    slow = windows("slow", [0, 0, 200])  # past 5 ms
    spec = GateSpec(max_latency_ratio=1.2, min_inferences=10)
    gate = evaluate_gates(spec, {}, [], cohort_figures([hostile, *slow]), control).by_name(
        "latency_ratio"
    )
    assert gate is not None and gate.outcome.value == "fail"


# A small reference: 2 features on 3 bins, confidence on 2 bins, 2 classes.
_REF = DriftReference.build(
    [[0.0, 1.0, 2.0, 3.0]] * 2, [[1, 1, 1]] * 2, [0.0, 0.5, 1.0], [1, 1], [1, 1], 1000
)
_REFS = {"m@1": _REF}


def _sketch(**over: Any) -> dict[str, Any]:
    return {
        "features": [[50, 50, 50], [50, 50, 50]],
        "confidence": [75, 75],
        "classes": [75, 75],
        **over,
    }


@pytest.mark.parametrize(
    "features",
    [
        _sketch(features=[[-150, 0, 0], [50, 50, 50]]),  # had been a ValueError: a 400/500
        _sketch(classes=[-100, 400]),
        _sketch(features=[[2**64, 0, 0], [50, 50, 50]]),  # OverflowError
        _sketch(features=[[1e308, 0, 0], [50, 50, 50]]),  # OverflowError
        _sketch(features=[[[1], [2], [3]], [50, 50, 50]]),  # bins of bins: a ValueError
        _sketch(features=[["50", "50", "50"], [50, 50, 50]]),  # had been read as numbers
        _sketch(features=[[1.5, 2.5, 3.5], [50, 50, 50]]),  # had been cut to whole numbers
    ],
)
def test_feature_sketches_that_fit_no_reference_move_no_drift_score(
    features: dict[str, Any],
) -> None:
    drifted = _sketch(features=[[150, 0, 0], [0, 0, 150]])
    honest = [WindowFigures.from_record(f"h{i}", _data(features=drifted)) for i in range(2)]
    hostile = WindowFigures.from_record("hostile", _data(features=features))
    alone = merged_drift(honest, _REFS)
    assert alone[0] is not None and alone[0] > 1.0
    assert merged_drift([hostile, *honest], _REFS) == alone
    row = fleet_view([hostile, *honest], NOW, references=_REFS)[0]
    assert row.drift_score == pytest.approx(alone[0])


def test_sketches_summed_past_int64_saturate_instead_of_wrapping_negative() -> None:
    # 2**53 a bin is a count; 1,100 windows of it wrapped an int64 sum negative, which
    # the distances refuse (a ValueError: every view of the model failed).
    big = _sketch(features=[[2**53, 0, 0], [0, 0, 2**53]], classes=[2**53, 0])
    windows = [WindowFigures.from_record("hostile", _data(features=big)) for _ in range(1100)]
    score, shift = merged_drift(windows, _REFS)
    assert score is not None and math.isfinite(score) and shift is not None


@pytest.mark.parametrize(
    "drift",
    [
        {"score": 1e308, "samples": 2**53, "sufficient": True},  # twice: an infinite mean
        {"score": 5.0, "samples": 10**400, "sufficient": True},  # OverflowError
        {"score": 5.0, "samples": -150, "sufficient": True},  # flipped the mean's sign
        {"score": -1e308, "samples": 150, "sufficient": True},
    ],
)
def test_device_drift_scores_that_are_no_scores_leave_the_fleet_figure_finite(
    drift: dict[str, Any],
) -> None:
    honest = [
        WindowFigures.from_record(
            f"h{i}", _data(drift={"score": 0.5, "samples": 150, "sufficient": True})
        )
        for i in range(2)
    ]
    hostile = [WindowFigures.from_record(f"x{i}", _data(drift=drift)) for i in range(2)]
    rows = [r.to_dict() for r in fleet_view([*hostile, *honest], NOW)]
    json.dumps(rows, allow_nan=False)  # what the API answers with
    score = rows[0]["drift_score"]
    assert score is not None and math.isfinite(score) and score >= 0.5


def test_window_names_are_cut_to_their_columns_and_lose_nul() -> None:
    w = WindowFigures.from_record(
        "d", _data(pipeline="p\x00" + "p" * 500, model="m" * 500, version="v" * 500)
    )
    assert (len(w.pipeline), len(w.model), len(w.version)) == (200, 200, 64)
    assert "\x00" not in w.pipeline


# -- ingest and the service over SQL (SQLite and PostgreSQL) -------------------------------


def _hostile_device(store: Any) -> str:
    add_device(store, "hostile", "kh", {"site": "h"})
    return "hostile"


@pytest.mark.parametrize(
    "times",
    [
        {"end": "NaN", "start": "Infinity"},  # NaN had hit NOT NULL (SQLite), json (PostgreSQL)
        {"end": "1" + "0" * 400, "start": "0"},  # 10**400: OverflowError
    ],
)
def test_windows_with_times_that_are_no_times_are_stored_and_read(
    store: Any, times: dict[str, str]
) -> None:
    device = _hostile_device(store)
    body = _raw([_rec(1, _text(_data(), **times)), _rec(2, _text(_data()))])
    ack = TelemetryIngest(store.engine, clock=lambda: NOW).ingest(device, decode_upload(body))
    assert (ack.accepted, ack.acked_seq) == (2, 2)
    rows = TelemetryService(store.engine, clock=lambda: NOW).fleet_health(window_s=86400)
    assert rows[0]["requests"] == 400 and all(
        math.isfinite(v) for v in rows[0].values() if isinstance(v, float)
    )


def test_a_window_ending_in_the_far_future_ages_like_one_that_arrived_now(store: Any) -> None:
    device = _hostile_device(store)
    ingest = TelemetryIngest(store.engine, clock=lambda: NOW)
    ingest.ingest(
        device, decode_upload(_raw([_rec(1, json.dumps(_data(end=1e18, start=1e18 - 60)))]))
    )
    fresh = TelemetryService(store.engine, clock=lambda: NOW + 60).fleet_health(window_s=3600)
    assert fresh[0]["freshness_s"] == 0 and fresh[0]["requests"] == 200
    later = TelemetryService(store.engine, clock=lambda: NOW + 7200).fleet_health(window_s=3600)
    assert later == []  # gone from the views an hour on, as any window that arrived then
    with store.engine.connect() as c:
        end = c.execute(select(tt.telemetry_windows.c.end)).scalar_one()
    assert end <= NOW + 300  # the signature's skew bound


def test_nan_and_infinity_anywhere_in_data_are_stored_as_null(store: Any) -> None:
    # PostgreSQL's json type refuses the bare literals the model's parser takes: a 500
    # for the upload, and over MQTT the chunk of other devices' batches with it.
    device = _hostile_device(store)
    window = _text(_data(), resources='{"cpu_percent": NaN, "temperature_c": -Infinity}')
    event = '{"n": NaN, "x": [1e400, {"y": Infinity}]}'
    body = _raw([_rec(1, window), _rec(2, event, cls="event", kind="crash")])
    ack = TelemetryIngest(store.engine, clock=lambda: NOW).ingest(device, decode_upload(body))
    assert ack.accepted == 2
    tel = cs.telemetry
    with store.engine.connect() as c:
        datas = list(c.execute(select(tel.c.data).order_by(tel.c.seq)).scalars())
    assert datas[0]["resources"] == {"cpu_percent": None, "temperature_c": None}
    assert datas[1] == {"n": None, "x": [None, {"y": None}]}


def test_nul_in_a_kind_or_a_window_name_is_stored_without_it(store: Any) -> None:
    device = _hostile_device(store)
    window = json.dumps(_data(pipeline="p\x00q", model="m\x00", deployment="\x00"))
    body = _raw([_rec(1, window), _rec(2, '{"a": 1}', cls="event", kind="boot\x00ed")])
    ack = TelemetryIngest(store.engine, clock=lambda: NOW).ingest(device, decode_upload(body))
    assert ack.accepted == 2
    tel, tw = cs.telemetry, tt.telemetry_windows
    with store.engine.connect() as c:
        kinds = list(c.execute(select(tel.c.kind).order_by(tel.c.seq)).scalars())
        names = c.execute(select(tw.c.pipeline, tw.c.model, tw.c.deployment)).one()
    assert kinds == ["window", "boot\ufffded"]
    assert tuple(names) == ("pq", "m", "")


def test_long_and_nul_names_do_not_fail_alert_evaluation_for_everyone(store: Any) -> None:
    # alerts.scope is 300 characters: a 400-character pipeline name (or a NUL in one)
    # had failed the round's transaction on PostgreSQL, and every rule fell silent.
    device = _hostile_device(store)
    ingest = TelemetryIngest(store.engine, clock=lambda: NOW)
    drifting = {"score": 5.0, "samples": 500, "sufficient": True}
    ingest.ingest(
        device,
        decode_upload(
            _raw(
                [
                    _rec(1, json.dumps(_data(pipeline="x" * 400, drift=drifting))),
                    _rec(2, json.dumps(_data(pipeline="y\x00", model="m" * 400, drift=drifting))),
                ]
            )
        ),
    )
    ingest.ingest("dev-1", decode_upload(_raw([_rec(1, json.dumps(_data(drift=drifting)))])))
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    svc.put_rule({"name": "drift", "kind": "drift", "threshold": 1.0, "windows": 1}, "t")
    changes = svc.evaluate_alerts()
    assert sorted(c.scope for c in changes) == ["dev-1/p", f"hostile/{'x' * 200}", "hostile/y"]
    assert {a["scope"] for a in svc.alerts("firing")} >= {"dev-1/p"}


def test_a_device_naming_thousands_of_streams_opens_a_bounded_number_of_alerts(
    store: Any,
) -> None:
    device = _hostile_device(store)
    ingest = TelemetryIngest(store.engine, clock=lambda: NOW)
    drifting = {"score": 5.0, "samples": 500, "sufficient": True}
    made_up = MAX_DEVICE_STREAMS + 72
    ingest.ingest(
        device,
        decode_upload(
            _raw(
                [
                    _rec(i + 1, json.dumps(_data(pipeline=f"p{i}", model=f"m{i}", drift=drifting)))
                    for i in range(made_up)
                ]
            )
        ),
    )
    ingest.ingest("dev-1", decode_upload(_raw([_rec(1, json.dumps(_data(drift=drifting)))])))
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    svc.put_rule({"name": "drift", "kind": "drift", "threshold": 1.0, "windows": 1}, "t")
    svc.put_rule({"name": "slo", "kind": "burn_rate", "burn_rate": 1.0, "min_requests": 1}, "t")
    changes = svc.evaluate_alerts()
    hostile = [c for c in changes if device in c.devices]
    assert len([c for c in hostile if c.rule == "drift"]) == MAX_DEVICE_STREAMS
    assert len([c for c in hostile if c.rule == "slo"]) <= MAX_DEVICE_STREAMS
    assert {(c.rule, c.scope) for c in changes} >= {("drift", "dev-1/p"), ("slo", "m@1")}
    rows = svc.fleet_health(by="model", window_s=3600)
    assert len(rows) <= MAX_DEVICE_STREAMS + 1


def test_a_window_of_millions_of_buckets_is_kept_trimmed_where_views_read(store: Any) -> None:
    device = _hostile_device(store)
    n = 300_000
    huge = {"bounds": [1.0] * n, "stages": {"total": {"counts": [0] * (n + 1)}}}
    deep = "[" * 300 + "]" * 300  # past the serialiser's depth, not the decoder's
    body = _raw([_rec(1, _text(_data(latency=huge), extra=deep))])
    TelemetryIngest(store.engine, clock=lambda: NOW).ingest(device, decode_upload(body))
    tel, tw = cs.telemetry, tt.telemetry_windows
    with store.engine.connect() as c:
        kept = c.execute(select(tw.c.data)).scalar_one()
        logged = c.execute(select(func.length(cast(tel.c.data, Text)))).scalar_one()
    assert "latency" not in kept and sorted(kept["trimmed"]) == ["extra", "latency"]
    assert kept["counts"] == {"ok": 194, "failed": 6}  # what fits is kept
    assert logged > MAX_WINDOW_CHARS  # the log keeps the record as sent
    rows = TelemetryService(store.engine, clock=lambda: NOW).fleet_health()
    assert rows[0]["requests"] == 200 and rows[0]["p95_ms"] is None


def test_retention_merges_and_expires_past_windows_no_merge_can_read(store: Any) -> None:
    # A start of [1] had been a TypeError, a latency sum or CPU reading near 1e308 an
    # infinite mean PostgreSQL's json refuses, a 400-character model name too long for
    # its column: each failed the whole retention run, every hour, for every device.
    device = _hostile_device(store)
    old = NOW - 2 * 86400
    ingest = TelemetryIngest(store.engine, clock=lambda: NOW)
    garbage = [
        _text(_data(end=old), start="[1]"),
        _text(_data(end=old + 10), counts='{"ok": "many", "failed": -1}'),
        json.dumps(
            _data(
                end=old + 20,
                latency={
                    "bounds": [1.0, 5.0],
                    "stages": {"total": {"counts": [1, 1, 0], "sum": 1e308}},
                },
                resources={"cpu_percent": 1e308, "temperature_c": "hot"},
            )
        ),
        json.dumps(_data(end=old + 30, model="m" * 400, features={"features": [[-1]]})),
        _text(_data(end=old + 40), drift='{"score": 1e308, "samples": 1e308, "sufficient": true}'),
        # Nested as deep as the decoder goes: no sketch, and no recursion past the limit.
        _text(_data(end=old + 50), features='{"features": ' + "[" * 900 + "]" * 900 + "}"),
        _text(_data(end=old + 60), latency='{"bounds": ' + "[" * 900 + "]" * 900 + "}"),
    ]
    ingest.ingest(
        device, decode_upload(_raw([_rec(i + 1, d, ts=old) for i, d in enumerate(garbage)]))
    )
    ingest.ingest(
        "dev-1",
        decode_upload(_raw([_rec(i + 1, json.dumps(_data(end=old + i))) for i in range(3)])),
    )
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    done = svc.run_retention(RetentionPolicy())
    assert done["windows_merged"] == 10
    tw = tt.telemetry_windows
    with store.engine.connect() as c:
        merged = {
            (d, m[:3]): data
            for d, m, data in c.execute(
                select(tw.c.device_id, tw.c.model, tw.c.data).where(tw.c.downsampled)
            )
        }
    assert merged["dev-1", "m"]["counts"] == {"ok": 3 * 194, "failed": 3 * 6}
    # The window named for a model of 400 characters is a stream of its own.
    assert merged[device, "m"]["counts"] == {"ok": 5 * 194, "failed": 5 * 6}
    assert merged[device, "mmm"]["counts"] == {"ok": 194, "failed": 6}
    json.dumps(list(merged.values()), allow_nan=False)


def test_a_window_start_no_bucket_holds_is_kept_raw_not_a_failed_plan() -> None:
    # -1.7e308 over half a second is -inf: math.floor raised OverflowError, every run.
    windows = [
        WindowMeta(1, "hostile", "p", "m@1", -1.7e308, 10.0),
        WindowMeta(2, "honest", "p", "m@1", 0.0, 10.0),
    ]
    policy = RetentionPolicy(downsample_s=0.5, raw_keep_s=1.0, keep_s=1e12)
    plan = plan_retention(windows, 1e6, policy)
    assert [g.ids for g in plan.merges] == [(2,)] and plan.deletes == ()


def test_events_stamped_in_the_far_future_still_expire(store: Any) -> None:
    device = _hostile_device(store)
    arrived = NOW - 100 * 86400
    ingest = TelemetryIngest(store.engine, clock=lambda: arrived)
    ingest.ingest(
        device,
        decode_upload(
            _raw(
                [
                    _rec(1, "{}", ts=1e300, cls="event", kind="crash"),
                    _rec(2, "{}", ts=1e300, cls="sample", kind="input"),
                ]
            )
        ),
    )
    done = TelemetryService(store.engine, clock=lambda: NOW).run_retention(RetentionPolicy())
    assert (done["events_deleted"], done["samples_deleted"]) == (1, 1)


# -- the whole control plane over HTTP, and MQTT ----------------------------------------------


def _upload(plane: Server, device: str, key: Any, body: bytes) -> Any:
    path = "/device/v1/telemetry"
    headers = sign_request(key, device, "POST", path, body, time.time())
    headers.update({"content-type": "application/json", "content-encoding": "gzip"})
    return plane.http.post(path, content=body, headers=headers)


def test_a_hostile_device_gets_no_500_and_moves_no_other_devices_figures(
    server: Server,  # noqa: F811  (the fixture)
) -> None:
    now = time.time()
    honest, hkey = server.enroll({"site": "a"})
    records = [_rec(i + 1, json.dumps(_data(end=now - 60 * (5 - i))), ts=now) for i in range(5)]
    assert _upload(server, honest, hkey, _raw(records)).status_code == 200
    r = server.api(
        "PUT",
        "/api/v1/alert-rules/slo",
        json={"kind": "burn_rate", "burn_rate": 2.0, "min_requests": 1, "group_by": "label:site"},
    )
    assert r.status_code == 200
    assert [c["scope"] for c in server.api("POST", "/api/v1/alerts/evaluate").json()] == ["site=a"]
    before = {r["group"]: r for r in server.api("GET", "/api/v1/fleet/health").json()}

    hostile, key = server.enroll({"site": "a"})
    base = _data(end=now - 30)
    garbage = [
        _text(base, counts='{"ok": ' + "9" * 400 + ', "failed": -1000000}'),
        _text(base, end="NaN", start="1e400"),
        _text(base, end="1" + "0" * 400),
        json.dumps(
            {
                **base,
                "end": now - 290,
                "latency": {"bounds": [0.001], "stages": {"total": {"counts": [10**6, 0]}}},
            }
        ),
        json.dumps({**base, "drift": {"score": 1e308, "samples": 2**53, "sufficient": True}}),
        json.dumps({**base, "pipeline": "p\x00" * 300, "model": "m" * 300}),
        _text(base, resources='{"cpu_percent": NaN}'),
    ]
    body = _raw([_rec(i + 1, d, ts=now) for i, d in enumerate(garbage)])
    r = _upload(server, hostile, key, body)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(garbage)

    for path in ("/api/v1/fleet/health", "/api/v1/drift"):
        for by in ("model", "label:site", "pipeline"):
            got = server.api("GET", path, params={"by": by})
            assert got.status_code == 200, (path, by, got.text)
    after = {r["group"]: r for r in server.api("GET", "/api/v1/fleet/health").json()}
    assert after["m@1"]["p95_ms"] == before["m@1"]["p95_ms"]
    assert after["m@1"]["errors"] >= before["m@1"]["errors"]  # nothing hid a failure
    assert server.api("POST", "/api/v1/alerts/evaluate").status_code == 200
    firing = server.api("GET", "/api/v1/alerts", params={"state": "firing"}).json()
    assert "site=a" in {a["scope"] for a in firing}
    assert server.http.get("/metrics").status_code == 200
    assert server.api("POST", "/api/v1/telemetry/retention").status_code == 200


@pytest.fixture
def mqtt_plane(store: Any, mqtt_broker: tuple[str, int]) -> Iterator[tuple[Fleet, MqttIngest]]:
    import uuid

    fleet = Fleet(store)
    consumer = MqttIngest(
        TelemetryIngest(store.engine),
        fleet.verify,
        *mqtt_broker,
        client_id=f"cp-{uuid.uuid4().hex[:6]}",
        subscription=f"$share/t{uuid.uuid4().hex[:8]}/edgewise/telemetry/#",
    )
    consumer.start()
    yield fleet, consumer
    consumer.stop()


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_a_hostile_batch_over_mqtt_is_stored_and_the_broker_keeps_delivering(
    store: Any, mqtt_plane: tuple[Fleet, MqttIngest], mqtt_broker: tuple[str, int]
) -> None:
    # A batch ingest could not store had been left unacknowledged with every other
    # device's batch decoded alongside it, chunk after chunk.
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    fleet, consumer = mqtt_plane
    hostile, honest = fleet.add(), fleet.add()
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(*mqtt_broker)
    raw.loop_start()
    try:
        bodies = {
            hostile: _raw(
                [
                    _rec(1, _text(_data(), end="1" + "0" * 400)),
                    _rec(2, _text(_data(), counts='{"ok": NaN}')),
                    _rec(3, "{}", cls="event", kind="a\x00b"),
                ]
            ),
            honest: _raw([_rec(1, json.dumps(_data()))]),
        }
        for device, body in bodies.items():
            topic = f"edgewise/telemetry/{device}"
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = list(
                sign_request(fleet.keys[device], device, "MQTT", topic, body, time.time()).items()
            )
            raw.publish(topic, body, qos=1, properties=props).wait_for_publish(5)
    finally:
        raw.disconnect()
        raw.loop_stop()
    _wait(lambda: _stored(store, honest) == [1] and _stored(store, hostile) == [1, 2, 3])
    assert consumer.stats.failed_batches == 0


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_qos0_flood_is_shed_not_queued_without_bound(
    store: Any, mqtt_broker: tuple[str, int]
) -> None:
    # Any broker client may publish at QoS 0, which has no inflight window: every
    # message waited in memory while the consumer was busy, however many came.
    import threading
    import uuid

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    fleet = Fleet(store)
    gate = threading.Event()

    def slow_verify(headers: Any, topic: str, body: bytes) -> str:
        gate.wait(30)  # the consumer is busy while the flood arrives
        return fleet.verify(headers, topic, body)

    consumer = MqttIngest(
        TelemetryIngest(store.engine),
        slow_verify,
        *mqtt_broker,
        client_id=f"cp-{uuid.uuid4().hex[:6]}",
        subscription=f"$share/t{uuid.uuid4().hex[:8]}/edgewise/telemetry/#",
        max_batch=1,
        max_queued=50,
    )
    consumer.start()
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(*mqtt_broker)
    raw.loop_start()
    try:
        for i in range(500):
            raw.publish(f"edgewise/telemetry/flood-{i}", b"x" * 100, qos=0)
        _wait(lambda: consumer.stats.shed + consumer._queue.qsize() + 1 >= 500)
        assert consumer._queue.qsize() <= 50 and consumer.stats.shed >= 449
        gate.set()
        honest = fleet.add()
        topic = f"edgewise/telemetry/{honest}"
        body = _raw([_rec(1, json.dumps(_data()))])
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(
            sign_request(fleet.keys[honest], honest, "MQTT", topic, body, time.time()).items()
        )
        raw.publish(topic, body, qos=1, properties=props).wait_for_publish(5)
        _wait(lambda: _stored(store, honest) == [1])  # and it keeps serving devices
    finally:
        gate.set()
        raw.disconnect()
        raw.loop_stop()
        consumer.stop()


def test_a_window_stamped_in_the_far_future_counts_in_no_rollout_cohort(store: Any) -> None:
    # The rollout's cohort reader read the raw log by the device's own stamp: a window
    # stamped 1e300 counted in the control cohort of every phase of every later rollout.
    from edgewise.control._rollout_observe import CohortReader

    hostile, honest = _hostile_device(store), "honest"
    add_device(store, honest, "ko", {"site": "o"})
    ingest = TelemetryIngest(store.engine, clock=lambda: NOW)
    far = json.dumps(_data(end=1e300, start=1e300 - 60, counts={"ok": 0, "failed": 10**6}))
    ingest.ingest(hostile, decode_upload(_raw([_rec(1, far, ts=1e300)])))
    ingest.ingest(honest, decode_upload(_raw([_rec(1, json.dumps(_data()))])))
    reader = CohortReader(store.engine)
    models = {"p": ("m", "1")}
    got = reader.windows([hostile, honest], NOW - 600, models)
    assert [w.device_id for w in got] == [honest]
    assert reader.windows([hostile, honest], NOW + 86400, models) == []  # a day on: nothing


def test_one_device_reporting_huge_counts_cannot_hide_a_failing_phase() -> None:
    # Valid counts up to 2**53 pass every check; summed, one device's 2**50 answered
    # requests had made a phase failing at 25 % look error-free to the error gate.
    failing = [
        WindowFigures.from_record(f"d{i}", _data(counts={"ok": 150, "failed": 50}))
        for i in range(6)
    ]
    control = [
        WindowFigures.from_record(f"c{i}", _data(counts={"ok": 200, "failed": 0})) for i in range(6)
    ]
    hider = WindowFigures.from_record("hider", _data(counts={"ok": 2**50, "failed": 0}))
    spec = GateSpec(max_error_rate_delta=0.05, min_inferences=10)
    phase = cohort_figures([*failing, hider])
    gates = evaluate_gates(spec, {}, [], phase, cohort_figures(control))
    gate = gates.by_name("error_rate_delta")
    assert gate is not None and gate.outcome.value == "fail"
    assert phase.inferences == 6 * 200 + 10 * 200  # the hider counts as ten median devices
    # Honest devices of different sizes keep their weights within ten medians.
    sizes = [100, 300, 900, 2000]
    mixed = [
        WindowFigures.from_record(f"m{n}", _data(counts={"ok": n, "failed": 0})) for n in sizes
    ]
    assert cohort_figures(mixed).inferences == 3300
