"""What an operator asks of a rollout: phases, gates, pacing, breach policy.

`RolloutSpec.from_dict` reads the `--spec FILE` document and the API body; every field
is optional. Example::

    {"canary": "5%", "waves": [25, 100], "soak_s": 300, "on_breach": "rollback",
     "require_approval": [true], "rate_per_min": 200, "rate_ramp": 2.0,
     "device_timeout_s": 600,
     "gates": {"success_pct": 90, "error_pct": 10, "min_reporting": 3,
               "max_latency_ratio": 1.2, "max_error_rate_delta": 0.02,
               "max_confidence_shift": 0.05, "max_input_drift": 1.0}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgewise.control.rollout._gates import GateSpec
from edgewise.control.rollout._numbers import (
    MAX_DURATION_S,
    MAX_RAMP,
    MAX_RATE_PER_MIN,
    check_number,
)
from edgewise.control.rollout._phases import canary_size

__all__ = ["RolloutSpec"]


@dataclass(frozen=True)
class RolloutSpec:
    """The plan and policy of a rollout.

    Attributes:
        canary: Canary size: a count, or a percent as text ("5%").
        waves: Percent of the snapshot per wave after the canary; the last takes the rest.
        strata_keys: Label keys whose values the canary covers.
        gates: Gate thresholds, the same for every phase.
        soak_s: Seconds a phase soaks after its last device is notified, before gates.
        on_breach: "pause" (an operator resumes or aborts) or "rollback".
        require_approval: Index i true: after phase i passes, wait for an approval.
        rate_per_min: At most this many devices notified in any 60 s (None: no limit).
        rate_ramp: The rate is multiplied by this for each full minute of a phase.
        device_timeout_s: Seconds from notification to outcome before TIMED_OUT.
        gate_timeout_s: Seconds after the soak that gates may stay insufficient before
            the phase breaches (None: wait for data, or an operator, indefinitely).
    """

    canary: int | str = "5%"
    waves: tuple[float, ...] = (25.0, 100.0)
    strata_keys: tuple[str, ...] = ("hw", "site")
    gates: GateSpec = field(default_factory=GateSpec)
    soak_s: float = 0.0
    on_breach: Literal["pause", "rollback"] = "rollback"
    require_approval: tuple[bool, ...] = ()
    rate_per_min: float | None = None
    rate_ramp: float = 1.0
    device_timeout_s: float = 600.0
    gate_timeout_s: float | None = None

    def __post_init__(self) -> None:
        canary_size(self.canary, 100)  # raises on a malformed canary
        for wave in self.waves:
            check_number("each wave percent", wave, 0, 100, unit=" %")
        for key in self.strata_keys:
            if not isinstance(key, str):
                raise ValueError("strata_keys must be a list of label keys (strings)")
        if any(not isinstance(a, bool) for a in self.require_approval):
            raise ValueError("require_approval must be a list of true/false")
        year = " s (365 days)"
        check_number("soak_s", self.soak_s, 0, MAX_DURATION_S, unit=year)
        check_number("device_timeout_s", self.device_timeout_s, 0, MAX_DURATION_S, unit=year)
        if self.device_timeout_s <= 0:
            raise ValueError("device_timeout_s must be > 0")
        if self.gate_timeout_s is not None:
            check_number("gate_timeout_s", self.gate_timeout_s, 0, MAX_DURATION_S, unit=year)
        if self.on_breach not in ("pause", "rollback"):
            raise ValueError("on_breach must be 'pause' or 'rollback'")
        if self.rate_per_min is not None:
            check_number(
                "rate_per_min", self.rate_per_min, 1, MAX_RATE_PER_MIN, unit=" devices per minute"
            )
        # The engine raises the rate to the ramp's power per minute of a phase (up to 64).
        check_number("rate_ramp", self.rate_ramp, 1, MAX_RAMP)

    def approval_after(self, phase_index: int) -> bool:
        """Whether the phase after `phase_index` needs an approval to start."""
        return phase_index < len(self.require_approval) and self.require_approval[phase_index]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (inverse of `from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["waves"] = list(self.waves)
        out["strata_keys"] = list(self.strata_keys)
        out["require_approval"] = list(self.require_approval)
        out["gates"] = self.gates.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        """Read a spec document; unknown fields are refused, missing ones default.

        Raises:
            ValueError: naming the offending field.
        """
        if not isinstance(data, Mapping):
            raise ValueError("rollout spec must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown rollout spec field(s): {', '.join(map(str, unknown))}")
        kwargs: dict[str, Any] = dict(data)
        try:
            if "gates" in kwargs:
                gates = kwargs["gates"]
                if not isinstance(gates, Mapping):
                    raise ValueError("gates must be an object")
                gate_fields = {f.name for f in dataclasses.fields(GateSpec)}
                bad = sorted(set(gates) - gate_fields)
                if bad:
                    raise ValueError(f"unknown gate field(s): {', '.join(map(str, bad))}")
                kwargs["gates"] = GateSpec(**gates)
            for name in ("waves", "strata_keys", "require_approval"):
                if name in kwargs:
                    value = kwargs[name]
                    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
                        raise ValueError(f"{name} must be a list")
                    kwargs[name] = tuple(value)
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"invalid rollout spec: {exc}") from None
