"""Issue 7 drift acceptance on the device side, through `WindowAggregator`.

Reference: the `reference` the digits-mlp 1.0.0 bundle carries (built by the examples),
converted with `reference_from_manifest`; the model: the bundle's own ONNX under
onnxruntime. Windows of 100-200 inferences (a 10 s window on a modest device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgewise.agent.telemetry import WindowAggregator, reference_from_manifest
from edgewise.drift import DEFAULT_THRESHOLD

from .conftest import Digits, FakeClock

Array = npt.NDArray[Any]


def _aggregator(digits: Digits, clock: FakeClock) -> WindowAggregator:
    return WindowAggregator(
        "digits",
        model="digits-mlp",
        version="1.0.0",
        reference=reference_from_manifest(digits.manifest["reference"]),
        labels=digits.manifest["labels"],
        clock=clock,
    )


def _window(
    digits: Digits, agg: WindowAggregator, clock: FakeClock, x: Array
) -> tuple[dict[str, Any], list[str]]:
    probs = digits.predict(x)
    agg.observe(x, probs.max(1), probs.argmax(1))
    clock.advance(10.0)
    records = agg.close()
    window = next(d for cls, kind, d, _ in records if kind == "window")
    return window, [kind for cls, kind, _, _ in records if cls == "event"]


def _size(rng: np.random.Generator) -> int:
    return int(rng.integers(100, 201))


def test_unshifted_windows_stay_under_threshold_on_99_percent(digits: Digits) -> None:
    clock = FakeClock()
    agg = _aggregator(digits, clock)
    x_test = digits.split.x_test
    rng = np.random.default_rng(11)
    scores = []
    for _ in range(300):
        window, _ = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), _size(rng))])
        assert window["drift"]["sufficient"]
        scores.append(window["drift"]["score"])
    assert np.mean(np.array(scores) <= DEFAULT_THRESHOLD) >= 0.99


SHIFTS: dict[str, Callable[[Array], Array]] = {
    "scaled x1.3": lambda x: np.clip(x * 1.3, 0, 1),
    "scaled x0.7": lambda x: x * 0.7,
    "brightened +0.2": lambda x: np.clip(x + 0.2, 0, 1),
}


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_pixel_shift_fires_drift_alarm_within_two_windows(digits: Digits, name: str) -> None:
    x_test = digits.split.x_test
    for seed in range(10):
        rng = np.random.default_rng(seed)
        clock = FakeClock()
        agg = _aggregator(digits, clock)
        scores, events = [], []
        for _ in range(2):
            x = SHIFTS[name](x_test[rng.integers(0, len(x_test), _size(rng))])
            window, ev = _window(digits, agg, clock, x)
            scores.append(window["drift"]["score"])
            events += ev
        assert max(scores) > DEFAULT_THRESHOLD, (name, seed, scores)
        assert events == ["drift.alarm"]


@pytest.mark.parametrize("prior", ["only classes 0-4", "half ones"])
def test_label_prior_change_fires_within_two_windows(digits: Digits, prior: str) -> None:
    x_test, y_test = digits.split.x_test, digits.split.y_test
    for seed in range(10):
        rng = np.random.default_rng(seed)
        clock = FakeClock()
        agg = _aggregator(digits, clock)
        scores = []
        for _ in range(2):
            n = _size(rng)
            if prior == "only classes 0-4":
                idx = rng.choice(np.flatnonzero(y_test < 5), n)
            else:
                ones = rng.choice(np.flatnonzero(y_test == 1), n // 2)
                idx = np.concatenate([ones, rng.integers(0, len(x_test), n - n // 2)])
            window, _ = _window(digits, agg, clock, x_test[idx])
            scores.append(window["drift"]["score"])
        assert max(scores) > DEFAULT_THRESHOLD, (prior, seed, scores)


def test_alarm_clears_when_data_returns_to_normal(digits: Digits) -> None:
    clock = FakeClock()
    agg = _aggregator(digits, clock)
    x_test = digits.split.x_test
    rng = np.random.default_rng(3)
    _, first = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), 200)] * 0.7)
    _, second = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), 200)])
    assert first == ["drift.alarm"]
    assert second == ["drift.cleared"]


def test_small_windows_are_carried_until_enough_samples(digits: Digits) -> None:
    clock = FakeClock()
    agg = _aggregator(digits, clock)
    x_test = digits.split.x_test
    sufficient = []
    for i in range(4):
        window, _ = _window(digits, agg, clock, x_test[i * 40 : (i + 1) * 40])
        assert sum(window["features"]["classes"]) == 40  # the window's own counts
        sufficient.append((window["drift"]["samples"], window["drift"]["sufficient"]))
    assert sufficient == [(40, False), (80, False), (120, True), (40, False)]


def test_without_reference_bins_windowed_ks_flags_a_shift(digits: Digits) -> None:
    clock = FakeClock()
    agg = WindowAggregator("digits", model="digits-mlp", version="1.0.0", clock=clock)
    x_test = digits.split.x_test
    rng = np.random.default_rng(5)
    base, _ = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), 200)])
    same, _ = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), 200)])
    shifted, events = _window(digits, agg, clock, x_test[rng.integers(0, len(x_test), 200)] * 0.5)
    assert "ks" not in base  # the first full window is the baseline
    assert same["ks"]["drifted"] is False
    assert shifted["ks"]["drifted"] is True and events == ["drift.alarm"]


def test_reference_from_manifest_refuses_malformed_reference() -> None:
    with pytest.raises(ValueError):
        reference_from_manifest(
            {
                "features": [{"bin_edges": [0, 1], "frequencies": [1, 2]}],
                "confidence": {"bin_edges": [0, 1], "frequencies": [1]},
                "class_prior": [1.0],
            }
        )
    assert reference_from_manifest({"features": []}) is None
