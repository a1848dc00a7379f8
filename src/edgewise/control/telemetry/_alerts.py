"""Alert rules and their pure evaluation.

Three rule kinds, each evaluated per scope (a group of devices, or one device):

- `BurnRateRule`: multi-window, multi-burn-rate error-budget alert (Google SRE
  workbook, ch. 5): with an SLO of `target` success, the burn rate of a window is its
  error rate over `1 - target`; the alert fires when *both* the short and the long
  window burn at `burn_rate` or more (the long window proves it matters, the short one
  that it is still happening, so the alert also resolves quickly), and resolves when
  either drops below.
- `DriftRule`: a device pipeline's drift score above `threshold` on each of its last
  `windows` sufficient windows.
- `FreshnessRule`: a device's newest telemetry is older than `max_age_s`.

`evaluate_rules` compares what the figures say with the alerts' current states and
returns the changes only. A rule with `suppress_during_rollout` is held in SUPPRESSED
instead of FIRING while an active rollout touches any device of the scope; when the
rollout ends, the next evaluation fires it if the condition still holds.

State machine (`ALERT_TRANSITIONS`): INACTIVE -> FIRING | SUPPRESSED; FIRING ->
RESOLVED | SUPPRESSED; SUPPRESSED -> FIRING | RESOLVED; RESOLVED -> FIRING | SUPPRESSED.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from edgewise.control.telemetry._figures import WindowFigures
from edgewise.control.telemetry._views import check_grouping, group_key

__all__ = [
    "ALERT_TRANSITIONS",
    "ActiveRollout",
    "AlertChange",
    "AlertFigures",
    "AlertRule",
    "AlertState",
    "BurnRateRule",
    "DriftRule",
    "FreshnessRule",
    "IllegalAlertTransition",
    "evaluate_rules",
    "parse_rule",
    "scoped_alert",
    "transition",
]


class AlertState(enum.StrEnum):
    """Where an alert (one rule on one scope) stands."""

    INACTIVE = "inactive"  # never fired (not stored)
    FIRING = "firing"  # the condition holds: notify
    SUPPRESSED = "suppressed"  # the condition holds but a rollout touches the scope
    RESOLVED = "resolved"  # the condition held and no longer does


ALERT_TRANSITIONS: frozenset[tuple[AlertState, AlertState]] = frozenset(
    {
        (AlertState.INACTIVE, AlertState.FIRING),
        (AlertState.INACTIVE, AlertState.SUPPRESSED),
        (AlertState.FIRING, AlertState.RESOLVED),
        (AlertState.FIRING, AlertState.SUPPRESSED),
        (AlertState.SUPPRESSED, AlertState.FIRING),
        (AlertState.SUPPRESSED, AlertState.RESOLVED),
        (AlertState.RESOLVED, AlertState.FIRING),
        (AlertState.RESOLVED, AlertState.SUPPRESSED),
    }
)


class IllegalAlertTransition(ValueError):
    """A transition outside `ALERT_TRANSITIONS`."""


def transition(old: AlertState, new: AlertState) -> AlertState:
    """`new`, if the move from `old` is legal.

    Raises:
        IllegalAlertTransition: otherwise.
    """
    if (old, new) not in ALERT_TRANSITIONS:
        raise IllegalAlertTransition(f"alert cannot go from {old} to {new}")
    return new


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    suppress_during_rollout: bool = True
    webhook: str | None = Field(default=None, max_length=2000)


class BurnRateRule(_Rule):
    """Error-budget burn over a short and a long window, per group."""

    kind: Literal["burn_rate"] = "burn_rate"
    target: float = Field(default=0.99, gt=0.0, lt=1.0, description="SLO success ratio")
    short_window_s: float = Field(default=300.0, gt=0)
    long_window_s: float = Field(default=3600.0, gt=0)
    burn_rate: float = Field(default=14.4, gt=0)
    min_requests: int = Field(default=100, ge=0, description="in the short window")
    group_by: str = Field(default="model", description="model, deployment, pipeline, label:<key>")

    @field_validator("group_by")
    @classmethod
    def _known_grouping(cls, by: str) -> str:
        return check_grouping(by)  # the rule the evaluation groups by: refused now, not then

    @model_validator(mode="after")
    def _windows_ordered(self) -> BurnRateRule:
        if self.short_window_s >= self.long_window_s:
            raise ValueError("short_window_s must be shorter than long_window_s")
        return self


class DriftRule(_Rule):
    """Drift score above a threshold for K consecutive sufficient windows, per device pipeline."""

    kind: Literal["drift"] = "drift"
    threshold: float = Field(default=1.0, gt=0)
    windows: int = Field(default=3, ge=1, le=1000)


class FreshnessRule(_Rule):
    """A device's newest telemetry older than T."""

    kind: Literal["freshness"] = "freshness"
    max_age_s: float = Field(default=300.0, gt=0)


AlertRule = Annotated[BurnRateRule | DriftRule | FreshnessRule, Field(discriminator="kind")]
_RULE_ADAPTER: TypeAdapter[BurnRateRule | DriftRule | FreshnessRule] = TypeAdapter(
    AlertRule  # type: ignore[arg-type, unused-ignore]  # an Annotated union is a valid TypeAdapter target
)


def parse_rule(data: Mapping[str, Any]) -> BurnRateRule | DriftRule | FreshnessRule:
    """Validate a rule from JSON.

    Raises:
        pydantic.ValidationError: naming the problem.
    """
    return _RULE_ADAPTER.validate_python(dict(data))


@dataclass(frozen=True)
class AlertFigures:
    """What the rules look at.

    Attributes:
        windows: Window figures covering at least the longest rule window.
        last_seen: Device id -> end of its newest window (or last contact), for every
            device expected to report (decommissioned devices left out).
        states: (rule name, scope) -> the alert's current state; absent = INACTIVE.
    """

    windows: Sequence[WindowFigures] = ()
    last_seen: Mapping[str, float] = field(default_factory=dict)
    states: Mapping[tuple[str, str], AlertState] = field(default_factory=dict)


@dataclass(frozen=True)
class ActiveRollout:
    """A rollout in progress and the devices it touches."""

    id: str
    devices: frozenset[str]


@dataclass(frozen=True)
class AlertChange:
    """An alert moved from one state to another."""

    rule: str
    kind: str
    scope: str
    old: AlertState
    new: AlertState
    value: float | None
    message: str
    at: float
    devices: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (webhook payloads)."""
        return {
            "rule": self.rule,
            "kind": self.kind,
            "scope": self.scope,
            "old": self.old.value,
            "new": self.new.value,
            "value": self.value,
            "message": self.message,
            "at": self.at,
            "devices": list(self.devices),
        }


@dataclass(frozen=True)
class _Verdict:
    scope: str
    holds: bool
    value: float | None
    message: str
    devices: frozenset[str]


def _burn_verdicts(
    rule: BurnRateRule, windows: Sequence[WindowFigures], now: float
) -> list[_Verdict]:
    groups: dict[str, list[WindowFigures]] = {}
    for w in windows:
        if w.end > now - rule.long_window_s:
            groups.setdefault(group_key(w, rule.group_by), []).append(w)
    budget = 1.0 - rule.target
    out = []
    for scope, ws in sorted(groups.items()):
        rates = []
        short_requests = 0
        for span in (rule.short_window_s, rule.long_window_s):
            inside = [w for w in ws if w.end > now - span]
            req = sum(w.requests for w in inside)
            err = sum(w.errors for w in inside)
            rates.append(err / req / budget if req else 0.0)
            if span == rule.short_window_s:
                short_requests = req
        short, long = rates
        holds = short_requests >= rule.min_requests and min(short, long) >= rule.burn_rate
        msg = (
            f"error budget burning {short:.1f}x (short) / {long:.1f}x (long) against "
            f"{rule.burn_rate:g}x for SLO {rule.target:g}"
        )
        out.append(
            _Verdict(scope, holds, min(short, long), msg, frozenset(w.device_id for w in ws))
        )
    return out


def _drift_verdicts(rule: DriftRule, windows: Sequence[WindowFigures]) -> list[_Verdict]:
    series: dict[tuple[str, str], list[WindowFigures]] = {}
    for w in windows:
        if w.drift_score is not None:
            series.setdefault((w.device_id, w.pipeline), []).append(w)
    out = []
    for (device, pipeline), ws in sorted(series.items()):
        last = sorted(ws, key=lambda w: w.end)[-rule.windows :]
        scores = [w.drift_score for w in last if w.drift_score is not None]
        holds = len(scores) >= rule.windows and min(scores) > rule.threshold
        msg = (
            f"drift score over {rule.threshold:g} on the last {rule.windows} windows "
            f"(latest {scores[-1]:.2f}, model {last[-1].model_key})"
        )
        out.append(_Verdict(f"{device}/{pipeline}", holds, scores[-1], msg, frozenset({device})))
    return out


def _fresh_verdicts(
    rule: FreshnessRule, last_seen: Mapping[str, float], now: float
) -> list[_Verdict]:
    out = []
    for device, seen in sorted(last_seen.items()):
        age = max(0.0, now - seen)
        msg = f"no telemetry for {age:.0f} s (limit {rule.max_age_s:g} s)"
        out.append(_Verdict(device, age > rule.max_age_s, age, msg, frozenset({device})))
    return out


def evaluate_rules(
    rules: Sequence[BurnRateRule | DriftRule | FreshnessRule],
    figures: AlertFigures,
    now: float,
    active_rollouts: Sequence[ActiveRollout] = (),
) -> list[AlertChange]:
    """Evaluate every rule; returns the alerts whose state changes (pure).

    Scopes that vanished from the figures (no windows any more) resolve a firing or
    suppressed alert of burn-rate and drift rules.
    """
    touched = (
        frozenset().union(*(r.devices for r in active_rollouts)) if active_rollouts else frozenset()
    )
    changes: list[AlertChange] = []
    for rule in rules:
        if isinstance(rule, BurnRateRule):
            verdicts = _burn_verdicts(rule, figures.windows, now)
        elif isinstance(rule, DriftRule):
            verdicts = _drift_verdicts(rule, figures.windows)
        else:
            verdicts = _fresh_verdicts(rule, figures.last_seen, now)
        seen_scopes = set()
        for v in verdicts:
            seen_scopes.add(v.scope)
            old = figures.states.get((rule.name, v.scope), AlertState.INACTIVE)
            if v.holds:
                held = rule.suppress_during_rollout and bool(v.devices & touched)
                new = AlertState.SUPPRESSED if held else AlertState.FIRING
            elif old in (AlertState.FIRING, AlertState.SUPPRESSED):
                new = AlertState.RESOLVED
            else:
                continue
            if new is old:
                continue
            transition(old, new)
            changes.append(
                AlertChange(
                    rule.name,
                    rule.kind,
                    v.scope,
                    old,
                    new,
                    v.value,
                    v.message,
                    now,
                    tuple(sorted(v.devices)),
                )
            )
        for (name, scope), old in sorted(figures.states.items()):
            if name != rule.name or scope in seen_scopes:
                continue
            if old in (AlertState.FIRING, AlertState.SUPPRESSED):
                changes.append(
                    AlertChange(
                        rule.name,
                        rule.kind,
                        scope,
                        old,
                        AlertState.RESOLVED,
                        None,
                        "no more telemetry in scope",
                        now,
                    )
                )
    return changes


def scoped_alert(alert: Mapping[str, Any], visible: Collection[str]) -> dict[str, Any] | None:
    """An alert (a stored record or `AlertChange.to_dict()`) as a scoped caller sees it.

    Its `devices` keep only the ids in `visible` (the devices inside the caller's
    scope), so another site's device ids never reach the answer, nor how many there
    are. None when no device of it is visible: an alert on another site's devices only,
    or one naming no devices (a resolution for lack of telemetry, whose `scope` may be
    another site's device id), is left out rather than shown with an empty list.
    """
    devices = [d for d in alert.get("devices") or () if d in visible]
    if not devices:
        return None
    return {**alert, "devices": devices}
