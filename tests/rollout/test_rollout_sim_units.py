"""The fleet simulator's pure parts: label specs, fleet plans, behaviours, fault settings."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgewise.control.telemetry import WindowFigures, cohort_figures, histogram_quantile
from edgewise.sim import (
    REGRESSED,
    BehaviourBook,
    Faults,
    ModelBehaviour,
    assign_labels,
    parse_labels,
    plan_fleet,
    synth_window,
)


def test_label_spec_weights_and_equal_shares() -> None:
    spec = parse_labels("hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2")
    assert spec["hw"] == [("cpu-small", 0.5), ("cpu-large", 0.5)]
    assert [v for v, _ in spec["site"]] == ["lab", "store-1", "store-2"]
    assert all(w == pytest.approx(1 / 3) for _, w in spec["site"])


def test_label_spec_unweighted_values_share_the_rest() -> None:
    spec = parse_labels("hw=gpu:0.2,cpu")
    assert spec["hw"] == [("gpu", pytest.approx(0.2)), ("cpu", pytest.approx(0.8))]


def test_empty_label_spec_gives_no_labels() -> None:
    assert parse_labels("") == {}
    assert assign_labels(parse_labels(""), 3, 0) == [{}, {}, {}]


@pytest.mark.parametrize(
    "bad",
    ["hw", "=a", "hw=", "hw=a,,b", "hw=a:x", "hw=a:-1", "hw=a:0.7,b:0.6", "hw=a;hw=b",
     "hw=a,a", "hw=a:0"],
)  # fmt: skip
def test_malformed_label_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_labels(bad)


def test_label_assignment_is_exact_and_seeded() -> None:
    spec = parse_labels("hw=small:0.5,large:0.5;site=a,b,c")
    labels = assign_labels(spec, 10, seed=3)
    assert Counter(lab["hw"] for lab in labels) == {"small": 5, "large": 5}
    assert sorted(Counter(lab["site"] for lab in labels).values()) == [3, 3, 4]
    assert assign_labels(spec, 10, seed=3) == labels
    assert assign_labels(spec, 10, seed=4) != labels


def test_same_seed_gives_the_same_fleet() -> None:
    spec = parse_labels("hw=small,large;site=a,b")
    faults = Faults(offline_fraction=0.2, clock_skew_s=30.0)
    first = plan_fleet(50, 9, spec, faults)
    assert plan_fleet(50, 9, spec, faults) == first
    assert plan_fleet(50, 10, spec, faults) != first
    assert sum(p.offline for p in first) == 10
    assert all(abs(p.clock_skew_s) <= 30.0 for p in first)


def test_windows_are_deterministic_for_a_device_stream() -> None:
    def window(seed: int) -> dict[str, object]:
        return synth_window(ModelBehaviour(), random.Random(seed), pipeline="p", model="m",
                            version="1", start=0.0, end=10.0, inferences=200)  # fmt: skip

    assert window(1) == window(1)
    assert window(1) != window(2)


def _aggregate(behaviour: ModelBehaviour, windows: int = 30) -> tuple[float, float, float]:
    rng = random.Random(0)
    failed = total = 0
    conf_low = conf_total = 0
    p95s = []
    for _ in range(windows):
        w = synth_window(behaviour, rng, pipeline="p", model="m", version="v",
                         start=0.0, end=10.0, inferences=200)  # fmt: skip
        failed += w["counts"]["failed"]
        total += w["counts"]["ok"] + w["counts"]["failed"]
        counts = w["confidence"]["counts"]
        conf_low += sum(counts[:5])  # bins below 0.8
        conf_total += sum(counts)
        lat = w["latency"]
        p95s.append(histogram_quantile(lat["bounds"], lat["stages"]["total"]["counts"], 0.95))
    return failed / total, conf_low / conf_total, sorted(p95s)[len(p95s) // 2]


def test_a_regressed_model_answers_worse() -> None:
    good_err, good_low, good_p95 = _aggregate(ModelBehaviour())
    bad_err, bad_low, bad_p95 = _aggregate(REGRESSED)
    assert bad_err > good_err + 0.02
    assert bad_low > good_low + 0.3
    assert bad_p95 > good_p95


def test_window_counts_add_up() -> None:
    w = synth_window(REGRESSED, random.Random(5), pipeline="p", model="m", version="v",
                     start=0.0, end=10.0, inferences=300)  # fmt: skip
    assert w["counts"]["ok"] + w["counts"]["failed"] == 300
    lat = w["latency"]
    assert sum(lat["stages"]["total"]["counts"]) == 300
    assert len(lat["stages"]["total"]["counts"]) == len(lat["bounds"]) + 1
    assert sum(w["confidence"]["counts"]) == w["counts"]["ok"]
    assert len(w["confidence"]["counts"]) == len(w["confidence"]["edges"]) - 1


def test_regressed_by_name_or_by_provenance_accuracy() -> None:
    book = BehaviourBook()
    assert book.behaviour("digits-mlp@2.0.0") is book.regressed_behaviour
    assert book.behaviour("digits-mlp@1.1.0", accuracy=0.97) is book.default
    assert book.behaviour("other@1.0.0", accuracy=0.5) is book.regressed_behaviour
    custom = book.with_regressed("digits-mlp@1.1.0")
    assert custom.is_regressed("digits-mlp@1.1.0")
    assert not custom.is_regressed("digits-mlp@2.0.0", accuracy=None)
    assert not BehaviourBook(accuracy_floor=None).is_regressed("x@1", accuracy=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [{"flaky": 1.0}, {"flaky": -0.1}, {"offline_fraction": 1.5}, {"crash_during_install": 2},
     {"clock_skew_s": -1}, {"restart_s": -1}, {"offline_for_s": -5}],
)  # fmt: skip
def test_fault_settings_out_of_range_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Faults(**kwargs)  # type: ignore[arg-type]


def test_behaviour_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        ModelBehaviour(error_rate=1.5)
    with pytest.raises(ValueError):
        ModelBehaviour(latency_ms=0)


def test_simulated_windows_read_as_control_plane_window_figures() -> None:
    rng = random.Random(2)
    windows = [
        WindowFigures.from_record(f"dev-{i}", synth_window(
            REGRESSED, rng, pipeline="digits", model="digits-mlp", version="2.0.0",
            start=0.0, end=10.0, inferences=100, deployment="dep-1"))
        for i in range(5)
    ]  # fmt: skip
    cohort = cohort_figures(windows)
    assert cohort.devices == 5 and cohort.inferences == 500
    assert cohort.errors == sum(w.counts["failed"] for w in windows)
    assert cohort.p95_latency_ms is not None and cohort.p95_latency_ms > 0
    assert cohort.confidence_counts is not None and sum(cohort.confidence_counts) > 0
    assert cohort.input_drift is not None
