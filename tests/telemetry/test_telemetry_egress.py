"""The egress policy: groups, redaction, capture triggers and budgets (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from edgewise.agent.telemetry import SampleCapture, WindowAggregator
from edgewise.protocol import (
    CaptureBudget,
    EgressPolicy,
    TelemetryRecord,
    decide_capture,
    filter_payload,
    filter_record,
    redact,
)

from .conftest import FakeClock

WINDOW = {
    "pipeline": "p",
    "model": "m",
    "counts": {"ok": 1},
    "latency": {"bounds": [1], "stages": {}},
    "resources": {"cpu_percent": 3.0, "serial": "SN-1"},
    "drift": {"score": 0.1},
}


def test_default_policy_sends_aggregates_but_never_samples() -> None:
    policy = EgressPolicy()
    assert filter_payload(policy, "metric", "window", WINDOW) == WINDOW
    assert filter_payload(policy, "sample", "input", {"input": [1.0]}) is None
    assert not policy.allows("samples")


def test_groups_not_allowed_are_cut_out_of_window_records() -> None:
    policy = EgressPolicy(groups=["counts", "drift"])
    out = filter_payload(policy, "metric", "window", WINDOW)
    assert out == {"pipeline": "p", "model": "m", "counts": {"ok": 1}, "drift": {"score": 0.1}}


def test_record_with_nothing_allowed_left_is_dropped() -> None:
    policy = EgressPolicy(groups=["events"])
    assert filter_payload(policy, "metric", "window", WINDOW) is None
    assert filter_payload(policy, "metric", "agent.resources", {"cpu": 1}) is None
    assert filter_payload(EgressPolicy(groups=[]), "event", "install.started", {}) is None


def test_redaction_by_name_at_any_depth_and_by_dotted_path() -> None:
    data = {
        "serial": 1,
        "a": {"serial": 2, "keep": 3, "b": {"face": 4, "ok": 5}},
        "l": [{"serial": 6}],
    }
    assert redact(data, ["serial"]) == {"a": {"keep": 3, "b": {"face": 4, "ok": 5}}, "l": [{}]}
    assert redact(data, ["a.b.face"]) == {
        "serial": 1,
        "a": {"serial": 2, "keep": 3, "b": {"ok": 5}},
        "l": [{"serial": 6}],
    }


def test_filter_record_keeps_seq_and_redacts() -> None:
    rec = TelemetryRecord(seq=7, cls="metric", ts=1.0, kind="window", data=WINDOW)
    out = filter_record(EgressPolicy(redact=["serial"]), rec)
    assert out is not None and out.seq == 7
    assert "serial" not in out.data["resources"]


@pytest.mark.parametrize(
    "bad",
    [
        {"groups": ["everything"]},
        {"capture": {"rate": 1.5}},
        {"capture": {"max_samples_per_hour": -1}},
        {"redact": [""]},
        {"redact": ["a."]},
        {"unknown": True},
    ],
)
def test_invalid_policies_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EgressPolicy.from_desired(bad)


def test_empty_desired_egress_means_defaults() -> None:
    assert EgressPolicy.from_desired({}) == EgressPolicy()
    assert EgressPolicy.from_desired(None) == EgressPolicy()


def _capturing(**capture: object) -> EgressPolicy:
    return EgressPolicy(
        groups=["events", "samples"],
        capture={"enabled": True, **capture},  # type: ignore[arg-type]
    )


def test_capture_needs_both_the_group_and_enabled() -> None:
    on_but_no_group = EgressPolicy(capture={"enabled": True, "rate": 1.0})  # type: ignore[arg-type]
    decision, _ = decide_capture(on_but_no_group, CaptureBudget(), 0.0, 10, 0.0)
    assert not decision.capture and decision.reason == "capture off"


def test_hard_examples_trigger_on_low_confidence_and_drift() -> None:
    policy = _capturing(confidence_below=0.6, drift_above=2.0)
    b = CaptureBudget()
    assert decide_capture(policy, b, 0.0, 10, 0.99, confidence=0.5)[0].reason == "low confidence"
    assert (
        decide_capture(policy, b, 0.0, 10, 0.99, confidence=0.9, drift_score=2.5)[0].reason
        == "drift"
    )
    assert (
        decide_capture(policy, b, 0.0, 10, 0.99, confidence=0.9, drift_score=1.0)[0].capture
        is False
    )


def test_hourly_sample_budget_and_daily_byte_budget_hold() -> None:
    policy = _capturing(rate=1.0, max_samples_per_hour=3, max_bytes_per_day=250)
    budget, taken = CaptureBudget(), []
    for i in range(10):
        decision, budget = decide_capture(policy, budget, 100.0 + i, 50, 0.0)
        taken.append(decision.capture)
    assert taken == [True] * 3 + [False] * 7
    budget2 = budget
    later = []
    for hour in range(1, 5):
        decision, budget2 = decide_capture(policy, budget2, 100.0 + hour * 3600, 50, 0.0)
        later.append((decision.capture, decision.reason))
    # 3 x 50 bytes spent in hour 0; 250 per day allows two more, then the day is spent.
    assert later == [
        (True, "sampled"),
        (True, "sampled"),
        (False, "daily byte budget spent"),
        (False, "daily byte budget spent"),
    ]
    decision, _ = decide_capture(policy, budget2, 100.0 + 86400, 50, 0.0)
    assert decision.capture


def test_sample_capture_redacts_fields_and_tags_trigger() -> None:
    clock = FakeClock()
    policy = EgressPolicy(
        groups=["samples"],
        redact=["face"],
        capture={"enabled": True, "confidence_below": 0.5},  # type: ignore[arg-type]
    )
    cap = SampleCapture("p", policy, clock, seed=1)
    rows = [{"face": [1, 2], "plate": "AB"}, {"face": [3], "plate": "CD"}]
    out = cap.offer(rows, [0.3, 0.9], ["x", "y"])
    assert out == [
        {
            "pipeline": "p",
            "model": "",
            "input": {"plate": "AB"},
            "label": "x",
            "confidence": 0.3,
            "trigger": "low confidence",
        }
    ]


def test_aggregator_with_capture_off_produces_no_sample_records() -> None:
    clock = FakeClock()
    agg = WindowAggregator("p", clock=clock)
    agg.observe(np.ones((50, 4)), [0.1] * 50, [0] * 50)
    clock.advance(10)
    records = agg.close()
    assert [cls for cls, *_ in records] == ["metric"]


def test_aggregator_applies_policy_to_window_before_buffering() -> None:
    clock = FakeClock()
    policy = EgressPolicy(groups=["counts"], redact=["serial"])
    agg = WindowAggregator("p", clock=clock, policy=policy)
    agg.observe_stats({"nv_inference_request_success": 5})
    agg.observe_stats({"nv_inference_request_success": 9})
    clock.advance(10)
    ((_, kind, data, _),) = agg.close(resources={"cpu_percent": 1.0}, uplink={"serial": "x"})
    assert kind == "window" and data["counts"]["ok"] == 4
    assert set(data) == {"pipeline", "model", "version", "start", "end", "counts"}
