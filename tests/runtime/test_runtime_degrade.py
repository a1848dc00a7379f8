from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgewise.examples import DigitsSplit
from edgewise.protocol import DegradationSpec
from edgewise.runtime import DegradeState, Mode, Observation, Runtime, RuntimeEvent
from edgewise.runtime._degrade import read_thermal_c, step

from .conftest import FakeClock, SpecFactory, until

SPEC = DegradationSpec(cpu_percent=90, thermal_c=80, slo_breach_windows=2, recover_windows=2)


def test_pressure_must_last_the_breach_windows_before_switching() -> None:
    hot = Observation(thermal_c=85)
    state, reason = step(DegradeState(), hot, SPEC, slo_ms=20)
    assert state.mode is Mode.PRIMARY and reason is None
    state, reason = step(state, hot, SPEC, slo_ms=20)
    assert state.mode is Mode.FALLBACK
    assert reason == "temperature 85.0 C at or over 80 C"


def test_recovery_needs_readings_below_threshold_by_the_margin() -> None:
    state = DegradeState(mode=Mode.FALLBACK)
    # 75 C is under 80 C but not under 80 * 0.9 = 72 C: no recovery, no flapping.
    for _ in range(5):
        state, reason = step(state, Observation(thermal_c=75), SPEC, slo_ms=20)
        assert state.mode is Mode.FALLBACK and reason is None
    state, _ = step(state, Observation(thermal_c=60), SPEC, slo_ms=20)
    state, reason = step(state, Observation(thermal_c=60), SPEC, slo_ms=20)
    assert state.mode is Mode.PRIMARY and reason == "pressure cleared for 2 windows"


def test_slo_breach_and_cpu_pressure_are_reasons_too() -> None:
    spec = DegradationSpec(slo_breach_windows=1)
    _, reason = step(DegradeState(), Observation(p95_ms=30, cpu_percent=95), spec, slo_ms=20)
    assert reason == "p95 30.0 ms over the 20 ms SLO; CPU 95% at or over 90%"


def test_illegal_transition_raises() -> None:
    with pytest.raises(ValueError, match="illegal"):
        DegradeState().to(Mode.PRIMARY)


def test_thermal_reader_takes_the_hottest_zone(tmp_path: Path) -> None:
    for i, milli in enumerate(("41000", "67500", "junk")):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(milli)
    assert read_thermal_c(tmp_path) == 67.5
    assert read_thermal_c(tmp_path / "none") is None


@pytest.fixture
def hot_runtime() -> Iterator[tuple[Runtime, list[float], list[RuntimeEvent]]]:
    temperature = [50.0]
    seen: list[RuntimeEvent] = []
    rt = Runtime(
        cores=1,
        monitor_interval_s=None,
        thermal_reader=lambda: temperature[0],
        cpu_reader=lambda: 10.0,
        on_event=seen.append,
    )
    yield rt, temperature, seen
    rt.close()


def test_injected_thermal_pressure_switches_to_fallback_and_back_with_events(
    hot_runtime: tuple[Runtime, list[float], list[RuntimeEvent]],
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    rt, temperature, seen = hot_runtime
    spec = make_spec(
        fallback={"name": "digits-logreg"},
        degradation={"thermal_c": 80, "slo_breach_windows": 1, "recover_windows": 2},
    )
    rt.start_pipeline(
        spec, rt.load_model(mlp_bytes), fallback=rt.load_model(logreg_bytes, warmup=1)
    )
    assert rt.infer("digits", split.x_test[0]).tier == "primary"

    temperature[0] = 90.0
    switched = rt.tick()
    assert [e.kind for e in switched] == ["degraded"]
    assert "temperature 90.0 C" in switched[0].reason
    result = rt.infer("digits", split.x_test[0])
    assert result.tier == "fallback" and result.model == "model@0"
    assert rt.stats("digits")["mode"] == "fallback"

    temperature[0] = 50.0
    assert rt.tick() == []  # hysteresis: one calm window is not enough
    assert [e.kind for e in rt.tick()] == ["recovered"]
    assert rt.infer("digits", split.x_test[0]).tier == "primary"

    stats = rt.stats("digits")
    assert stats["nv_inference_fallback"] == 1
    assert stats["nv_inference_request_success"] == 3
    kinds = [(e.kind, e.detail.get("to")) for e in seen if e.kind in ("degraded", "recovered")]
    assert kinds == [("degraded", "fallback"), ("recovered", "primary")]


@pytest.fixture
def calm_rt(clock: FakeClock) -> Iterator[Runtime]:
    """A runtime on a fake clock whose CPU and temperature readers have nothing to say:
    only the SLO can move its pipelines to their fallback."""
    rt = Runtime(
        cores=1,
        clock=clock,
        monitor_interval_s=None,
        thermal_reader=lambda: None,
        cpu_reader=lambda: None,
    )
    yield rt
    rt.close()


def test_rolling_p95_over_the_slo_switches_to_fallback_and_back(
    calm_rt: Runtime,
    clock: FakeClock,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    from edgewise.runtime import POSTPROCESS

    rt = calm_rt
    delay = [0.05]

    def factory(params: object) -> object:
        def run(post: object) -> None:
            clock.now += delay[0]

        return run

    POSTPROCESS.register("test_slow")(factory)
    try:
        spec = make_spec(
            fallback={"name": "digits-logreg"},
            slo={"p95_ms": 20, "window_s": 10},
            postprocess=[{"type": "test_slow"}],
            degradation={"slo_breach_windows": 2, "recover_windows": 1},
        )
        rt.start_pipeline(spec, rt.load_model(mlp_bytes), fallback=rt.load_model(logreg_bytes))
        for row in split.x_test[:5]:
            rt.infer("digits", row)  # each takes 50 ms of fake time
        assert rt.tick() == []  # first breached window
        [event] = rt.tick()
        assert event.kind == "degraded" and event.reason == "p95 50.0 ms over the 20 ms SLO"

        delay[0] = 0.001
        clock.now += 11  # the slow samples leave the 10 s window
        for row in split.x_test[:5]:
            assert rt.infer("digits", row).tier == "fallback"
        [event] = rt.tick()
        assert event.kind == "recovered"
        assert rt.infer("digits", split.x_test[0]).tier == "primary"
    finally:
        POSTPROCESS._factories.pop("test_slow", None)


def test_requests_expiring_in_the_queue_breach_the_slo_and_switch_to_fallback(
    calm_rt: Runtime,
    clock: FakeClock,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    # max_queue_ms under the SLO: every request served is on time, so only the expired
    # ones show that the device cannot keep up. For the SLO they were never answered.
    rt = calm_rt
    spec = make_spec(
        fallback={"name": "digits-logreg"},
        slo={"p95_ms": 100, "window_s": 10},
        batching={"max_queue_ms": 20},
        degradation={"slo_breach_windows": 1, "recover_windows": 1},
    )
    rt.start_pipeline(spec, rt.load_model(mlp_bytes), fallback=rt.load_model(logreg_bytes))
    for row in split.x_test[:39]:
        rt.infer("digits", row)  # on time
    rt.pause()
    late = rt.submit("digits", split.x_test[0], lambda r: None)
    clock.now += 0.05
    rt.resume()
    until(lambda: late.error is not None)
    assert rt.stats("digits")["p95_ms"] is not None  # 1 in 40 expired: p95 still served
    assert rt.tick() == []

    rt.pause()
    more = [rt.submit("digits", row, lambda r: None) for row in split.x_test[:2]]
    clock.now += 0.05
    rt.resume()
    until(lambda: all(r.error is not None for r in more))
    assert rt.stats("digits")["p95_ms"] is None  # 3 of 42 expired: no p95 to show
    [event] = rt.tick()
    assert event.kind == "degraded"
    assert event.reason == "p95 over the 100 ms SLO: 5% or more of requests expired in the queue"
    assert rt.infer("digits", split.x_test[0]).tier == "fallback"

    clock.now += 11  # the expired requests leave the window
    rt.infer("digits", split.x_test[0])
    [event] = rt.tick()
    assert event.kind == "recovered"
