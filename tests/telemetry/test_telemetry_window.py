"""Window records from a real runtime: counts and latency deltas, resources, uplink."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgewise.agent.telemetry import (
    ResourceReaders,
    WindowAggregator,
    read_throttled,
    reference_from_manifest,
    stats_delta,
)
from edgewise.protocol import PipelineSpec
from edgewise.runtime import Runtime

from .conftest import Digits, FakeClock


def test_window_counts_and_latency_are_deltas_of_runtime_stats(digits: Digits) -> None:
    clock = FakeClock()
    agg = WindowAggregator(
        "digits",
        model="digits-mlp",
        version="1.0.0",
        reference=reference_from_manifest(digits.manifest["reference"]),
        labels=digits.manifest["labels"],
        clock=clock,
    )
    spec = PipelineSpec.model_validate(
        {"name": "digits", "model": {"name": "digits-mlp", "version": "1.0.0"}}
    )
    with Runtime(cores=1, monitor_interval_s=None) as rt:
        rt.start_pipeline(spec, rt.load_model(digits.model))
        x = digits.split.x_test
        for row in x[:30]:
            rt.infer("digits", row)
        agg.observe_stats(rt.stats("digits"))  # the window starts from here
        windows = []
        for lo, hi in ((30, 80), (80, 200)):
            res = rt.infer("digits", x[lo:hi])
            agg.observe(x[lo:hi], res.confidences, res.labels)
            agg.observe_stats(rt.stats("digits"))
            clock.advance(10)
            windows.append(agg.close(resources={"cpu_percent": 5.0}, uplink={"state": "online"}))
    first, second = (next(d for _, k, d, _ in w if k == "window") for w in windows)
    assert first["counts"]["ok"] == 1 and second["counts"]["ok"] == 1  # one request each
    assert sum(first["confidence"]["counts"]) == 50
    assert sum(second["confidence"]["counts"]) == 120
    assert sum(first["latency"]["stages"]["total"]["counts"]) == 1
    assert {"total", "queue", "compute", "model"} <= set(first["latency"]["stages"])
    assert sum(second["features"]["classes"]) == 120
    assert second["start"] == first["end"]
    assert first["resources"] == {"cpu_percent": 5.0} and first["uplink"]["state"] == "online"


def test_counter_reset_counts_from_zero() -> None:
    prev = {"nv_inference_request_success": 100, "nv_inference_request_failure": 3}
    cur = {"nv_inference_request_success": 7, "nv_inference_request_failure": 5}
    assert stats_delta(prev, cur)["counts"]["ok"] == 7
    assert stats_delta(prev, cur)["counts"]["failed"] == 2


def test_cascade_failures_travel_in_the_window_counts() -> None:
    # Counted by the runtime (an upstream that answered no answer), they had stayed on
    # the device: nothing in the fleet's telemetry showed a cascade tier failing.
    prev = {"edgewise_cascade_failures": 5, "nv_inference_escalated": 9}
    cur = {"edgewise_cascade_failures": 8, "nv_inference_escalated": 12}
    counts = stats_delta(prev, cur)["counts"]
    assert (counts["cascade_failures"], counts["escalated"]) == (3, 3)


def test_resource_readers_are_injectable_and_broken_readers_cost_one_field() -> None:
    def broken() -> float:
        raise OSError("no sensor")

    readers = ResourceReaders(
        cpu=lambda: 42.0,
        memory=lambda: {"memory_percent": 10.0, "rss_mb": 50.0},
        thermal=lambda: 90.0,
        throttled=broken,
    )
    reading = readers.read()
    assert reading["cpu_percent"] == 42.0 and reading["memory_percent"] == 10.0
    assert reading["throttled"] is True  # 90 C is over the 85 C throttle mark
    readers.thermal = broken
    assert readers.read()["temperature_c"] is None


def test_throttle_flag_reads_cpufreq(tmp_path: Path) -> None:
    freq = tmp_path / "cpu0" / "cpufreq"
    freq.mkdir(parents=True)
    (freq / "cpuinfo_max_freq").write_text("2000000\n")
    (freq / "scaling_cur_freq").write_text("1000000\n")
    assert read_throttled(tmp_path) is True
    (freq / "scaling_cur_freq").write_text("1900000\n")
    assert read_throttled(tmp_path) is False
    assert read_throttled(tmp_path / "none") is None


def test_window_without_stats_or_inputs_still_reports_resources() -> None:
    clock = FakeClock()
    agg = WindowAggregator("idle", clock=clock)
    assert not agg.due()
    clock.advance(10)
    assert agg.due()
    ((cls, kind, data, ts),) = agg.close(resources={"cpu_percent": 1.0})
    assert (cls, kind, ts) == ("metric", "window", clock.now)
    assert data["resources"] == {"cpu_percent": 1.0}
    assert np.isclose(data["end"] - data["start"], 10.0)


def test_recorded_requests_are_counted_like_observed_batches(digits: Digits) -> None:
    ref = reference_from_manifest(digits.manifest["reference"])
    x = digits.split.x_test[:300]
    probs = digits.predict(x)
    labels = [str(i) for i in probs.argmax(1)]
    windows = []
    for mode in ("observe", "record"):
        clock = FakeClock()
        agg = WindowAggregator(
            "d",
            model="m",
            version="1",
            reference=ref,
            labels=digits.manifest["labels"],
            clock=clock,
        )
        if mode == "observe":
            agg.observe(x, probs.max(1), labels)
        else:
            for i in range(len(x)):
                agg.record(x[i : i + 1], [float(probs[i].max())], [labels[i]])
        clock.advance(10)
        windows.append(next(d for _, k, d, _ in agg.close() if k == "window"))
    assert windows[0]["features"] == windows[1]["features"]
    assert windows[0]["drift"]["score"] == windows[1]["drift"]["score"]


def test_busy_pipelines_are_sampled_at_a_stride_near_the_target() -> None:
    clock = FakeClock()
    agg = WindowAggregator("busy", clock=clock)
    agg.target_rows = 100
    row = np.zeros((1, 4))
    for _ in range(1000):
        agg.record(row, [0.5], [0])
    clock.advance(10)
    first = next(d for _, k, d, _ in agg.close() if k == "window")
    for _ in range(1000):
        agg.record(row, [0.5], [0])
    clock.advance(10)
    second = next(d for _, k, d, _ in agg.close() if k == "window")
    assert sum(first["confidence"]["counts"]) == 1000  # no history yet: everything
    assert sum(second["confidence"]["counts"]) == 100  # stride 10 from the first window
