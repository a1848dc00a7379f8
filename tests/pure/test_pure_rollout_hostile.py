"""The pure rollout engine against stale facts, odd commands and clocks that jump."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgewise.control.rollout import (
    Action,
    DeviceReport,
    DeviceRolloutState,
    GateOutcome,
    GateSpec,
    NotifyDevices,
    Observations,
    ReportStatus,
    Rollout,
    RolloutSpec,
    RolloutState,
    create_rollout,
    pause,
    resume,
    step,
)

D, R = DeviceRolloutState, RolloutState


def fleet(n: int) -> list[tuple[str, dict[str, str]]]:
    return [(f"d{i:03d}", {"hw": f"hw{i % 2}", "site": f"s{i % 3}"}) for i in range(n)]


def make(n: int = 20, now: float = 0.0, **spec: Any) -> Rollout:
    base: dict[str, Any] = {"canary": 2, "waves": (50.0, 100.0)}
    base.update(spec)
    return create_rollout("r1", "dep", 1, 2, fleet(n), RolloutSpec(**base), now=now)


def notified(actions: Sequence[Action]) -> list[str]:
    return [d for a in actions if isinstance(a, NotifyDevices) for d in a.ids]


def obs(reports: Mapping[str, DeviceReport] | None = None, **kw: Any) -> Observations:
    return Observations(reports=dict(reports or {}), **kw)


def test_a_report_made_before_the_device_was_notified_does_not_count() -> None:
    r = make(10, now=100.0, canary=2)
    r, acts = step(r, obs(), 100.0)
    canary = notified(acts)
    stale = DeviceReport(ReportStatus.HEALTHY, "active on the new model", at=50.0)
    r, _ = step(r, obs(dict.fromkeys(canary, stale)), 101.0)
    assert {r.devices[d].state for d in canary} == {D.NOTIFIED}
    assert r.phase_index == 0
    fresh = DeviceReport(ReportStatus.HEALTHY, "active on the new model", at=100.5)
    r, _ = step(r, obs(dict.fromkeys(canary, fresh)), 102.0)
    assert {r.devices[d].state for d in canary} == {D.SUCCEEDED}
    assert r.phase_index == 1


def test_offline_devices_do_not_make_up_the_reporting_quorum() -> None:
    # Four of a five-device canary went dark once notified; one said it was healthy.
    # The dark ones counted as having reported, and a quorum of 3 passed on one device.
    gates = GateSpec(success_pct=50, error_pct=50, min_reporting=3)
    r = make(20, canary=5, device_timeout_s=60, gates=gates)
    r, acts = step(r, obs(), 0.0)
    canary = notified(acts)
    healthy = DeviceReport(ReportStatus.HEALTHY, at=10.0)
    r, _ = step(r, obs({canary[0]: healthy}, last_seen={}), 61.0)
    assert {r.devices[d].state for d in canary[1:]} == {D.HELD_BACK}
    assert r.phase_index == 0
    reporting = next(g for g in r.gates if g.name == "reporting")
    assert reporting.outcome is GateOutcome.INSUFFICIENT
    back = DeviceReport(ReportStatus.HEALTHY, at=70.0)  # two come back and install
    r, _ = step(r, obs(dict.fromkeys(canary[1:3], back)), 71.0)
    assert r.phase_index == 1


def test_an_offline_device_that_is_then_decommissioned_is_not_waited_for() -> None:
    gates = GateSpec(success_pct=50, error_pct=50, min_reporting=3)
    r = make(20, canary=3, device_timeout_s=60, gates=gates)
    r, acts = step(r, obs(), 0.0)
    canary = notified(acts)
    healthy = DeviceReport(ReportStatus.HEALTHY, at=10.0)
    r, _ = step(r, obs(dict.fromkeys(canary[:2], healthy), last_seen={}), 61.0)
    assert r.devices[canary[2]].state is D.HELD_BACK and r.phase_index == 0
    gone = DeviceReport(ReportStatus.DEPARTED, "decommissioned during the rollout", at=80.0)
    r, _ = step(r, obs({canary[2]: gone}), 81.0)
    assert r.devices[canary[2]].reason == "decommissioned during the rollout"
    assert r.phase_index == 1


def test_a_phase_of_dark_devices_and_one_old_agent_waits_rather_than_rolls_back() -> None:
    # Two of a three-device canary were switched off for the night and the third runs an
    # agent too old for the revision: "no device can run it" failed the success gate and
    # rolled the revision back for the whole fleet, though nothing had been tried.
    r = make(20, canary=3, device_timeout_s=60)
    r, acts = step(r, obs(), 0.0)
    old, *dark = notified(acts)
    too_old = DeviceReport(ReportStatus.INCOMPATIBLE, "agent too old", at=30.0)
    r, _ = step(r, obs({old: too_old}), 30.0)
    r, _ = step(r, obs(last_seen={}), 61.0)
    assert {r.devices[d].state for d in dark} == {D.HELD_BACK}
    assert r.state is R.RUNNING and r.phase_index == 0
    success = next(g for g in r.gates if g.name == "success")
    assert success.outcome is GateOutcome.INSUFFICIENT
    back = DeviceReport(ReportStatus.HEALTHY, at=70.0)
    r, _ = step(r, obs({dark[0]: back}), 71.0)
    assert r.phase_index == 1


def test_the_driver_can_hold_a_rollout_that_must_not_start_without_moving_a_device() -> None:
    r = make(10, canary=2)
    r, acts = pause(r, 1.0, "engine", "paused: m@2 was yanked", unstarted=True)
    assert r.state is R.PAUSED and r.reason == "paused: m@2 was yanked"
    assert notified(acts) == [] and all(s.notified_at is None for s in r.devices.values())
    r, acts = step(r, obs(), 2.0)
    assert r.state is R.PAUSED and notified(acts) == []
    r, _ = resume(r, 3.0, "token:operator")
    r, acts = step(r, obs(), 4.0)
    assert len(notified(acts)) == 2 and r.phase_index == 0


def test_the_driver_reads_rows_again_every_half_look_back_not_every_tick() -> None:
    # Re-reading 5 s of reports on every tick (two a second) read each report about ten
    # times; every half look-back, a late row is still read.
    from edgewise.control._rollout_observe import LOOK_BACK_S, look_back_due

    last = 100.0
    assert not look_back_due(last + 0.5, last)
    assert not look_back_due(last + LOOK_BACK_S / 2 - 0.01, last)
    assert look_back_due(last + LOOK_BACK_S / 2, last)
    assert look_back_due(last - 1.0, last)  # a clock stepped back
    assert look_back_due(0.0, -1e18)  # a driver's first tick
