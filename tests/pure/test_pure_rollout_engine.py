from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from edgewise.control.rollout import (
    Action,
    CohortTelemetry,
    DeviceReport,
    DeviceRolloutState,
    GateSpec,
    IllegalTransition,
    NotifyDevices,
    Observations,
    PhaseState,
    RecordEvent,
    ReportStatus,
    RevertDevices,
    Rollout,
    RolloutSpec,
    RolloutState,
    SetStableRevision,
    WakeAt,
    abort,
    approve,
    create_rollout,
    fail,
    pause,
    resume,
    rollback,
    step,
)

D, P, R = DeviceRolloutState, PhaseState, RolloutState
HEALTHY = DeviceReport(ReportStatus.HEALTHY)
FAILED = DeviceReport(ReportStatus.FAILED, "health check failed")


def fleet(n: int) -> list[tuple[str, dict[str, str]]]:
    return [(f"d{i:03d}", {"hw": f"hw{i % 2}", "site": f"s{i % 3}"}) for i in range(n)]


def make(n: int = 20, **spec: Any) -> Rollout:
    base: dict[str, Any] = {"canary": 2, "waves": (50.0, 100.0)}
    base.update(spec)
    return create_rollout("r1", "dep", 1, 2, fleet(n), RolloutSpec(**base), now=0.0)


def notified(actions: Sequence[Action]) -> list[str]:
    return [d for a in actions if isinstance(a, NotifyDevices) for d in a.ids]


def kinds(actions: Sequence[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, RecordEvent)]


def obs(reports: Mapping[str, DeviceReport] | None = None, **kw: Any) -> Observations:
    return Observations(reports=dict(reports or {}), **kw)


def all_report(ids: Sequence[str], report: DeviceReport = HEALTHY) -> dict[str, DeviceReport]:
    return dict.fromkeys(ids, report)


# ------------------------------------------------------------------------- happy path


def test_rollout_completes_phase_by_phase() -> None:
    r = make(20)
    r, acts = step(r, obs(), 1.0)
    assert r.state is R.RUNNING
    assert sorted(notified(acts)) == sorted(r.phases[0])
    assert r.phase_states[0] is P.SOAKING
    seen = set(notified(acts))
    for t in (2.0, 3.0, 4.0):
        r, acts = step(r, obs(all_report(sorted(seen))), t)
        new = notified(acts)
        assert not seen & set(new)
        seen |= set(new)
    assert r.state is R.COMPLETED
    assert seen == set(r.devices)
    assert SetStableRevision("dep", 2) in acts
    assert r.phase_states == (P.PASSED, P.PASSED, P.PASSED)
    assert "rollout.completed" in kinds(acts)


def test_empty_rollout_completes_at_once() -> None:
    r = create_rollout("r", "dep", 1, 2, [], RolloutSpec(), now=0.0)
    r, acts = step(r, obs(), 1.0)
    assert r.state is R.COMPLETED
    assert SetStableRevision("dep", 2) in acts


def test_empty_phase_succeeds_without_soak() -> None:
    r = make(4, canary=0, waves=(100.0,), soak_s=600)
    r, _ = step(r, obs(), 0.0)
    assert r.phase_states[0] is P.PASSED
    assert r.phase_index == 1


# ------------------------------------------------------------------------- gate boundaries


def run_canary(n_ok: int, n_bad: int, n_busy: int, gates: GateSpec) -> Rollout:
    size = n_ok + n_bad + n_busy
    r = make(size * 2, canary=size, gates=gates)
    r, _ = step(r, obs(), 0.0)
    canary = list(r.phases[0])
    reports = all_report(canary[:n_ok])
    reports |= all_report(canary[n_ok : n_ok + n_bad], FAILED)
    reports |= all_report(canary[n_ok + n_bad :], DeviceReport(ReportStatus.INSTALLING))
    r, _ = step(r, obs(reports), 1.0)
    return r


def test_7_of_10_healthy_at_80_percent_does_not_advance_8_does() -> None:
    gates = GateSpec(success_pct=80, error_pct=50)
    r = run_canary(7, 0, 3, gates)
    assert (r.state, r.phase_index, r.phase_states[0]) == (R.RUNNING, 0, P.SOAKING)
    r = run_canary(7, 3, 0, gates)
    assert r.phase_states[0] is P.BREACHED
    r = run_canary(8, 0, 2, gates)
    assert r.phase_index == 1 and r.phase_states[0] is P.PASSED


def test_1_of_5_failed_at_20_percent_does_not_fire_2_do() -> None:
    gates = GateSpec(success_pct=0, error_pct=20)
    r = run_canary(3, 1, 1, gates)
    assert r.state is R.RUNNING and r.phase_states[0] is not P.BREACHED
    r = run_canary(2, 2, 1, gates)
    assert r.state is R.ROLLED_BACK and r.phase_states[0] is P.BREACHED


def test_timed_out_is_terminal_counted_failed_and_late_success_ignored() -> None:
    r = make(10, canary=5, device_timeout_s=60, gates=GateSpec(success_pct=0, error_pct=50))
    r, _ = step(r, obs(), 0.0)
    canary = list(r.phases[0])
    r, acts = step(r, obs(all_report(canary[:4])), 61.0)
    assert r.devices[canary[4]].state is D.TIMED_OUT
    assert "devices.timed_out" in kinds(acts)
    r, _ = step(r, obs(all_report(canary)), 62.0)
    assert r.devices[canary[4]].state is D.TIMED_OUT


def test_success_report_dated_after_the_timeout_does_not_count() -> None:
    r = make(10, canary=5, device_timeout_s=60, gates=GateSpec(success_pct=100, error_pct=100))
    r, _ = step(r, obs(), 0.0)
    dev = r.phases[0][0]
    late = DeviceReport(ReportStatus.HEALTHY, at=70.0)
    r, _ = step(r, obs({dev: late}), 75.0)
    assert r.devices[dev].state is D.TIMED_OUT


def test_a_device_that_cannot_run_the_revision_is_held_back_not_failed() -> None:
    r = make(10, canary=5, device_timeout_s=60, gates=GateSpec(success_pct=100, error_pct=0))
    r, _ = step(r, obs(), 0.0)
    canary = list(r.phases[0])
    cannot = DeviceReport(ReportStatus.INCOMPATIBLE, "digits: incompatible: needs accelerator x")
    r, _ = step(r, obs(all_report(canary[:4]) | {canary[4]: cannot}), 1.0)
    assert r.devices[canary[4]].state is D.HELD_BACK
    assert r.devices[canary[4]].reason == "digits: incompatible: needs accelerator x"
    assert r.phase_index == 1  # 4 of the 4 that can run it: the canary passed
    # An install it starts after an upgrade is not news (its timeout ran long ago).
    r, _ = step(r, obs({canary[4]: DeviceReport(ReportStatus.INSTALLING)}), 2.0)
    assert r.devices[canary[4]].state is D.HELD_BACK
    r, acts = step(r, obs(all_report(list(r.phases[1]))), 3.0)
    assert r.state is R.COMPLETED
    done = next(a for a in acts if isinstance(a, RecordEvent) and a.kind == "rollout.completed")
    assert done.detail["held_back"] == 1 and done.detail["held_back_devices"] == [canary[4]]


def test_a_held_back_device_is_not_timed_out_and_counts_once_it_installs() -> None:
    r = make(10, canary=2, device_timeout_s=60, gates=GateSpec(success_pct=100, error_pct=0))
    r, _ = step(r, obs(), 0.0)
    held, busy = r.phases[0]
    cannot = DeviceReport(ReportStatus.INCOMPATIBLE, "incompatible: this agent does not know x")
    r, _ = step(r, obs({held: cannot, busy: DeviceReport(ReportStatus.INSTALLING)}), 1.0)
    r, _ = step(r, obs({busy: DeviceReport(ReportStatus.HEALTHY, at=30.0)}), 61.0)
    assert r.devices[held].state is D.HELD_BACK  # not timed out: not waited for
    assert r.phase_index == 1
    r, _ = step(r, obs({held: HEALTHY}), 62.0)  # its agent was upgraded
    assert r.devices[held].state is D.SUCCEEDED


def test_a_device_decommissioned_during_the_rollout_is_held_back_notified_or_not() -> None:
    gates = GateSpec(success_pct=100, error_pct=0)
    r = make(10, canary=2, waves=(100.0,), device_timeout_s=60, gates=gates)
    r, _ = step(r, obs(), 0.0)
    (stays, left), later = r.phases[0], r.phases[1][0]
    gone = DeviceReport(ReportStatus.DEPARTED, "decommissioned during the rollout", 90.0)
    # Its report comes after its timeout would have passed: being gone still wins.
    r, _ = step(r, obs({stays: HEALTHY, left: gone, later: gone}), 1.0)
    assert r.devices[left].state is D.HELD_BACK and r.devices[later].state is D.HELD_BACK
    assert r.devices[later].notified_at is None and r.phase_index == 1
    r, acts = step(r, obs(), 2.0)
    assert later not in notified(acts)  # a device that is gone is not moved
    r, _ = step(r, obs(all_report([d for d in r.phases[1] if d != later])), 3.0)
    assert r.state is R.COMPLETED
    # A device that already finished keeps its outcome.
    done = make(4, canary=2, gates=GateSpec(success_pct=0, error_pct=100))
    done, _ = step(done, obs(), 0.0)
    first = done.phases[0][0]
    done, _ = step(done, obs({first: FAILED}), 1.0)
    done, _ = step(done, obs({first: gone}), 2.0)
    assert done.devices[first].state is D.FAILED


def test_past_its_timeout_an_offline_device_is_held_back_and_a_stuck_one_times_out() -> None:
    gates = GateSpec(success_pct=50, error_pct=50)
    r = make(3, canary=3, waves=(), device_timeout_s=60, gates=gates)
    r, _ = step(r, obs(), 0.0)
    ok, stuck, off = r.phases[0]
    r, _ = step(r, obs({ok: HEALTHY}), 1.0)
    r, acts = step(r, obs(last_seen={stuck: 30.0, off: -5.0}), 61.0)
    assert r.devices[stuck].state is D.TIMED_OUT
    assert r.devices[off].state is D.HELD_BACK
    assert r.devices[off].reason == "offline: not seen since it was notified"
    assert {"devices.offline", "devices.timed_out"} <= set(kinds(acts))
    # Without sightings (None), every device past its timeout times out, as before.
    q = make(10, canary=1, waves=(100.0,), device_timeout_s=60)
    q, _ = step(q, obs(), 0.0)
    q, _ = step(q, obs(), 61.0)
    assert q.devices[q.phases[0][0]].state is D.TIMED_OUT


def test_a_phase_whose_devices_are_all_offline_waits_for_them() -> None:
    # A canary site closed for the night: nothing shown to work, nor to fail, yet.
    r = make(10, canary=2, waves=(100.0,), device_timeout_s=60)
    r, _ = step(r, obs(), 0.0)
    first, second = r.phases[0]
    r, _ = step(r, obs(last_seen={}), 61.0)
    assert {r.devices[d].state for d in (first, second)} == {D.HELD_BACK}
    assert (r.state, r.phase_index) == (R.RUNNING, 0)
    assert r.gates[0].outcome.value == "insufficient" and "offline" in r.gates[0].detail
    r, _ = step(r, obs({first: HEALTHY}), 3600.0)  # back in the morning
    assert r.phase_index == 1
    # Held back because it cannot run the revision: a phase of those still fails.
    cannot = DeviceReport(ReportStatus.INCOMPATIBLE, "incompatible: this agent does not know x")
    q = make(10, canary=2, waves=(100.0,), device_timeout_s=60)
    q, _ = step(q, obs(), 0.0)
    q, _ = step(q, obs(dict.fromkeys(q.phases[0], cannot)), 1.0)
    assert q.state is R.ROLLED_BACK


def test_held_back_devices_are_sent_back_with_the_rest_on_a_breach() -> None:
    r = make(10, canary=4, gates=GateSpec(success_pct=0, error_pct=20))
    r, _ = step(r, obs(), 0.0)
    canary = list(r.phases[0])
    cannot = DeviceReport(ReportStatus.INCOMPATIBLE, "incompatible: this agent does not know x")
    r, acts = step(r, obs({canary[0]: cannot, canary[1]: FAILED}), 1.0)
    assert r.state is R.ROLLED_BACK
    revert = next(a for a in acts if isinstance(a, RevertDevices))
    assert set(revert.ids) == set(canary)
    assert r.devices[canary[0]].state is D.ROLLED_BACK


# ------------------------------------------------------------------------- breach policy


def test_breach_with_rollback_reverts_exactly_the_moved_devices() -> None:
    r = make(20, canary=4, gates=GateSpec(error_pct=0))
    r, acts = step(r, obs(), 0.0)
    moved = sorted(notified(acts))
    r, acts = step(r, obs({moved[0]: FAILED}), 1.0)
    assert r.state is R.ROLLED_BACK
    reverts = [a for a in acts if isinstance(a, RevertDevices)]
    assert reverts == [RevertDevices(tuple(moved), 1)]
    assert r.moved == moved
    assert all(r.devices[d].state is D.ROLLED_BACK for d in moved)
    assert all(r.devices[d].state is D.PENDING for d in r.devices if d not in moved)
    assert r.phase_states[1:] == (P.CANCELLED, P.CANCELLED)
    assert all(r.desired_revision(d) == 1 for d in r.devices)


def test_breach_with_pause_then_resume_overrides_the_phase() -> None:
    r = make(20, canary=4, on_breach="pause", gates=GateSpec(error_pct=0))
    r, acts = step(r, obs(), 0.0)
    canary = sorted(notified(acts))
    reports = all_report(canary) | {canary[0]: FAILED}
    r, acts = step(r, obs(reports), 1.0)
    assert r.state is R.PAUSED and "rollout.paused" in kinds(acts)
    assert "error" in r.reason
    r, acts = step(r, obs(reports), 2.0)
    assert r.state is R.PAUSED and not notified(acts)
    r, acts = resume(r, 3.0, "alice")
    assert r.phase_states[0] is P.OVERRIDDEN
    assert "phase.overridden" in kinds(acts)
    r, acts = step(r, obs(reports), 4.0)
    assert r.phase_index == 1 and notified(acts)


def test_quality_gate_breach_after_soak_rolls_back() -> None:
    gates = GateSpec(success_pct=100, max_error_rate_delta=0.02, min_inferences=100)
    r = make(20, canary=4, soak_s=300, gates=gates)
    r, acts = step(r, obs(), 0.0)
    canary = notified(acts)
    good = CohortTelemetry(devices=16, inferences=5000, errors=50)
    bad = CohortTelemetry(devices=4, inferences=1000, errors=100)
    r, acts = step(r, obs(all_report(canary), phase=bad, control=good), 100.0)
    assert r.state is R.RUNNING  # still soaking: quality is judged after the soak
    assert WakeAt(300.0) in acts
    r, acts = step(r, obs(all_report(canary), phase=bad, control=good), 300.0)
    assert r.state is R.ROLLED_BACK
    assert "error_rate_delta" in r.reason


def test_quality_gates_pass_when_the_new_model_is_as_good() -> None:
    gates = GateSpec(success_pct=100, max_error_rate_delta=0.02, max_latency_ratio=1.5)
    r = make(20, canary=4, soak_s=10, gates=gates)
    r, acts = step(r, obs(), 0.0)
    canary = notified(acts)
    tel = CohortTelemetry(devices=4, inferences=1000, errors=10, p95_latency_ms=5.0)
    r, _ = step(r, obs(all_report(canary), phase=tel, control=tel), 10.0)
    assert r.phase_index == 1


def test_telemetry_for_another_phase_is_ignored() -> None:
    gates = GateSpec(success_pct=100, max_latency_ratio=1.5)
    r = make(20, canary=4, gates=gates)
    r, acts = step(r, obs(), 0.0)
    tel = CohortTelemetry(devices=4, inferences=1000, p95_latency_ms=5.0)
    r, _ = step(r, obs(all_report(notified(acts)), phase=tel, control=tel, telemetry_phase=3), 1.0)
    assert r.phase_index == 0  # latency gate insufficient: waits


def test_insufficient_gates_breach_after_gate_timeout() -> None:
    gates = GateSpec(success_pct=100, max_latency_ratio=1.5)
    r = make(20, canary=4, gates=gates, gate_timeout_s=120, on_breach="pause")
    r, acts = step(r, obs(), 0.0)
    reports = all_report(notified(acts))
    r, _ = step(r, obs(reports), 100.0)
    assert r.state is R.RUNNING
    r, _ = step(r, obs(reports), 120.0)
    assert r.state is R.PAUSED and "enough data" in r.reason


# ------------------------------------------------------------------------- pacing


def test_rate_limit_caps_notifications_per_minute() -> None:
    r = make(40, canary="100%", waves=(), rate_per_min=10)
    r, acts = step(r, obs(), 0.0)
    assert len(notified(acts)) == 10
    assert WakeAt(60.0) in acts
    r, acts = step(r, obs(), 30.0)
    assert notified(acts) == []
    r, acts = step(r, obs(), 59.9)
    assert notified(acts) == []
    r, acts = step(r, obs(), 60.0)  # any 60 s window [t, t + 60) holds at most 10
    assert len(notified(acts)) == 10
    assert WakeAt(120.0) in acts


def test_rate_ramps_exponentially_per_minute_of_phase() -> None:
    r = make(100, canary="100%", waves=(), rate_per_min=5, rate_ramp=2.0)
    r, acts = step(r, obs(), 0.0)
    counts = [len(notified(acts))]
    for t in (61.0, 122.0, 183.0):
        r, acts = step(r, obs(), t)
        counts.append(len(notified(acts)))
    assert counts == [5, 10, 20, 40]


def test_no_device_is_notified_twice_across_repeated_steps() -> None:
    r = make(30, canary=3, rate_per_min=7)
    seen: list[str] = []
    for t in range(0, 1200, 13):
        r, acts = step(r, obs(all_report(seen)), float(t))
        seen += notified(acts)
    assert len(seen) == len(set(seen)) == 30
    assert r.state is R.COMPLETED


# ------------------------------------------------------------------------- approvals & commands


def test_approval_is_required_before_the_next_phase() -> None:
    r = make(20, canary=2, require_approval=(True, False))
    r, acts = step(r, obs(), 0.0)
    canary = notified(acts)
    r, acts = step(r, obs(all_report(canary)), 1.0)
    assert r.state is R.AWAITING_APPROVAL and not notified(acts)
    r, acts = step(r, obs(all_report(canary)), 2.0)
    assert r.state is R.AWAITING_APPROVAL and not notified(acts)
    r, acts = approve(r, 3.0, "bob")
    assert "rollout.approved" in kinds(acts) and r.history[-1].actor == "bob"
    r, acts = step(r, obs(all_report(canary)), 4.0)
    assert r.phase_index == 1 and len(notified(acts)) == len(r.phases[1])


def test_manual_pause_stops_notifying_and_resume_continues() -> None:
    r = make(40, canary="100%", waves=(), rate_per_min=10)
    r, _ = step(r, obs(), 0.0)
    why, _ = pause(r, 1.0, "engine", "paused: m@2 was yanked")
    assert why.state is R.PAUSED and why.reason == "paused: m@2 was yanked"
    r, acts = pause(r, 1.0, "carol")
    assert r.state is R.PAUSED and r.reason == "paused by carol"
    r, acts = step(r, obs(), 100.0)
    assert not notified(acts)
    r, _ = resume(r, 101.0, "carol")
    r, acts = step(r, obs(), 102.0)
    assert len(notified(acts)) == 10


def test_abort_reverts_moved_devices() -> None:
    r = make(20, canary=4)
    r, acts = step(r, obs(), 0.0)
    moved = sorted(notified(acts))
    r, acts = abort(r, 1.0, "dave")
    assert r.state is R.ABORTED
    assert RevertDevices(tuple(moved), 1) in acts
    assert step(r, obs(), 2.0) == (r, [])


def test_manual_rollback_and_fail() -> None:
    r, _ = step(make(10), obs(), 0.0)
    rb, acts = rollback(r, 1.0, "erin")
    assert rb.state is R.ROLLED_BACK and any(isinstance(a, RevertDevices) for a in acts)
    failed, _ = fail(r, 1.0, "revision 2 was deleted")
    assert failed.state is R.FAILED and failed.reason == "revision 2 was deleted"


@pytest.mark.parametrize(
    ("command", "state"),
    [
        (resume, R.RUNNING),
        (approve, R.RUNNING),
        (pause, R.PENDING),
        (abort, R.COMPLETED),
        (pause, R.COMPLETED),
        (rollback, R.ABORTED),
    ],
)
def test_illegal_commands_raise(command: Any, state: RolloutState) -> None:
    r = make(4)
    if state is R.RUNNING:
        r, _ = step(r, obs(), 0.0)
    elif state is R.COMPLETED:
        r = create_rollout("r", "dep", 1, 2, [], RolloutSpec(), now=0.0)
        r, _ = step(r, obs(), 0.0)
    elif state is R.ABORTED:
        r, _ = abort(r, 0.0, "x")
    assert r.state is state
    with pytest.raises(IllegalTransition):
        command(r, 1.0, "someone")


# ------------------------------------------------------------------------- snapshot & storage


def test_device_enrolled_after_start_is_not_in_the_rollout() -> None:
    r, _ = step(make(10), obs(), 0.0)
    r, acts = step(r, obs({"late-device": HEALTHY}), 1.0)
    assert "late-device" not in r.devices
    assert r.desired_revision("late-device") is None
    assert "late-device" not in notified(acts)


def test_reports_from_devices_not_yet_notified_are_ignored() -> None:
    r, _ = step(make(20, canary=2), obs(), 0.0)
    waiting = r.phases[2][0]
    r, _ = step(r, obs({waiting: HEALTHY}), 1.0)
    assert r.devices[waiting].state is D.PENDING


def test_rollout_roundtrips_through_json_midway() -> None:
    r = make(20, canary=4, soak_s=50, rate_per_min=3, gates=GateSpec(max_latency_ratio=1.2))
    r, acts = step(r, obs(), 0.0)
    r, _ = step(r, obs({notified(acts)[0]: FAILED}), 1.0)
    again = Rollout.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    assert step(again, obs(), 70.0) == step(r, obs(), 70.0)


def test_from_dict_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        Rollout.from_dict({"id": "x"})


def test_status_helpers() -> None:
    r, _ = step(make(20, canary=4), obs(), 0.0)
    counts = r.device_counts(phase=0)
    assert counts["notified"] == 4 and counts["pending"] == 0
    assert r.device_counts()["pending"] == 16


# ------------------------------------------------------------------------- spec documents


def test_spec_from_dict_reads_a_document() -> None:
    spec = RolloutSpec.from_dict(
        {
            "canary": "10%",
            "waves": [30, 100],
            "on_breach": "pause",
            "gates": {"success_pct": 95, "max_latency_ratio": 1.2},
            "require_approval": [True],
        }
    )
    assert spec.gates.success_pct == 95 and spec.approval_after(0) and not spec.approval_after(1)
    assert RolloutSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "doc",
    [
        {"canry": 1},
        {"gates": {"succes_pct": 1}},
        {"gates": 5},
        {"waves": "10,20"},
        {"on_breach": "explode"},
        {"rate_per_min": 0.5},
        {"rate_ramp": 0.5},
        {"soak_s": "long"},
        {"canary": "x%"},
        {"device_timeout_s": 0},
        [],
    ],
)
def test_spec_from_dict_refuses_bad_documents(doc: Any) -> None:
    with pytest.raises(ValueError):
        RolloutSpec.from_dict(doc)
