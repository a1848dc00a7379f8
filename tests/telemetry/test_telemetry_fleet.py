"""Fleet views, cohort figures for rollout gates, retention plans (pure, control side)."""

from __future__ import annotations

from typing import Any

import pytest

from edgewise.agent.telemetry import reference_from_manifest
from edgewise.control.rollout import GateOutcome, GateSpec, evaluate_gates
from edgewise.control.telemetry import (
    RetentionPolicy,
    WindowFigures,
    WindowMeta,
    cohort_figures,
    fleet_view,
    histogram_quantile,
    merge_window_data,
    plan_retention,
)
from edgewise.control.telemetry._views import rebin
from edgewise.drift import DEFAULT_CONFIDENCE_EDGES

BOUNDS = [1.0, 2.0, 5.0, 10.0]


def window(
    device: str,
    end: float,
    ok: int = 100,
    failed: int = 0,
    latency: list[int] | None = None,
    model: str = "m",
    version: str = "1.0.0",
    drift: float | None = None,
    labels: dict[str, str] | None = None,
    conf: list[int] | None = None,
) -> WindowFigures:
    data: dict[str, Any] = {
        "pipeline": "p",
        "model": model,
        "version": version,
        "deployment": "d1",
        "start": end - 10,
        "end": end,
        "counts": {"ok": ok, "failed": failed},
        "latency": {
            "bounds": BOUNDS,
            "stages": {"total": {"counts": latency or [0, ok + failed, 0, 0, 0], "sum": 0}},
        },
        "confidence": {"edges": [0.0, 0.5, 1.0], "counts": conf or [10, 90]},
    }
    if drift is not None:
        data["drift"] = {"score": drift, "samples": 150, "sufficient": True}
    return WindowFigures.from_record(device, data, labels)


def test_quantiles_interpolate_inside_buckets_like_prometheus() -> None:
    assert histogram_quantile(BOUNDS, [0, 10, 0, 0, 0], 0.5) == pytest.approx(1.5)
    assert histogram_quantile(BOUNDS, [50, 0, 50, 0, 0], 0.95) == pytest.approx(4.7)
    assert histogram_quantile(BOUNDS, [0, 0, 0, 0, 5], 0.99) == 10.0  # overflow: lower bound
    assert histogram_quantile(BOUNDS, [0, 0, 0, 0, 0], 0.5) is None


def test_fleet_view_merges_histograms_per_model_version() -> None:
    windows = [
        window("a", 100, latency=[100, 0, 0, 0, 0]),
        window("b", 95, ok=90, failed=10, latency=[0, 0, 100, 0, 0]),
        window("c", 50, version="2.0.0", latency=[0, 0, 0, 100, 0]),
    ]
    rows = {r.group: r for r in fleet_view(windows, now=110, by="model")}
    v1 = rows["m@1.0.0"]
    assert (v1.devices_reporting, v1.requests, v1.errors) == (2, 200, 10)
    assert v1.success_rate == pytest.approx(0.95)
    assert v1.p50_ms == pytest.approx(1.0) and v1.p99_ms == pytest.approx(4.94)
    assert v1.freshness_s == 10 and v1.stalest_s == 15
    assert rows["m@2.0.0"].p95_ms == pytest.approx(9.75)


def test_fleet_view_by_label_group_and_bad_grouping() -> None:
    windows = [window("a", 1, labels={"site": "s1"}), window("b", 1, labels={"site": "s2"})]
    assert [r.group for r in fleet_view(windows, 2, by="label:site")] == ["site=s1", "site=s2"]
    with pytest.raises(ValueError):
        fleet_view(windows, 2, by="colour")


def test_malformed_window_data_reads_as_empty_not_an_error() -> None:
    w = WindowFigures.from_record(
        "a",
        {"counts": {"ok": "x"}, "latency": {"bounds": [1], "stages": {"total": {"counts": [1]}}}},
    )
    assert w.requests == 0 and w.latency == ()


def test_cohort_figures_feed_the_rollout_quality_gates() -> None:
    control = cohort_figures([window("a", 10, latency=[100, 0, 0, 0, 0])])
    slow_phase = cohort_figures([window("b", 10, ok=90, failed=10, latency=[0, 0, 0, 100, 0])])
    assert slow_phase.inferences == 100 and slow_phase.errors == 10
    # Rebinned onto the fleet-wide edges: 10 over [0, .5), 90 over [.5, 1] spread evenly.
    assert slow_phase.confidence_counts == (6, 4, 18, 18, 18, 18, 9, 5, 2, 2)
    spec = GateSpec(max_latency_ratio=1.5, max_error_rate_delta=0.05, min_reporting=0)
    evaluation = evaluate_gates(spec, {}, [], slow_phase, control)
    assert evaluation.by_name("latency_ratio").outcome is GateOutcome.FAIL  # type: ignore[union-attr]
    assert evaluation.by_name("error_rate_delta").outcome is GateOutcome.FAIL  # type: ignore[union-attr]


def test_a_model_answering_nan_fails_the_error_gate_though_every_request_got_an_answer() -> None:
    # The runtime keeps NaN scores out of the confidence histogram, so without this the
    # only trace of a model answering NaN would be a counter no gate read.
    answers_nan = WindowFigures.from_record("b", {"counts": {"ok": 200, "nonfinite": 200}})
    phase = cohort_figures([answers_nan])
    assert (phase.inferences, phase.errors) == (200, 200)
    assert (answers_nan.requests, answers_nan.errors) == (200, 200)
    control = cohort_figures([window("a", 10, ok=200)])
    spec = GateSpec(max_error_rate_delta=0.05, min_reporting=0)
    verdict = evaluate_gates(spec, {}, [], phase, control).by_name("error_rate_delta")
    assert verdict is not None and verdict.outcome is GateOutcome.FAIL


def test_rebin_keeps_the_mass_and_maps_it_by_overlap() -> None:
    grid = list(DEFAULT_CONFIDENCE_EDGES)
    assert rebin(grid, list(range(10)), grid) == [float(i) for i in range(10)]
    out = rebin([0.0, 0.5, 1.0], [10, 90], [0.0, 0.25, 0.75, 1.0])
    assert out == pytest.approx([5.0, 5.0 + 45.0, 45.0])
    outside = rebin([-1.0, -0.5, 0.5, 2.0], [3, 4, 6], [0.0, 0.5, 1.0])
    assert outside == pytest.approx([3 + 4, 6])  # beyond the range: the end bins
    assert rebin([0.0, 0.5, 0.4], [1, 1], grid) is None  # not increasing
    assert rebin([0.0, 1.0], [1, 2], grid) is None  # counts do not fit


def test_cohorts_on_different_edges_compare_bin_for_bin() -> None:
    fine = cohort_figures(
        [window("a", 10, conf=None) for _ in range(2)]
        + [
            WindowFigures.from_record(
                "b",
                {
                    "confidence": {
                        "edges": list(DEFAULT_CONFIDENCE_EDGES),
                        "counts": [0, 0, 0, 0, 0, 0, 0, 0, 0, 100],
                    }
                },
            )
        ]
    )
    assert fine.confidence_counts is not None and len(fine.confidence_counts) == 10
    assert sum(fine.confidence_counts) == 300  # every window counted, whatever its edges
    assert fine.confidence_counts[-1] == 2 * 2 + 100


def test_merged_cohort_drift_uses_the_reference_on_merged_counts(digits: Any) -> None:
    import numpy as np

    from edgewise.agent.telemetry import WindowAggregator

    from .conftest import FakeClock

    ref = reference_from_manifest(digits.manifest["reference"])
    assert ref is not None
    windows = []
    for i, scale in enumerate([1.0, 1.0, 1.0, 0.7, 0.7, 0.7]):
        clock = FakeClock()
        agg = WindowAggregator("p", model="digits-mlp", version="1.0.0", reference=ref, clock=clock)
        x = digits.split.x_test[(i % 3) * 60 : (i % 3 + 1) * 60] * scale  # too few alone
        probs = digits.predict(x)
        agg.observe(x, probs.max(1), probs.argmax(1))
        clock.advance(10)
        data = next(d for _, k, d, _ in agg.close() if k == "window")
        assert data["drift"]["sufficient"] is False
        windows.append(WindowFigures.from_record(f"dev{i}", data))
    refs = {"digits-mlp@1.0.0": ref}
    calm = cohort_figures(windows[:3], refs)
    shifted = cohort_figures(windows[3:], refs)
    assert calm.input_drift is not None and calm.input_drift < 1.0
    assert shifted.input_drift is not None and shifted.input_drift > 1.0
    assert np.isfinite(shifted.input_drift)


def test_retention_plan_merges_whole_old_buckets_and_deletes_expired() -> None:
    policy = RetentionPolicy(raw_keep_s=3600, downsample_s=600, keep_s=86400)
    now = 100_000.0
    metas = [
        WindowMeta(1, "a", "p", "m@1", 10_000, 10_010),  # expired (older than keep_s)
        WindowMeta(2, "a", "p", "m@1", 90_000, 90_010),  # bucket 150
        WindowMeta(3, "a", "p", "m@1", 90_100, 90_110),  # bucket 150
        WindowMeta(4, "b", "p", "m@1", 90_100, 90_110),  # other device
        WindowMeta(5, "a", "p", "m@1", 99_000, 99_010),  # recent: kept raw
        WindowMeta(6, "a", "p", "m@1", 90_600, 91_200, downsampled=True),  # alone, merged
    ]
    plan = plan_retention(metas, now, policy)
    assert plan.deletes == (1,)
    assert [(g.device_id, g.ids) for g in plan.merges] == [("a", (2, 3)), ("b", (4,))]
    assert plan.merges[0].bucket_start == 90_000 and plan.merges[0].bucket_end == 90_600


def test_retention_policy_refuses_raw_longer_than_total() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(raw_keep_s=10, keep_s=5)


def test_merged_windows_keep_exact_totals() -> None:
    a = {
        "pipeline": "p",
        "model": "m",
        "start": 0,
        "end": 10,
        "counts": {"ok": 5, "failed": 1},
        "latency": {"bounds": [1], "stages": {"total": {"counts": [3, 3], "sum": 4.0}}},
        "confidence": {"edges": [0, 1], "counts": [6]},
        "features": {"features": [[1, 2]], "confidence": [3], "classes": [3]},
        "drift": {"score": 1.0, "samples": 100, "sufficient": True},
        "resources": {"cpu_percent": 10.0, "temperature_c": 50.0},
    }
    b = {
        "pipeline": "p",
        "model": "m",
        "start": 10,
        "end": 20,
        "counts": {"ok": 7},
        "latency": {"bounds": [1], "stages": {"total": {"counts": [1, 6], "sum": 9.0}}},
        "confidence": {"edges": [0, 1], "counts": [7]},
        "features": {"features": [[0, 4]], "confidence": [4], "classes": [4]},
        "drift": {"score": 3.0, "samples": 300, "sufficient": True},
        "resources": {"cpu_percent": 30.0, "temperature_c": 70.0},
    }
    m = merge_window_data([a, b])
    assert (m["start"], m["end"], m["merged"]) == (0, 20, 2)
    assert m["counts"] == {"ok": 12, "failed": 1}
    assert m["latency"]["stages"]["total"] == {"counts": [4, 9], "sum": 13.0}
    assert m["confidence"]["counts"] == [13]
    assert m["features"] == {"features": [[1, 6]], "confidence": [7], "classes": [7]}
    assert m["drift"]["score"] == 2.5 and m["drift"]["max_score"] == 3.0
    assert m["resources"] == {"cpu_percent": 20.0, "temperature_c": 70.0, "throttled": False}
    again = WindowFigures.from_record("a", m)
    assert again.requests == 13 and again.drift_score == 2.5


def test_ingest_budget_holds_any_one_second_window_to_the_budget() -> None:
    from edgewise.control.telemetry import IngestBudget

    t = [0.0]
    budget = IngestBudget(1000, clock=lambda: t[0])
    admitted: list[tuple[float, int]] = []
    for step in range(3000):  # a greedy client every millisecond, batches of 50
        t[0] = step / 1000
        if budget.admit(50) == 0.0:
            admitted.append((t[0], 50))
    for at, _ in admitted:
        in_window = sum(n for a, n in admitted if at - 1.0 < a <= at)
        assert in_window <= 1000
    assert sum(n for _, n in admitted) >= 2700  # and it does not under-admit either
    assert budget.admit(50) > 0  # a refusal carries a positive Retry-After


def test_ingest_budget_refuses_bad_configuration() -> None:
    from edgewise.control.telemetry import IngestBudget

    with pytest.raises(ValueError):
        IngestBudget(0)
    with pytest.raises(ValueError):
        IngestBudget(10, burst_fraction=1.0)
