"""Alert rules: burn rate, drift for K windows, freshness, suppression during rollouts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgewise.control.telemetry import (
    ActiveRollout,
    AlertFigures,
    AlertState,
    BurnRateRule,
    DriftRule,
    FreshnessRule,
    IllegalAlertTransition,
    WindowFigures,
    evaluate_rules,
    parse_rule,
    transition,
)

NOW = 10_000.0


def fleet(
    error_rate: float, devices: int = 10, span_s: float = 3600, drift: float | None = None
) -> list[WindowFigures]:
    """Windows every 60 s over `span_s` for each device, 200 requests per window."""
    out = []
    for d in range(devices):
        t = NOW - span_s
        while t < NOW:
            t += 60
            failed = round(200 * error_rate)
            data = {
                "pipeline": "p",
                "model": "m",
                "version": "1",
                "start": t - 60,
                "end": t,
                "counts": {"ok": 200 - failed, "failed": failed},
            }
            if drift is not None:
                data["drift"] = {"score": drift, "samples": 150, "sufficient": True}
            out.append(WindowFigures.from_record(f"dev{d}", data))
    return out


BURN = BurnRateRule(name="slo", target=0.99, short_window_s=300, long_window_s=3600, burn_rate=1.5)


def test_error_rate_doubling_fires_the_burn_rate_alert() -> None:
    steady = evaluate_rules([BURN], AlertFigures(fleet(0.01)), NOW)
    assert steady == []  # 1 % errors burns the 99 % SLO's budget at exactly 1x
    doubled = evaluate_rules([BURN], AlertFigures(fleet(0.02)), NOW)
    assert [(c.rule, c.scope, c.new) for c in doubled] == [("slo", "m@1", AlertState.FIRING)]
    assert doubled[0].value == pytest.approx(2.0)
    assert len(doubled[0].devices) == 10


def test_short_spike_alone_does_not_fire_and_recovery_resolves_fast() -> None:
    # Errors doubled only in the last 5 minutes: the long window stays under the rate.
    windows = [w for w in fleet(0.01) if w.end <= NOW - 300] + fleet(0.05, span_s=300)
    assert evaluate_rules([BURN], AlertFigures(windows), NOW) == []
    # An hour of doubled errors, then the last 5 minutes clean: the short window resolves it.
    recovered = [w for w in fleet(0.02) if w.end <= NOW - 300] + fleet(0.0, span_s=300)
    firing = {("slo", "m@1"): AlertState.FIRING}
    changes = evaluate_rules([BURN], AlertFigures(recovered, states=firing), NOW)
    assert [(c.old, c.new) for c in changes] == [(AlertState.FIRING, AlertState.RESOLVED)]


def test_silent_device_fires_the_freshness_alert() -> None:
    rule = FreshnessRule(name="fresh", max_age_s=300)
    last_seen = {"dev0": NOW - 30, "dev1": NOW - 900}
    changes = evaluate_rules([rule], AlertFigures(last_seen=last_seen), NOW)
    assert [(c.scope, c.new) for c in changes] == [("dev1", AlertState.FIRING)]
    assert changes[0].value == 900


def test_drift_fires_only_after_k_windows_over_threshold() -> None:
    rule = DriftRule(name="drift", threshold=1.0, windows=3)
    base = fleet(0.0, devices=1, span_s=600, drift=0.2)
    hot = [
        WindowFigures.from_record(
            "dev0",
            {
                "pipeline": "p",
                "model": "m",
                "version": "1",
                "start": NOW + i,
                "end": NOW + i + 1,
                "drift": {"score": 2.0, "samples": 150, "sufficient": True},
            },
        )
        for i in range(3)
    ]
    assert evaluate_rules([rule], AlertFigures(base + hot[:2]), NOW + 5) == []
    changes = evaluate_rules([rule], AlertFigures(base + hot), NOW + 5)
    assert [(c.scope, c.new) for c in changes] == [("dev0/p", AlertState.FIRING)]


def test_rollout_touching_the_devices_suppresses_then_fires_after() -> None:
    windows = AlertFigures(fleet(0.03))
    rollout = ActiveRollout("r1", frozenset({"dev3"}))
    during = evaluate_rules([BURN], windows, NOW, [rollout])
    assert [c.new for c in during] == [AlertState.SUPPRESSED]
    held = AlertFigures(windows.windows, states={("slo", "m@1"): AlertState.SUPPRESSED})
    assert evaluate_rules([BURN], held, NOW, [rollout]) == []
    after = evaluate_rules([BURN], held, NOW, [])
    assert [(c.old, c.new) for c in after] == [(AlertState.SUPPRESSED, AlertState.FIRING)]


def test_rule_without_suppression_fires_during_rollout() -> None:
    rule = BURN.model_copy(update={"suppress_during_rollout": False})
    changes = evaluate_rules(
        [rule], AlertFigures(fleet(0.03)), NOW, [ActiveRollout("r", frozenset({"dev1"}))]
    )
    assert [c.new for c in changes] == [AlertState.FIRING]


def test_rollout_elsewhere_does_not_suppress() -> None:
    changes = evaluate_rules(
        [BURN], AlertFigures(fleet(0.03)), NOW, [ActiveRollout("r", frozenset({"other"}))]
    )
    assert [c.new for c in changes] == [AlertState.FIRING]


def test_alert_transition_table_refuses_illegal_moves() -> None:
    assert transition(AlertState.FIRING, AlertState.RESOLVED) is AlertState.RESOLVED
    with pytest.raises(IllegalAlertTransition):
        transition(AlertState.INACTIVE, AlertState.RESOLVED)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "burn_rate", "name": "x", "short_window_s": 3600, "long_window_s": 300},
        {"kind": "burn_rate", "name": "x", "target": 1.0},
        {"kind": "drift", "name": "x", "windows": 0},
        {"kind": "freshness", "name": "Bad Name"},
        {"kind": "nope", "name": "x"},
        {"kind": "freshness", "name": "x", "extra": 1},
        {"kind": "burn_rate", "name": "x", "group_by": "garbage"},
        {"kind": "burn_rate", "name": "x", "group_by": "label:"},
    ],
)
def test_invalid_rules_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        parse_rule(bad)


def test_rules_parse_by_kind() -> None:
    assert isinstance(parse_rule({"kind": "freshness", "name": "f"}), FreshnessRule)
