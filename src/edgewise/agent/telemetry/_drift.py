"""On-device drift: counts on the bundle's reference bins, scores per window, KS without bins.

`DriftTracker` wraps `edgewise.drift.FeatureDriftMonitor` for the telemetry window: a
window too small to judge (fewer than `min_samples` inferences, common on a quiet
device with 10 s windows) is not thrown away but carried into the next one until the
merged counts are enough, so a slow device still gets drift scores, only less often.

Where a bundle gives no reference bins, `KsTracker` keeps a bounded reservoir of each
feature's values and runs a two-sample Kolmogorov-Smirnov test of each window against
the first full window (the baseline), with a Bonferroni correction over features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.drift import (
    DEFAULT_MIN_SAMPLES,
    DEFAULT_THRESHOLD,
    DriftReference,
    DriftReport,
    FeatureDriftMonitor,
    WindowCounts,
    drift_report,
    ks_two_sample,
)

__all__ = ["DriftTracker", "DriftWindow", "KsTracker", "reference_from_manifest"]

Array = npt.NDArray[Any]
# Carrying more windows than this would judge data that is minutes old.
_MAX_CARRY_WINDOWS = 30


def reference_from_manifest(
    reference: Mapping[str, Any], samples: int | None = None
) -> DriftReference | None:
    """The drift baseline of a bundle manifest's `reference` (None when it has no bins).

    The one reading both programs share: `DriftReference.from_manifest`.

    Raises:
        ValueError: the reference is malformed.
    """
    return DriftReference.from_manifest(reference, samples)


@dataclass(frozen=True)
class DriftWindow:
    """What one closed window says about drift."""

    counts: WindowCounts  # this window's own counts (for the control plane to merge)
    report: DriftReport  # over the carried counts: this window plus any too-small ones


class DriftTracker:
    """Per-pipeline drift counting with carry-over of too-small windows."""

    def __init__(
        self,
        reference: DriftReference,
        threshold: float = DEFAULT_THRESHOLD,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> None:
        """Count against `reference`; a window is judged once it holds `min_samples`."""
        self.reference = reference
        self.threshold = threshold
        self.min_samples = min_samples
        self._monitor = FeatureDriftMonitor(reference, threshold, min_samples)
        self._carry: WindowCounts | None = None
        self._carried = 0

    def observe(self, inputs: Array, confidence: Array, predicted: Array) -> None:
        """Count one batch (inputs [N, F], top-1 confidence [N], predicted class [N])."""
        self._monitor.observe(inputs, confidence, predicted)

    def close(self) -> DriftWindow:
        """Close the window: its counts and the report over what is carried."""
        counts = self._monitor.counts()
        self._monitor.close_window()
        merged = counts if self._carry is None else self._carry.merge(counts)
        report = drift_report(self.reference, merged, self.threshold, self.min_samples)
        self._carried += 1
        if report.sufficient or self._carried >= _MAX_CARRY_WINDOWS:
            self._carry, self._carried = None, 0
        else:
            self._carry = merged
        return DriftWindow(counts, report)


class KsTracker:
    """Windowed two-sample KS per feature against a baseline window (no bins needed)."""

    def __init__(self, reservoir: int = 200, alpha: float = 0.01, seed: int = 0) -> None:
        """Keep up to `reservoir` rows per window; flag drift at family-wise `alpha`."""
        self.reservoir = reservoir
        self.alpha = alpha
        self._rng = np.random.default_rng(seed)
        self._rows: list[Array] = []
        self._seen = 0
        self._baseline: Array | None = None

    def observe(self, inputs: Array) -> None:
        """Offer a batch's rows to the window's reservoir (Algorithm R)."""
        x = np.asarray(inputs, dtype=np.float64)
        x = x.reshape(x.shape[0], -1)
        for row in x:
            self._seen += 1
            if len(self._rows) < self.reservoir:
                self._rows.append(row)
            else:
                j = int(self._rng.integers(0, self._seen))
                if j < self.reservoir:
                    self._rows[j] = row

    def close(self, min_rows: int = 30) -> dict[str, Any] | None:
        """Test the window against the baseline; the first full window becomes it.

        Returns:
            {"d_max", "p_min", "feature", "drifted", "rows"}, or None while there is no
            baseline yet or the window is too small.
        """
        rows, self._rows, self._seen = self._rows, [], 0
        if len(rows) < min_rows:
            return None
        window = np.stack(rows)
        if self._baseline is None:
            self._baseline = window
            return None
        if window.shape[1] != self._baseline.shape[1]:
            self._baseline = window  # the input shape changed: start over
            return None
        best_d, best_p, best_f = 0.0, 1.0, -1
        for f in range(window.shape[1]):
            d, p = ks_two_sample(self._baseline[:, f], window[:, f])
            if p < best_p or (p == best_p and d > best_d):
                best_d, best_p, best_f = d, p, f
        n_features = window.shape[1]
        return {
            "d_max": round(best_d, 6),
            "p_min": best_p,
            "feature": best_f,
            "drifted": best_p * n_features < self.alpha,
            "rows": len(rows),
        }
