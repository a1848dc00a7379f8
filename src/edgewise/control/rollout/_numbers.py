"""Bounds on the numbers of a rollout spec, and the one check that enforces them.

Every number an operator gives must be finite and within a bound a fleet would ever
need: a spec read from JSON or YAML may hold NaN, infinity or an integer of 400 digits,
and the engine does float arithmetic on all of them (a huge integer overflows there,
on every tick, long after the rollout was accepted).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MAX_COUNT",
    "MAX_DURATION_S",
    "MAX_INFERENCES",
    "MAX_RAMP",
    "MAX_RATE_PER_MIN",
    "MAX_RATIO",
    "check_number",
]

MAX_DURATION_S = 365 * 86400  # a year: soaks, device and gate timeouts
MAX_COUNT = 10_000_000  # devices in a canary or a reporting quorum
MAX_INFERENCES = 10**12  # inferences a cohort needs before quality gates judge
MAX_RATE_PER_MIN = 1_000_000  # devices notified per minute
MAX_RATIO = 1_000.0  # latency ratios, confidence shifts, drift scores
MAX_RAMP = 10.0  # rate growth per minute: 10**64, the most a phase reaches, stays a float


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    integer: bool = False,
    unit: str = "",
) -> None:
    """Refuse `value` unless it is a number (an integer if `integer`) in [low, high].

    NaN and infinities fail the range test; a huge integer is compared exactly, never
    converted to a float.

    Raises:
        ValueError: naming the field and its bound.
    """
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be a finite number within {_text(low)}-{_text(high)}{unit}")


def _text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"
