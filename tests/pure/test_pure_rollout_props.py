"""Property test: random observation sequences and operator commands keep the invariants."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.control.rollout import (
    CohortTelemetry,
    DeviceReport,
    DeviceRolloutState,
    GateSpec,
    IllegalTransition,
    NotifyDevices,
    Observations,
    ReportStatus,
    RevertDevices,
    Rollout,
    RolloutSpec,
    RolloutState,
    abort,
    approve,
    create_rollout,
    is_valid_transition,
    pause,
    resume,
    rollback,
    step,
)

COMMANDS = {
    "pause": pause,
    "resume": resume,
    "approve": approve,
    "abort": abort,
    "rollback": rollback,
}

_specs = st.builds(
    RolloutSpec,
    canary=st.one_of(st.integers(0, 6), st.sampled_from(["10%", "50%"])),
    waves=st.lists(st.sampled_from([10.0, 30.0, 50.0, 100.0]), max_size=3).map(tuple),
    gates=st.builds(
        GateSpec,
        success_pct=st.sampled_from([0.0, 50.0, 80.0, 100.0]),
        error_pct=st.sampled_from([0.0, 20.0, 50.0, 100.0]),
        min_reporting=st.integers(0, 3),
        max_latency_ratio=st.sampled_from([None, 1.5]),
        min_inferences=st.just(10),
    ),
    soak_s=st.sampled_from([0.0, 30.0, 120.0]),
    on_breach=st.sampled_from(["pause", "rollback"]),
    require_approval=st.lists(st.booleans(), max_size=3).map(tuple),
    rate_per_min=st.sampled_from([None, 2.0, 5.0]),
    rate_ramp=st.sampled_from([1.0, 2.0]),
    device_timeout_s=st.sampled_from([45.0, 300.0]),
    gate_timeout_s=st.sampled_from([None, 60.0]),
)

_event = st.one_of(
    st.tuples(
        st.just("observe"),
        st.floats(0.0, 90.0),  # time advance
        st.lists(
            st.tuples(st.integers(0, 29), st.sampled_from(list(ReportStatus)), st.booleans()),
            max_size=12,
        ),
        st.sampled_from([None, 1.0, 3.0]),  # phase latency vs control latency 1.0
    ),
    st.tuples(st.just("command"), st.sampled_from(sorted(COMMANDS))),
)


def _reachable(old: Any, new: Any) -> bool:
    """`new` follows from `old` by legal transitions (one step may chain several)."""
    seen, frontier = {old}, [old]
    while frontier:
        state = frontier.pop()
        for nxt in type(old):
            if nxt not in seen and is_valid_transition(state, nxt):
                seen.add(nxt)
                frontier.append(nxt)
    return new in seen


def _check_transition(before: Rollout, after: Rollout) -> None:
    if before.terminal:
        assert after == before
    assert _reachable(before.state, after.state)
    for old, new in zip(before.phase_states, after.phase_states, strict=True):
        assert _reachable(old, new)
    assert set(after.devices) == set(before.devices)
    for dev, old in before.devices.items():
        new = after.devices[dev]
        assert _reachable(old.state, new.state)
        if old.notified_at is not None:
            assert new.notified_at == old.notified_at  # notified once, never again
        if old.state is DeviceRolloutState.TIMED_OUT:
            assert new.state is DeviceRolloutState.TIMED_OUT


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 30),
    spec=_specs,
    seed=st.integers(0, 100),
    events=st.lists(_event, max_size=40),
)
def test_random_sequences_keep_rollout_invariants(
    n: int, spec: RolloutSpec, seed: int, events: list[Any]
) -> None:
    fleet = [(f"d{i:02d}", {"hw": f"h{i % 3}", "site": f"s{i % 4}"}) for i in range(n)]
    r = create_rollout("r", "dep", 1, 2, fleet, spec, now=0.0, seed=seed)
    flat = [d for p in r.phases for d in p]
    assert sorted(flat) == sorted(d for d, _ in fleet) and len(flat) == len(set(flat))

    now = 0.0
    ever_notified: list[str] = []
    notify_times: list[float] = []
    for event in events:
        before = r
        if event[0] == "observe":
            _, dt, raw, latency = event
            now += dt
            reports = {
                f"d{i:02d}": DeviceReport(status, at=now if stamped else None)
                for i, status, stamped in raw
                if i < n
            }
            tel = (
                None
                if latency is None
                else CohortTelemetry(devices=1, inferences=50, p95_latency_ms=latency)
            )
            ctl = CohortTelemetry(devices=1, inferences=50, p95_latency_ms=1.0)
            r, actions = step(r, Observations(reports, tel, ctl), now)
        else:
            try:
                r, actions = COMMANDS[event[1]](r, now, "op")
            except IllegalTransition:
                assert r is before
                continue
        _check_transition(before, r)
        for action in actions:
            if isinstance(action, NotifyDevices):
                assert action.revision == 2
                ever_notified.extend(action.ids)
                notify_times.extend([now] * len(action.ids))
                # Only devices of the current phase or of phases this step got through.
                assert all(r.devices[d].phase <= r.phase_index for d in action.ids)
            if isinstance(action, RevertDevices):
                assert action.revision == 1
                assert list(action.ids) == sorted(set(ever_notified))
                assert r.state in (RolloutState.ROLLED_BACK, RolloutState.ABORTED)
        assert len(ever_notified) == len(set(ever_notified)), "a device was notified twice"
        assert sorted(ever_notified) == r.moved

    if spec.rate_per_min is not None and spec.rate_ramp == 1.0:
        for t in notify_times:
            in_window = sum(1 for u in notify_times if t <= u < t + 60.0)
            assert in_window <= spec.rate_per_min
