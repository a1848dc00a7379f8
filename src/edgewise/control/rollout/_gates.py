"""Phase gates: install success and error thresholds, reporting quorum, model quality.

Arithmetic (hawkBit's, on the phase size n, in integers so 80 % of 10 is exactly 8):

- success: succeeded * 100 >= X * n passes. It *fails* as soon as it can no longer be
  met (succeeded + still in progress < X % of n), else it is insufficient (waiting).
  An empty phase passes.
- error: failed * 100 > Y * n fails (strictly greater: 1 of 5 at 20 % does not fire,
  2 does); failed counts FAILED and TIMED_OUT devices.
- reporting: at least min(min_reporting, n) devices reported an outcome, or nothing may
  pass (the gate is insufficient until then). A device held back as offline has reported
  nothing: it counts in n (it may come back) but not among those that reported.
- held back: a device that cannot run the revision (HELD_BACK: its agent is too old for
  the specs, or it lacks a runtime or accelerator) has reported, but leaves n for the
  success and error gates: a few old agents must not roll a revision back for everyone.
  A phase in which no device can run it fails the success gate (nothing was shown to
  work, and a revision nobody can run is not one to make stable), unless some of it is
  offline: then it waits for them.
- quality, from cohort telemetry (the phase cohort on the new revision against a
  control cohort on the old one), each only when its threshold is set, insufficient
  while either cohort has fewer than `min_inferences` inferences:
  p95 latency ratio <= L, error-rate delta <= E (fractions, e.g. 0.02),
  confidence shift <= S (Jensen-Shannon bits, or PSI), input drift <= D (the phase
  cohort's drift score from `edgewise.drift`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edgewise.control.rollout._model import DeviceRolloutState
from edgewise.control.rollout._numbers import MAX_COUNT, MAX_INFERENCES, MAX_RATIO, check_number
from edgewise.drift import jensen_shannon, psi

__all__ = [
    "CohortTelemetry",
    "GateEvaluation",
    "GateOutcome",
    "GateResult",
    "GateSpec",
    "evaluate_gates",
]

_D = DeviceRolloutState
_FAILED = frozenset({_D.FAILED, _D.TIMED_OUT})
_IN_PROGRESS = frozenset({_D.PENDING, _D.NOTIFIED, _D.INSTALLING})
_REPORTED = frozenset({_D.INSTALLING, _D.SUCCEEDED, _D.FAILED, _D.HELD_BACK})


class GateOutcome(enum.StrEnum):
    """What a gate says about a phase."""

    PASS = "pass"
    FAIL = "fail"
    INSUFFICIENT = "insufficient"  # not enough data yet: neither pass nor fail


@dataclass(frozen=True)
class GateSpec:
    """Thresholds of every phase's gates.

    Attributes:
        success_pct: X, percent of the phase that must be installed and healthy.
        error_pct: Y, percent of the phase whose failure breaches (strictly greater).
        min_reporting: Devices that must have reported before any gate may pass.
        max_latency_ratio: L, p95 latency of phase cohort / control cohort.
        max_error_rate_delta: E, error rate of phase cohort minus control (fraction).
        max_confidence_shift: S, shift of the top-1 confidence histogram.
        confidence_metric: "js" (Jensen-Shannon, bits) or "psi".
        max_input_drift: D, the phase cohort's input-drift score.
        min_inferences: Inferences each cohort needs before quality gates may judge.
    """

    success_pct: float = 90.0
    error_pct: float = 10.0
    min_reporting: int = 1
    max_latency_ratio: float | None = None
    max_error_rate_delta: float | None = None
    max_confidence_shift: float | None = None
    confidence_metric: Literal["js", "psi"] = "js"
    max_input_drift: float | None = None
    min_inferences: int = 100

    def __post_init__(self) -> None:
        check_number("gates.success_pct", self.success_pct, 0, 100, unit=" %")
        check_number("gates.error_pct", self.error_pct, 0, 100, unit=" %")
        check_number("gates.min_reporting", self.min_reporting, 0, MAX_COUNT, integer=True)
        check_number("gates.min_inferences", self.min_inferences, 0, MAX_INFERENCES, integer=True)
        for name, low, high in (
            ("max_latency_ratio", 0, MAX_RATIO),
            ("max_error_rate_delta", -1, 1),  # a difference of two fractions
            ("max_confidence_shift", 0, MAX_RATIO),
            ("max_input_drift", 0, MAX_RATIO),
        ):
            value = getattr(self, name)
            if value is not None:
                check_number(f"gates.{name}", value, low, high)
        if self.confidence_metric not in ("js", "psi"):
            raise ValueError("confidence_metric must be 'js' or 'psi'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class CohortTelemetry:
    """Telemetry figures of one cohort over the gate window.

    Attributes:
        devices: Devices that contributed telemetry.
        inferences: Inferences counted.
        errors: Failed inferences.
        p95_latency_ms: p95 end-to-end latency.
        confidence_counts: Top-1 confidence histogram (same bins for both cohorts).
        input_drift: Input-drift score (`edgewise.drift`), if computed.
    """

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    p95_latency_ms: float | None = None
    confidence_counts: tuple[int, ...] | None = None
    input_drift: float | None = None

    @property
    def error_rate(self) -> float | None:
        """The fraction of inferences that failed, or None without inferences."""
        return self.errors / self.inferences if self.inferences > 0 else None


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: its value against its threshold."""

    name: str
    value: float | None
    threshold: float
    outcome: GateOutcome
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "outcome": self.outcome.value,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class GateEvaluation:
    """Every gate of a phase at one instant."""

    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        """Every gate passes."""
        return all(r.outcome is GateOutcome.PASS for r in self.results)

    @property
    def failed(self) -> tuple[GateResult, ...]:
        """The gates that fail."""
        return tuple(r for r in self.results if r.outcome is GateOutcome.FAIL)

    @property
    def install_failed(self) -> tuple[GateResult, ...]:
        """Failing install gates: these cannot recover, so they breach before the soak."""
        return tuple(r for r in self.failed if r.name in ("success", "error"))

    def by_name(self, name: str) -> GateResult | None:
        """The result of one gate, if it was evaluated."""
        return next((r for r in self.results if r.name == name), None)


def _install_gates(
    spec: GateSpec, states: Sequence[DeviceRolloutState], offline: int = 0
) -> tuple[GateResult, GateResult, GateResult]:
    held = sum(s is _D.HELD_BACK for s in states)
    n = len(states) - held  # those that can run it
    succeeded = sum(s is _D.SUCCEEDED for s in states)
    failed = sum(s in _FAILED for s in states)
    in_progress = sum(s in _IN_PROGRESS for s in states)
    # An offline device is held back for having said nothing: it is no report, and
    # counting it let a quorum of 3 pass on one device whose 4 phase mates went dark.
    reported = max(0, sum(s in _REPORTED for s in states) - offline)
    aside = f" ({held} held back: cannot run it)" if held else ""

    pct = 100.0 * succeeded / n if n else (0.0 if held else 100.0)
    if held and not n and offline:
        # No device of the phase could run it so far, and some are offline: nothing
        # shown to work, nor to fail, yet (those may run it once back; one old agent
        # beside them is no verdict on the revision). It waits for them (or for
        # gate_timeout_s, or an operator).
        outcome = GateOutcome.INSUFFICIENT
        aside = f" ({held} held back: offline)" if offline >= held else f" ({held} held back)"
    elif held and not n:
        outcome = GateOutcome.FAIL
    elif succeeded * 100 >= spec.success_pct * n:
        outcome = GateOutcome.PASS
    elif (succeeded + in_progress) * 100 < spec.success_pct * n:
        outcome = GateOutcome.FAIL
    else:
        outcome = GateOutcome.INSUFFICIENT
    success = GateResult(
        "success", pct, spec.success_pct, outcome, f"{succeeded}/{n} installed and healthy{aside}"
    )
    err_pct = 100.0 * failed / n if n else 0.0
    error = GateResult(
        "error",
        err_pct,
        spec.error_pct,
        GateOutcome.FAIL if failed * 100 > spec.error_pct * n else GateOutcome.PASS,
        f"{failed}/{n} failed or timed out{aside}",
    )
    need = min(spec.min_reporting, n + held)
    reporting = GateResult(
        "reporting",
        float(reported),
        float(need),
        GateOutcome.PASS if reported >= need else GateOutcome.INSUFFICIENT,
        f"{reported}/{n + held} reported" + (f" ({offline} offline)" if offline else ""),
    )
    return success, error, reporting


def _judge(name: str, value: float | None, threshold: float, why: str) -> GateResult:
    if value is None:
        return GateResult(name, None, threshold, GateOutcome.INSUFFICIENT, why)
    outcome = GateOutcome.PASS if value <= threshold else GateOutcome.FAIL
    return GateResult(name, value, threshold, outcome)


def _quality_gates(
    spec: GateSpec, phase: CohortTelemetry | None, control: CohortTelemetry | None
) -> list[GateResult]:
    wanted = [
        ("latency_ratio", spec.max_latency_ratio),
        ("error_rate_delta", spec.max_error_rate_delta),
        ("confidence_shift", spec.max_confidence_shift),
        ("input_drift", spec.max_input_drift),
    ]
    wanted = [(n, t) for n, t in wanted if t is not None]
    if not wanted:
        return []
    short = None
    if phase is None or phase.inferences < spec.min_inferences:
        short = f"phase cohort has fewer than {spec.min_inferences} inferences"
    elif control is None or control.inferences < spec.min_inferences:
        short = f"control cohort has fewer than {spec.min_inferences} inferences"
    results = []
    for name, threshold in wanted:
        assert threshold is not None
        if short is not None:
            # Input drift needs no control cohort, only enough of its own data.
            if (
                name == "input_drift"
                and phase is not None
                and phase.inferences >= spec.min_inferences
            ):
                results.append(_judge(name, phase.input_drift, threshold, "no drift score"))
                continue
            results.append(GateResult(name, None, threshold, GateOutcome.INSUFFICIENT, short))
            continue
        assert phase is not None and control is not None
        if name == "latency_ratio":
            p, c = phase.p95_latency_ms, control.p95_latency_ms
            value = p / c if p is not None and c is not None and c > 0 else None
            results.append(_judge(name, value, threshold, "p95 latency missing"))
        elif name == "error_rate_delta":
            pr, cr = phase.error_rate, control.error_rate
            value = pr - cr if pr is not None and cr is not None else None
            results.append(_judge(name, value, threshold, "error rate missing"))
        elif name == "confidence_shift":
            pc, cc = phase.confidence_counts, control.confidence_counts
            if pc is None or cc is None or len(pc) != len(cc) or not sum(pc) or not sum(cc):
                value = None
            elif spec.confidence_metric == "psi":
                value = psi(cc, pc)
            else:
                value = jensen_shannon(cc, pc)
            results.append(_judge(name, value, threshold, "confidence histograms missing"))
        else:
            results.append(_judge(name, phase.input_drift, threshold, "no drift score"))
    return results


def evaluate_gates(
    spec: GateSpec,
    device_states: Mapping[str, DeviceRolloutState],
    phase_devices: Sequence[str],
    phase_telemetry: CohortTelemetry | None = None,
    control_telemetry: CohortTelemetry | None = None,
    offline: int = 0,
) -> GateEvaluation:
    """Evaluate every gate of a phase (pure).

    Args:
        spec: Gate thresholds.
        device_states: State of each device of the rollout.
        phase_devices: The phase's device ids (the denominator of the install gates).
        phase_telemetry: Cohort figures of the phase's devices on the new revision.
        control_telemetry: Cohort figures of devices still on the old revision.
        offline: How many of the phase's held-back devices are held back for being
            offline (they may yet come back and count).

    Returns:
        Every gate's result, install gates first.
    """
    states = [device_states.get(d, _D.PENDING) for d in phase_devices]
    return GateEvaluation(
        (
            *_install_gates(spec, states, offline),
            *_quality_gates(spec, phase_telemetry, control_telemetry),
        )
    )
