"""Drift statistics: a leaf package (imports nothing of edgewise) for device and server.

Distances (`psi`, `jensen_shannon`, `ks_two_sample`), fixed-bin `Histogram`s, the
`DriftReference` a bundle carries, and the windowed `FeatureDriftMonitor` that turns
batches into `DriftReport`s. See `_monitor` for how the score and its threshold were
chosen.
"""

from edgewise.drift._histogram import Histogram, bin_indices, check_edges
from edgewise.drift._monitor import (
    CONFIDENCE_JS_ALARM,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_THRESHOLD,
    FEATURE_PSI_ALARM,
    PRIOR_JS_ALARM,
    DriftReport,
    FeatureDriftMonitor,
    WindowCounts,
    drift_report,
)
from edgewise.drift._reference import (
    DEFAULT_CONFIDENCE_EDGES,
    DEFAULT_REFERENCE_SAMPLES,
    DriftReference,
    saturating_edges,
)
from edgewise.drift._stats import jensen_shannon, ks_two_sample, normalise, psi, psi_rows

__all__ = [
    "CONFIDENCE_JS_ALARM",
    "DEFAULT_CONFIDENCE_EDGES",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_REFERENCE_SAMPLES",
    "DEFAULT_THRESHOLD",
    "FEATURE_PSI_ALARM",
    "PRIOR_JS_ALARM",
    "DriftReference",
    "DriftReport",
    "FeatureDriftMonitor",
    "Histogram",
    "WindowCounts",
    "bin_indices",
    "check_edges",
    "drift_report",
    "jensen_shannon",
    "ks_two_sample",
    "normalise",
    "psi",
    "psi_rows",
    "saturating_edges",
]
