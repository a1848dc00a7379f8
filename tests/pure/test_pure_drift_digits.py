"""Issue 7 acceptance for drift: shifts are caught within 2 windows, unshifted data is not.

Reference: the digits training split, with out-of-fold confidences and predicted classes
(what a bundle's `reference` should hold). Windows: 100-200 bootstrap samples of the
test split, fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgewise.drift import DEFAULT_THRESHOLD, DriftReference, FeatureDriftMonitor
from edgewise.examples._digits import DigitsSplit, load_split

Array = npt.NDArray[np.float32]


class Setup:
    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict

        self.split: DigitsSplit = load_split()
        x, y = self.split.x_train, self.split.y_train
        self.model: Any = LogisticRegression(max_iter=200, C=0.05).fit(x, y)
        oof = cross_val_predict(
            LogisticRegression(max_iter=200, C=0.05), x, y, cv=5, method="predict_proba"
        )
        self.reference = DriftReference.from_samples(x, oof.max(1), oof.argmax(1), n_classes=10)

    def window(self, monitor: FeatureDriftMonitor, x: Array) -> float:
        probs = self.model.predict_proba(x)
        monitor.observe(x, probs.max(1), probs.argmax(1))
        report = monitor.close_window()
        assert report.sufficient
        return report.score


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def _sizes(rng: np.random.Generator) -> int:
    return int(rng.integers(100, 201))


def test_unshifted_windows_stay_under_threshold_on_99_percent(setup: Setup) -> None:
    rng = np.random.default_rng(7)
    monitor = FeatureDriftMonitor(setup.reference)
    x_test = setup.split.x_test
    scores = [
        setup.window(monitor, x_test[rng.integers(0, len(x_test), _sizes(rng))])
        for _ in range(1000)
    ]
    assert np.mean(np.array(scores) <= DEFAULT_THRESHOLD) >= 0.99


SHIFTS: dict[str, Callable[[Array], Array]] = {
    "scaled x1.3": lambda x: np.clip(x * 1.3, 0, 1),
    "scaled x0.7": lambda x: x * 0.7,
    "brightened +0.05": lambda x: np.clip(x + 0.05, 0, 1),
    "brightened +0.2": lambda x: np.clip(x + 0.2, 0, 1),
}


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_pixel_shift_crosses_threshold_within_two_windows(setup: Setup, name: str) -> None:
    shift = SHIFTS[name]
    x_test = setup.split.x_test
    for seed in range(20):
        rng = np.random.default_rng(seed)
        monitor = FeatureDriftMonitor(setup.reference)
        scores = [
            setup.window(monitor, shift(x_test[rng.integers(0, len(x_test), _sizes(rng))]))
            for _ in range(2)
        ]
        assert max(scores) > DEFAULT_THRESHOLD, (name, seed, scores)


@pytest.mark.parametrize("prior", ["only classes 0-4", "half ones"])
def test_label_prior_change_crosses_threshold_within_two_windows(setup: Setup, prior: str) -> None:
    x_test, y_test = setup.split.x_test, setup.split.y_test
    for seed in range(20):
        rng = np.random.default_rng(seed)
        monitor = FeatureDriftMonitor(setup.reference)
        scores = []
        for _ in range(2):
            n = _sizes(rng)
            if prior == "only classes 0-4":
                idx = rng.choice(np.flatnonzero(y_test < 5), n)
            else:
                ones = rng.choice(np.flatnonzero(y_test == 1), n // 2)
                idx = np.concatenate([ones, rng.integers(0, len(x_test), n - n // 2)])
            scores.append(setup.window(monitor, x_test[idx]))
        assert max(scores) > DEFAULT_THRESHOLD, (prior, seed, scores)


def test_training_data_against_itself_scores_near_zero(setup: Setup) -> None:
    monitor = FeatureDriftMonitor(setup.reference)
    score = setup.window(monitor, setup.split.x_train)
    assert score < 0.5
