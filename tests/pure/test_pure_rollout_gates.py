from __future__ import annotations

import pytest

from edgewise.control.rollout import (
    CohortTelemetry,
    DeviceRolloutState,
    GateOutcome,
    GateSpec,
    evaluate_gates,
)

D = DeviceRolloutState


def states(**counts: int) -> dict[str, DeviceRolloutState]:
    out: dict[str, DeviceRolloutState] = {}
    for name, n in counts.items():
        for _ in range(n):
            out[f"d{len(out)}"] = D(name)
    return out


def outcome(spec: GateSpec, devs: dict[str, DeviceRolloutState], gate: str) -> GateOutcome:
    result = evaluate_gates(spec, devs, list(devs)).by_name(gate)
    assert result is not None
    return result.outcome


def test_success_7_of_10_at_80_percent_does_not_pass_and_8_does() -> None:
    spec = GateSpec(success_pct=80, error_pct=50)
    assert outcome(spec, states(succeeded=7, installing=3), "success") is GateOutcome.INSUFFICIENT
    assert outcome(spec, states(succeeded=7, failed=3), "success") is GateOutcome.FAIL
    assert outcome(spec, states(succeeded=8, installing=2), "success") is GateOutcome.PASS


def test_error_1_of_5_at_20_percent_does_not_fire_and_2_does() -> None:
    spec = GateSpec(error_pct=20)
    assert outcome(spec, states(failed=1, succeeded=4), "error") is GateOutcome.PASS
    assert outcome(spec, states(failed=2, succeeded=3), "error") is GateOutcome.FAIL


def test_timed_out_counts_as_failed() -> None:
    spec = GateSpec(error_pct=20)
    assert outcome(spec, states(timed_out=2, succeeded=3), "error") is GateOutcome.FAIL


def test_empty_phase_passes_every_gate() -> None:
    spec = GateSpec(success_pct=100, error_pct=0, min_reporting=5, max_latency_ratio=1.0)
    evaluation = evaluate_gates(spec, {}, [])
    assert [r.outcome for r in evaluation.results[:3]] == [GateOutcome.PASS] * 3


def test_success_fails_as_soon_as_it_cannot_be_met() -> None:
    spec = GateSpec(success_pct=80, error_pct=100)
    assert outcome(spec, states(succeeded=5, failed=3, notified=2), "success") is GateOutcome.FAIL


def test_min_reporting_holds_back_passing() -> None:
    spec = GateSpec(success_pct=0, min_reporting=3)
    devs = states(succeeded=2, notified=3)
    evaluation = evaluate_gates(spec, devs, list(devs))
    assert evaluation.by_name("reporting").outcome is GateOutcome.INSUFFICIENT  # type: ignore[union-attr]
    assert not evaluation.passed
    devs = states(succeeded=2, failed=1, notified=2)
    assert evaluate_gates(
        GateSpec(success_pct=0, error_pct=50, min_reporting=3), devs, list(devs)
    ).passed


def test_min_reporting_is_capped_at_phase_size() -> None:
    devs = states(succeeded=2)
    assert evaluate_gates(GateSpec(min_reporting=10), devs, list(devs)).passed


def test_gates_only_count_the_phase_devices() -> None:
    devs = {"a": D.SUCCEEDED, "b": D.FAILED, "c": D.FAILED}
    assert evaluate_gates(GateSpec(error_pct=0), devs, ["a"]).passed


# ------------------------------------------------------------------------- quality

GOOD = CohortTelemetry(
    devices=5,
    inferences=1000,
    errors=10,
    p95_latency_ms=10.0,
    confidence_counts=(1, 2, 10, 100),
    input_drift=0.2,
)


def quality(phase: CohortTelemetry | None, control: CohortTelemetry | None, **spec: float):  # type: ignore[no-untyped-def]
    devs = states(succeeded=5)
    ev = evaluate_gates(GateSpec(**spec), devs, list(devs), phase, control)  # type: ignore[arg-type]
    return {r.name: r for r in ev.results[3:]}


def test_latency_ratio_gate_boundary_is_inclusive() -> None:
    at = CohortTelemetry(inferences=1000, p95_latency_ms=12.0)
    over = CohortTelemetry(inferences=1000, p95_latency_ms=12.1)
    assert quality(at, GOOD, max_latency_ratio=1.2)["latency_ratio"].outcome is GateOutcome.PASS
    res = quality(over, GOOD, max_latency_ratio=1.2)["latency_ratio"]
    assert res.outcome is GateOutcome.FAIL
    assert res.value == pytest.approx(1.21)


def test_error_rate_delta_gate() -> None:
    worse = CohortTelemetry(inferences=1000, errors=40)
    res = quality(worse, GOOD, max_error_rate_delta=0.02)["error_rate_delta"]
    assert res.outcome is GateOutcome.FAIL and res.value == pytest.approx(0.03)
    same = CohortTelemetry(inferences=1000, errors=20)
    res = quality(same, GOOD, max_error_rate_delta=0.02)["error_rate_delta"]
    assert res.outcome is GateOutcome.PASS


@pytest.mark.parametrize("metric", ["js", "psi"])
def test_confidence_shift_gate(metric: str) -> None:
    shifted = CohortTelemetry(inferences=1000, confidence_counts=(100, 10, 2, 1))
    spec = {"max_confidence_shift": 0.1, "confidence_metric": metric}
    assert quality(shifted, GOOD, **spec)["confidence_shift"].outcome is GateOutcome.FAIL  # type: ignore[arg-type]
    assert quality(GOOD, GOOD, **spec)["confidence_shift"].outcome is GateOutcome.PASS  # type: ignore[arg-type]


def test_input_drift_gate_needs_no_control_cohort() -> None:
    drifted = CohortTelemetry(inferences=1000, input_drift=2.5)
    assert quality(drifted, None, max_input_drift=1.0)["input_drift"].outcome is GateOutcome.FAIL
    assert quality(GOOD, None, max_input_drift=1.0)["input_drift"].outcome is GateOutcome.PASS


def test_quality_gates_are_insufficient_without_enough_inferences() -> None:
    few = CohortTelemetry(inferences=10, p95_latency_ms=99.0)
    res = quality(few, GOOD, max_latency_ratio=1.2, max_input_drift=1.0)
    assert {r.outcome for r in res.values()} == {GateOutcome.INSUFFICIENT}
    res = quality(GOOD, None, max_latency_ratio=1.2)
    assert res["latency_ratio"].outcome is GateOutcome.INSUFFICIENT
    assert "control cohort" in res["latency_ratio"].detail


def test_quality_gates_absent_unless_configured() -> None:
    assert quality(GOOD, GOOD) == {}


def test_mismatched_confidence_bins_are_insufficient() -> None:
    odd = CohortTelemetry(inferences=1000, confidence_counts=(1, 2))
    res = quality(odd, GOOD, max_confidence_shift=0.1)["confidence_shift"]
    assert res.outcome is GateOutcome.INSUFFICIENT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"success_pct": 101},
        {"error_pct": -1},
        {"min_reporting": -1},
        {"confidence_metric": "kl"},
    ],
)
def test_invalid_gate_spec_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GateSpec(**kwargs)  # type: ignore[arg-type]


def test_held_back_devices_leave_the_phase_size_of_the_install_gates() -> None:
    # 2 of 10 cannot run the revision (old agents): 8 of the 8 that can are healthy.
    spec = GateSpec(success_pct=90, error_pct=10, min_reporting=10)
    devs = states(succeeded=8, held_back=2)
    evaluation = evaluate_gates(spec, devs, list(devs))
    assert evaluation.passed
    success = evaluation.by_name("success")
    assert success is not None and success.value == 100.0
    assert success.detail == "8/8 installed and healthy (2 held back: cannot run it)"
    reporting = evaluation.by_name("reporting")
    assert reporting is not None and reporting.detail == "10/10 reported"
    # Held back is not a free pass: the ones that can run it still count.
    assert outcome(spec, states(succeeded=7, failed=1, held_back=2), "error") is GateOutcome.FAIL


def test_a_phase_no_device_can_run_fails_the_success_gate() -> None:
    spec = GateSpec(success_pct=0, error_pct=100)
    assert outcome(spec, states(held_back=3), "success") is GateOutcome.FAIL
    assert outcome(spec, states(held_back=3), "error") is GateOutcome.PASS
