"""Graceful degradation: when to run the fallback model, as a pure state machine.

Each monitor window the runtime observes the pipeline's rolling p95 and the device's
CPU and thermal readings, and calls `step`. Pressure (p95 over the SLO, CPU or
temperature over its threshold) for `slo_breach_windows` windows switches to the
fallback; switching back needs every reading below its threshold by `recover_margin`
for `recover_windows` windows, so the pipeline does not flap around a threshold.

The readers for the real device are here too; tests pass their own.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from edgewise.protocol._pipeline import DegradationSpec

__all__ = [
    "PLAUSIBLE_C",
    "TRANSITIONS",
    "DegradeState",
    "Mode",
    "Observation",
    "read_cpu_percent",
    "read_thermal_c",
    "reading",
    "step",
]


class Mode(enum.StrEnum):
    """Which model serves the pipeline."""

    PRIMARY = "primary"  # the deployed model
    FALLBACK = "fallback"  # the lighter model, while the device is under pressure


TRANSITIONS: frozenset[tuple[Mode, Mode]] = frozenset(
    {(Mode.PRIMARY, Mode.FALLBACK), (Mode.FALLBACK, Mode.PRIMARY)}
)


@dataclass(frozen=True)
class Observation:
    """One monitor window's readings; None means not available."""

    p95_ms: float | None = None
    cpu_percent: float | None = None
    thermal_c: float | None = None


@dataclass(frozen=True)
class DegradeState:
    """Where the pipeline is and how many consecutive windows argue for a switch."""

    mode: Mode = Mode.PRIMARY
    breach_windows: int = 0
    calm_windows: int = 0

    def to(self, mode: Mode) -> DegradeState:
        """The state after switching to `mode`; illegal transitions raise."""
        if (self.mode, mode) not in TRANSITIONS:
            raise ValueError(f"illegal degradation transition {self.mode} -> {mode}")
        return DegradeState(mode=mode)


def _over(value: float | None, limit: float | None, factor: float = 1.0) -> bool:
    return value is not None and limit is not None and value >= limit * factor


def _pressure(obs: Observation, spec: DegradationSpec, slo_ms: float) -> list[str]:
    reasons = []
    if obs.p95_ms is not None and obs.p95_ms > slo_ms:
        if math.isinf(obs.p95_ms):
            reasons.append(
                f"p95 over the {slo_ms:g} ms SLO: 5% or more of requests expired in the queue"
            )
        else:
            reasons.append(f"p95 {obs.p95_ms:.1f} ms over the {slo_ms:g} ms SLO")
    if _over(obs.cpu_percent, spec.cpu_percent):
        reasons.append(f"CPU {obs.cpu_percent:.0f}% at or over {spec.cpu_percent:g}%")
    if _over(obs.thermal_c, spec.thermal_c):
        reasons.append(f"temperature {obs.thermal_c:.1f} C at or over {spec.thermal_c:g} C")
    return reasons


def _calm(obs: Observation, spec: DegradationSpec, slo_ms: float) -> bool:
    k = 1.0 - spec.recover_margin
    if obs.p95_ms is not None and obs.p95_ms > slo_ms * k:
        return False
    return not (
        _over(obs.cpu_percent, spec.cpu_percent, k) or _over(obs.thermal_c, spec.thermal_c, k)
    )


def step(
    state: DegradeState, obs: Observation, spec: DegradationSpec, slo_ms: float
) -> tuple[DegradeState, str | None]:
    """Advance one window; returns the new state and the reason when the mode switched."""
    if state.mode is Mode.PRIMARY:
        reasons = _pressure(obs, spec, slo_ms)
        if not reasons:
            return replace(state, breach_windows=0), None
        breaches = state.breach_windows + 1
        if breaches < spec.slo_breach_windows:
            return replace(state, breach_windows=breaches), None
        return state.to(Mode.FALLBACK), "; ".join(reasons)
    if not _calm(obs, spec, slo_ms):
        return replace(state, calm_windows=0), None
    calm = state.calm_windows + 1
    if calm < spec.recover_windows:
        return replace(state, calm_windows=calm), None
    return state.to(Mode.PRIMARY), f"pressure cleared for {calm} windows"


#: Readings outside this range (degrees C) are a sensor's error codes, not temperatures
#: (-274000, the kernel's "invalid"; 2147483647 from a broken driver). Such a zone would
#: otherwise hold a pipeline on its fallback for good.
PLAUSIBLE_C = (-100.0, 200.0)


def reading(reader: Callable[[], float | None]) -> float | None:
    """What a thermal or CPU reader gives as a finite number, or None.

    A reader that raises (psutil failing, say) or gives anything but a finite number is
    no reading: the other readings and the SLO still count.
    """
    try:
        value = reader()
    except Exception:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # (text, None)
        return None
    as_float = float(value)
    return as_float if math.isfinite(as_float) else None


def read_thermal_c(root: Path = Path("/sys/class/thermal")) -> float | None:
    """Hottest thermal zone in degrees C, or None where the device exposes none.

    A zone that cannot be read, or reads no plausible temperature, is left out.
    """
    low, high = PLAUSIBLE_C
    hottest = None
    for zone in root.glob("thermal_zone*/temp"):
        try:
            value = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):  # (UnicodeDecodeError, too many digits: ValueError)
            continue
        if not low <= value <= high:
            continue
        hottest = value if hottest is None else max(hottest, value)
    return hottest


def read_cpu_percent() -> float | None:
    """System-wide CPU use since the previous call (psutil), or None if unavailable."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return float(psutil.cpu_percent(interval=None))
