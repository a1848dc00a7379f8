"""Windowed drift detection against a `DriftReference`.

On the device a `FeatureDriftMonitor` counts each batch into the reference bins (no raw
data kept) and, when the caller closes a window, turns the counts into a `DriftReport`.
The control plane calls the same pure `drift_report` on counts merged from many devices.

The score. Every distance measured on a finite window carries sampling noise that grows
as the window shrinks: for a multinomial window of n samples over k populated bins,
PSI is about chi^2(k - 1) / n and JS about chi^2(k - 1) / (8 n ln 2). Each component is
therefore taken *in excess of* its expected noise (reference noise included), divided
by its alarm level, and the score is the largest of these ratios:

- input drift: mean over features of excess PSI, alarm `FEATURE_PSI_ALARM` (0.1, the
  usual "moderate shift" boundary of PSI);
- class prior: excess JS between predicted classes and the reference prior,
  alarm `PRIOR_JS_ALARM` (0.05);
- confidence: excess JS of the top-1 confidence histogram, alarm `CONFIDENCE_JS_ALARM`
  (0.1; looser, since a retrained model may legitimately shift it a little).

`DEFAULT_THRESHOLD = 1.0` then means "some component is past its alarm level". The
alarm levels were chosen from the digits experiment (tests/pure/test_pure_drift_digits.py:
logistic regression, reference = training split with out-of-fold confidences, 1,000
bootstrap windows of the test split per size, seeded):

    window  unshifted p99 / max   scale x1.15  scale x1.3  x0.7  +0.05  5 classes  50% ones
    100     0.75 / 0.89           >= 1.15      >= 2.2      >=18  >=64   >= 3.8     >= 2.5
    150     0.50 / 0.69           >= 1.09      >= 2.0      >=18  >=64   >= 3.9     >= 2.6
    200     0.39 / 0.48           >= 1.08      >= 2.0      >=18  >=64   >= 3.9     >= 2.7

(shifted columns: 1st percentile of 200 windows). Below about 100 samples the noise
correction no longer holds (at 50 samples two windows in three would score over 1), so
a window needs `DEFAULT_MIN_SAMPLES` samples before it may count as drifted; callers
merge smaller windows (`WindowCounts.merge`) until they have enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.drift._histogram import bin_indices
from edgewise.drift._reference import DriftReference
from edgewise.drift._stats import jensen_shannon, psi, psi_rows

__all__ = [
    "CONFIDENCE_JS_ALARM",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_THRESHOLD",
    "FEATURE_PSI_ALARM",
    "PRIOR_JS_ALARM",
    "DriftReport",
    "FeatureDriftMonitor",
    "WindowCounts",
    "drift_report",
]

FEATURE_PSI_ALARM = 0.1
PRIOR_JS_ALARM = 0.05
CONFIDENCE_JS_ALARM = 0.1
DEFAULT_THRESHOLD = 1.0
DEFAULT_MIN_SAMPLES = 100


@dataclass(frozen=True)
class WindowCounts:
    """Counts of one window on the reference bins: what a device may send upstream."""

    features: tuple[npt.NDArray[np.int64], ...]
    confidence: npt.NDArray[np.int64]
    classes: npt.NDArray[np.int64]

    @property
    def samples(self) -> int:
        """Number of samples counted."""
        return int(self.classes.sum())

    def merge(self, other: WindowCounts) -> WindowCounts:
        """Add two windows' counts (e.g. from two devices of one cohort)."""
        return WindowCounts(
            tuple(a + b for a, b in zip(self.features, other.features, strict=True)),
            self.confidence + other.confidence,
            self.classes + other.classes,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "features": [f.tolist() for f in self.features],
            "confidence": self.confidence.tolist(),
            "classes": self.classes.tolist(),
        }


@dataclass(frozen=True)
class DriftReport:
    """Drift figures of one window.

    Attributes:
        samples: Samples in the window.
        feature_psi: PSI per input feature.
        feature_psi_max: Largest per-feature PSI.
        feature_psi_mean: Mean per-feature PSI.
        confidence_psi: PSI of the top-1 confidence histogram.
        confidence_js: Jensen-Shannon divergence (bits) of the confidence histogram.
        prior_js: JS divergence of the predicted-class distribution from the prior.
        score: Largest noise-corrected component over its alarm level (module doc).
        threshold: The threshold the score was held against.
        min_samples: Samples needed before the window may count as drifted.
        components: The score's parts (features, prior, confidence), each over its alarm.
    """

    samples: int
    feature_psi: tuple[float, ...]
    feature_psi_max: float
    feature_psi_mean: float
    confidence_psi: float
    confidence_js: float
    prior_js: float
    score: float
    threshold: float = DEFAULT_THRESHOLD
    min_samples: int = DEFAULT_MIN_SAMPLES
    components: dict[str, float] = field(default_factory=dict)

    @property
    def sufficient(self) -> bool:
        """Whether the window holds enough samples for its score to mean anything."""
        return self.samples >= self.min_samples

    @property
    def drifted(self) -> bool:
        """True when the window is sufficient and its score exceeds the threshold."""
        return self.sufficient and self.score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "samples": self.samples,
            "feature_psi": list(self.feature_psi),
            "feature_psi_max": self.feature_psi_max,
            "feature_psi_mean": self.feature_psi_mean,
            "confidence_psi": self.confidence_psi,
            "confidence_js": self.confidence_js,
            "prior_js": self.prior_js,
            "score": self.score,
            "threshold": self.threshold,
            "min_samples": self.min_samples,
            "sufficient": self.sufficient,
            "drifted": self.drifted,
            "components": dict(self.components),
        }


def _populated(freqs: npt.NDArray[np.float64]) -> int:
    return max(1, int(np.count_nonzero(freqs > 0)))


def drift_report(
    reference: DriftReference,
    counts: WindowCounts,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> DriftReport:
    """Compute a window's drift figures from its counts (pure).

    Args:
        reference: The model's reference distributions.
        counts: The window's counts on the reference bins.
        threshold: Score above which the window counts as drifted.
        min_samples: Samples a window needs before it may count as drifted.

    Returns:
        The report; an empty window scores 0.

    Raises:
        ValueError: if the counts do not fit the reference's bins.
    """
    if len(counts.features) != reference.n_features:
        raise ValueError(
            f"{len(counts.features)} feature histograms, expected {reference.n_features}"
        )
    n = counts.samples
    feature_psi = psi_rows(reference.feature_freqs, counts.features)
    conf_psi = psi(reference.confidence_freqs, counts.confidence)
    conf_js = jensen_shannon(reference.confidence_freqs, counts.confidence)
    prior_js = jensen_shannon(reference.class_prior, counts.classes)
    if n == 0:
        return DriftReport(
            0, feature_psi, 0.0, 0.0, conf_psi, conf_js, prior_js, 0.0, threshold, min_samples
        )

    inv = 1.0 / n + 1.0 / reference.samples
    psi_noise = np.array([(_populated(f) - 1) * inv for f in reference.feature_freqs])
    feature_excess = float(np.mean(np.maximum(np.array(feature_psi) - psi_noise, 0.0)))
    js_scale = inv / (8.0 * math.log(2.0))
    prior_excess = max(0.0, prior_js - (_populated(reference.class_prior) - 1) * js_scale)
    conf_excess = max(0.0, conf_js - (_populated(reference.confidence_freqs) - 1) * js_scale)
    components = {
        "features": feature_excess / FEATURE_PSI_ALARM,
        "prior": prior_excess / PRIOR_JS_ALARM,
        "confidence": conf_excess / CONFIDENCE_JS_ALARM,
    }
    return DriftReport(
        samples=n,
        feature_psi=feature_psi,
        feature_psi_max=max(feature_psi, default=0.0),
        feature_psi_mean=float(np.mean(feature_psi)) if feature_psi else 0.0,
        confidence_psi=conf_psi,
        confidence_js=conf_js,
        prior_js=prior_js,
        score=max(components.values()),
        threshold=threshold,
        min_samples=min_samples,
        components=components,
    )


class FeatureDriftMonitor:
    """Counts batches into the reference bins and reports per window.

    Example::

        monitor = FeatureDriftMonitor(reference)
        monitor.observe(inputs, probabilities.max(1), probabilities.argmax(1))
        report = monitor.close_window()   # every 10 s, by the runtime's clock
    """

    def __init__(
        self,
        reference: DriftReference,
        threshold: float = DEFAULT_THRESHOLD,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ) -> None:
        """Start an empty window against `reference`."""
        self.reference = reference
        self.threshold = threshold
        self.min_samples = min_samples
        edges = reference.feature_edges
        # Most models bin every feature alike; then one searchsorted covers the batch.
        self._shared = all(e is edges[0] or np.array_equal(e, edges[0]) for e in edges)
        self._bins = [e.size - 1 for e in edges]
        self._reset()

    def _reset(self) -> None:
        self._features = [np.zeros(k, dtype=np.int64) for k in self._bins]
        self._confidence = np.zeros(self.reference.confidence_freqs.size, dtype=np.int64)
        self._classes = np.zeros(self.reference.n_classes, dtype=np.int64)

    def observe(
        self,
        inputs: npt.ArrayLike,
        confidence: npt.ArrayLike,
        predicted: npt.ArrayLike,
    ) -> None:
        """Count one batch.

        Args:
            inputs: [N, F] model inputs (higher ranks are flattened per sample).
            confidence: [N] top-1 confidence.
            predicted: [N] predicted class index.

        Raises:
            ValueError: on shapes that do not fit the reference or class ids out of range.
        """
        x = np.asarray(inputs, dtype=np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        conf = np.ravel(np.asarray(confidence, dtype=np.float64))
        pred = np.ravel(np.asarray(predicted)).astype(np.int64)
        n, n_feat = x.shape
        if n_feat != self.reference.n_features:
            raise ValueError(f"batch has {n_feat} features, reference {self.reference.n_features}")
        if conf.size != n or pred.size != n:
            raise ValueError("inputs, confidence and predicted differ in length")
        if n and (pred.min() < 0 or pred.max() >= self.reference.n_classes):
            raise ValueError(f"predicted class outside 0..{self.reference.n_classes - 1}")
        if n == 0:
            return
        if self._shared:
            k = self._bins[0]
            idx = bin_indices(self.reference.feature_edges[0], x)
            valid = idx >= 0
            flat = (idx + np.arange(n_feat) * k)[valid]
            counts = np.bincount(flat, minlength=n_feat * k).reshape(n_feat, k)
            for f in range(n_feat):
                self._features[f] += counts[f]
        else:
            for f, edges in enumerate(self.reference.feature_edges):
                idx = bin_indices(edges, x[:, f])
                self._features[f] += np.bincount(idx[idx >= 0], minlength=self._bins[f])
        c_idx = bin_indices(self.reference.confidence_edges, conf)
        self._confidence += np.bincount(c_idx[c_idx >= 0], minlength=self._confidence.size)
        self._classes += np.bincount(pred, minlength=self._classes.size)

    def counts(self) -> WindowCounts:
        """A copy of the open window's counts."""
        return WindowCounts(
            tuple(f.copy() for f in self._features), self._confidence.copy(), self._classes.copy()
        )

    def close_window(self) -> DriftReport:
        """Report on the open window and start a new one."""
        report = drift_report(self.reference, self.counts(), self.threshold, self.min_samples)
        self._reset()
        return report
