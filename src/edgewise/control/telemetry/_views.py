"""Fleet views and rollout cohort figures from window figures (pure).

`fleet_view` groups windows by model version, deployment or a device label and gives
each group its success rate, p50/p95/p99 latency (from merged histograms, never an
average of percentiles), confidence shift and drift score, telemetry freshness and the
devices reporting. `cohort_figures` gives the rollout gates exactly what they consume,
`edgewise.control.rollout.CohortTelemetry`.

With a `DriftReference` for a model, drift and confidence shift are recomputed on the
merged counts of all windows (more samples, less noise than any one device); without
one, the devices' own scores are averaged, weighted by their samples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.control.rollout import CohortTelemetry
from edgewise.control.telemetry._figures import (
    MAX_COUNT,
    WindowFigures,
    histogram_quantile,
    merge_counts,
    merge_latency,
    requests_and_errors,
)
from edgewise.drift import DEFAULT_CONFIDENCE_EDGES, DriftReference, WindowCounts, drift_report

__all__ = [
    "MAX_DEVICE_STREAMS",
    "VOLUME_CAP",
    "FleetRow",
    "bounded_streams",
    "check_grouping",
    "cohort_figures",
    "fleet_view",
    "group_key",
    "merged_drift",
    "rebin",
    "volume_capped",
]


# Streams (pipeline, model version, deployment) of one device that views and alerts read
# within one span. A device runs a handful of pipelines, two model versions each while
# a rollout moves them; one that names thousands (each window a new pipeline or model)
# had opened an alert and sent a webhook per name, 5,000 of them holding the alert
# round for over a minute while every other device's alerts waited, and put a /metrics
# series per name.
MAX_DEVICE_STREAMS = 128


def bounded_streams(
    windows: Sequence[WindowFigures], limit: int = MAX_DEVICE_STREAMS
) -> tuple[list[WindowFigures], dict[str, int]]:
    """The windows of at most `limit` streams per device (pure).

    A device over the limit keeps its streams with the most windows (ties by name).

    Returns:
        (the windows kept, in their order; device -> streams left out, for devices over).
    """
    per_device: dict[str, dict[tuple[str, str, str], int]] = {}
    for w in windows:
        streams = per_device.setdefault(w.device_id, {})
        key = (w.pipeline, w.model_key, w.deployment)
        streams[key] = streams.get(key, 0) + 1
    over = {d: s for d, s in per_device.items() if len(s) > limit}
    if not over:
        return list(windows), {}
    keep = {d: set(sorted(s, key=lambda k: (-s[k], k))[:limit]) for d, s in over.items()}
    kept = [
        w
        for w in windows
        if w.device_id not in keep or (w.pipeline, w.model_key, w.deployment) in keep[w.device_id]
    ]
    return kept, {d: len(s) - limit for d, s in over.items()}


def check_grouping(by: str) -> str:
    """`by`, if windows can be grouped by it (the rule alert rules are checked by too).

    Raises:
        ValueError: an unknown grouping.
    """
    if by in ("model", "deployment", "pipeline") or (by.startswith("label:") and len(by) > 6):
        return by
    raise ValueError(f"cannot group by {by!r}: use model, deployment, pipeline or label:<key>")


def group_key(window: WindowFigures, by: str) -> str:
    """The group a window falls in: `model`, `deployment`, `pipeline` or `label:<key>`.

    Raises:
        ValueError: an unknown grouping.
    """
    if by == "model":
        return window.model_key
    if by == "deployment":
        return window.deployment or "-"
    if by == "pipeline":
        return window.pipeline
    key = check_grouping(by)[6:]  # only label:<key> is left
    return f"{key}={window.labels.get(key, '-')}"


def _count_array(values: Any, shape: tuple[int, ...]) -> npt.NDArray[Any] | None:
    """`values` as an array of `shape` whose every element is a count, or None.

    Checked a whole array at a time (a window holds a count per feature and bin): numpy
    picks the dtype, and only whole numbers in [0, MAX_COUNT] pass (true reads as 1, as
    numpy reads [true, 2] anyway). Strings ("1" had been read as 1), None, nested or
    ragged lists and ints past 64 bits (an OverflowError, a 500 on every view) give a
    dtype or shape that does not.
    """
    if not isinstance(values, list):
        return None
    try:
        arr = np.asarray(values)
    except (ValueError, OverflowError):  # ragged
        return None
    if arr.shape != shape:
        return None
    kind = arr.dtype.kind
    if kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.floor(arr)).all()):
            return None
    elif kind not in "iub":
        return None
    if kind != "b" and (arr.min() < 0 or arr.max() > MAX_COUNT):
        return None
    return arr


def _merged_counts(windows: Iterable[WindowFigures], ref: DriftReference) -> WindowCounts | None:
    """The windows' counts on the reference bins, added up (None when none fit).

    A window whose sketch is not counts on exactly the reference's bins is left out
    whole. Sums are floats, saturated into int64 at the end: counts of up to
    `MAX_COUNT` each, from as many windows as a device cares to send, could wrap an
    int64 sum negative, which the distances refuse (a ValueError: every fleet view of
    the model a 400 or 500).
    """
    bins = [e.size - 1 for e in ref.feature_edges]
    square = len(set(bins)) == 1  # every feature on the same bins: one 2-D array
    feats = np.zeros((len(bins), bins[0])) if square else [np.zeros(k) for k in bins]
    confidence = np.zeros(ref.confidence_freqs.size)
    classes = np.zeros(ref.n_classes)
    seen = False
    for w in windows:
        sketch = w.features
        if not sketch:
            continue
        conf = _count_array(sketch.get("confidence"), confidence.shape)
        cls = _count_array(sketch.get("classes"), classes.shape)
        rows = sketch.get("features")
        if conf is None or cls is None or not isinstance(rows, list) or len(rows) != len(bins):
            continue
        if isinstance(feats, np.ndarray):
            f = _count_array(rows, feats.shape)
            if f is None:
                continue
            feats += f
        else:
            each = [_count_array(r, (k,)) for r, k in zip(rows, bins, strict=True)]
            fit = [f for f in each if f is not None]
            if len(fit) != len(bins):
                continue
            for total, f in zip(feats, fit, strict=True):
                total += f
        confidence += conf
        classes += cls
        seen = True
    if not seen:
        return None
    return WindowCounts(
        tuple(_saturated(f) for f in feats), _saturated(confidence), _saturated(classes)
    )


def _saturated(total: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    return np.minimum(total, float(2**62)).astype(np.int64)


def merged_drift(
    windows: Iterable[WindowFigures], references: Mapping[str, DriftReference] | None = None
) -> tuple[float | None, float | None]:
    """(drift score, confidence JS shift) over windows.

    Per model with a reference: `drift_report` on the merged counts; otherwise the
    sample-weighted mean of the devices' scores (no confidence shift then). Across
    models, the worst model's figures.
    """
    by_model: dict[str, list[WindowFigures]] = {}
    for w in windows:
        by_model.setdefault(w.model_key, []).append(w)
    score: float | None = None
    shift: float | None = None
    for key, ws in by_model.items():
        ref = (references or {}).get(key)
        s: float | None = None
        c: float | None = None
        if ref is not None:
            merged = _merged_counts(ws, ref)
            if merged is not None and merged.samples:
                rep = drift_report(ref, merged)
                if rep.sufficient:
                    s, c = rep.score, rep.confidence_js
        if s is None:
            scored = [(w.drift_score, w.drift_samples) for w in ws if w.drift_score is not None]
            weight = sum(n for _, n in scored)
            if weight:
                # Each score times its share, not the sum of score x samples over the
                # total: a finite mean of finite scores (1e308 x 2 had been infinite,
                # which no JSON answer can hold).
                s = sum(v * (n / weight) for v, n in scored if v is not None)
        if s is not None:
            score = s if score is None else max(score, s)
        if c is not None:
            shift = c if shift is None else max(shift, c)
    return score, shift


@dataclass(frozen=True)
class FleetRow:
    """One group's health figures."""

    group: str
    devices_reporting: int
    windows: int
    requests: int
    errors: int
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    confidence_shift: float | None
    drift_score: float | None
    freshness_s: float | None  # age of the newest window
    stalest_s: float | None  # age of the least recent device's newest window
    models: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (figures rounded for reading; a non-finite figure is None)."""
        out = asdict(self)
        out["models"] = list(self.models)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 6) if math.isfinite(v) else None
        return out


def fleet_view(
    windows: Sequence[WindowFigures],
    now: float,
    by: str = "model",
    references: Mapping[str, DriftReference] | None = None,
) -> list[FleetRow]:
    """Health per group over the given windows, sorted by group.

    Raises:
        ValueError: an unknown grouping.
    """
    groups: dict[str, list[WindowFigures]] = {}
    for w in windows:
        groups.setdefault(group_key(w, by), []).append(w)
    rows = []
    for key in sorted(groups):
        ws = groups[key]
        counts = merge_counts(ws)
        requests, errors = requests_and_errors(counts)
        bounds, lat = merge_latency(ws)
        last: dict[str, float] = {}
        for w in ws:
            last[w.device_id] = max(last.get(w.device_id, w.end), w.end)
        score, shift = merged_drift(ws, references)
        rows.append(
            FleetRow(
                group=key,
                devices_reporting=len(last),
                windows=len(ws),
                requests=requests,
                errors=errors,
                success_rate=(requests - errors) / requests if requests else None,
                p50_ms=histogram_quantile(bounds, lat, 0.50),
                p95_ms=histogram_quantile(bounds, lat, 0.95),
                p99_ms=histogram_quantile(bounds, lat, 0.99),
                confidence_shift=shift,
                drift_score=score,
                freshness_s=max(0.0, now - max(last.values())) if last else None,
                stalest_s=max(0.0, now - min(last.values())) if last else None,
                models=tuple(sorted({w.model_key for w in ws})),
            )
        )
    return rows


def rebin(
    edges: Sequence[float], counts: Sequence[float], target: Sequence[float]
) -> list[float] | None:
    """Counts on `edges` spread onto the bins of `target`.

    Values are taken as uniform within each source bin; mass outside the target's range
    goes to its end bins.

    Returns:
        One (fractional) count per target bin, or None when `edges` are not strictly
        increasing or do not fit `counts`.
    """
    if len(edges) != len(counts) + 1 or any(b <= a for a, b in itertools.pairwise(edges)):
        return None
    lo, hi = target[0], target[-1]
    out = [0.0] * (len(target) - 1)
    for (a, b), c in zip(itertools.pairwise(edges), counts, strict=True):
        if c <= 0:
            continue
        a, b = min(max(a, lo), hi), min(max(b, lo), hi)
        if b <= a:  # wholly outside the target's range: the nearest end bin
            out[0 if a <= lo else -1] += c
            continue
        for j, (ta, tb) in enumerate(itertools.pairwise(target)):
            overlap = min(b, tb) - max(a, ta)
            if overlap > 0:
                out[j] += c * overlap / (b - a)
    return out


def _whole(values: Sequence[float]) -> tuple[int, ...]:
    """Whole counts with the same (rounded) total: largest remainders get the rest."""
    floors = [math.floor(v) for v in values]
    rest = round(sum(values)) - sum(floors)
    by_remainder = sorted(range(len(values)), key=lambda i: floors[i] - values[i])
    for i in by_remainder[: max(0, rest)]:
        floors[i] += 1
    return tuple(floors)


#: In a rollout cohort, no device counts for more than this many times the median device.
VOLUME_CAP = 10.0


def volume_capped(windows: Sequence[WindowFigures], cap: float = VOLUME_CAP) -> list[WindowFigures]:
    """The windows with each device's weight held to `cap` times the median device's (pure).

    Gates add counts up, so one device that reports 2**50 answered requests (a counter
    bug, or a compromised device hiding a bad model) would outweigh every other device
    of its cohort. A device past `cap` times the median device's requests has its
    counts, latency and confidence histograms and drift samples scaled down to that,
    keeping its own rates. Cohorts of fewer than three devices are left as they are.
    """
    volume: dict[str, int] = {}
    for w in windows:
        volume[w.device_id] = volume.get(w.device_id, 0) + requests_and_errors(w.counts)[0]
    sizes = sorted(v for v in volume.values() if v > 0)
    if len(sizes) < 3:
        return list(windows)
    limit = cap * sizes[len(sizes) // 2]
    factor = {d: limit / v for d, v in volume.items() if v > limit}
    if not factor:
        return list(windows)

    def scaled(values: Iterable[int], f: float) -> tuple[int, ...]:
        return tuple(round(v * f) for v in values)

    out = []
    for w in windows:
        f = factor.get(w.device_id)
        if f is None:
            out.append(w)
            continue
        out.append(
            replace(
                w,
                counts=dict(zip(w.counts, scaled(w.counts.values(), f), strict=True)),
                latency=scaled(w.latency, f),
                confidence=scaled(w.confidence, f),
                drift_samples=round(w.drift_samples * f),
            )
        )
    return out


def cohort_figures(
    windows: Sequence[WindowFigures], references: Mapping[str, DriftReference] | None = None
) -> CohortTelemetry:
    """The figures one rollout cohort's gates read (`CohortTelemetry`).

    Confidence histograms are rebinned onto the fleet-wide edges
    (`DEFAULT_CONFIDENCE_EDGES`) before they are added up, so the phase and control
    cohorts compare bin for bin whatever edges each agent used. No device outweighs ten
    median devices (`volume_capped`).
    """
    windows = volume_capped(windows)
    counts = merge_counts(windows)
    requests, errors = requests_and_errors(counts)
    bounds, lat = merge_latency(windows)
    grid = DEFAULT_CONFIDENCE_EDGES
    conf = [0.0] * (len(grid) - 1)
    seen = False
    for w in windows:
        if not w.confidence:
            continue
        on_grid = (
            list(w.confidence)
            if w.confidence_edges == grid
            else rebin(w.confidence_edges, w.confidence, grid)
        )
        if on_grid is None:
            continue  # edges that are no histogram's: nothing to compare
        conf = [a + b for a, b in zip(conf, on_grid, strict=True)]
        seen = True
    score, _ = merged_drift(windows, references)
    return CohortTelemetry(
        devices=len({w.device_id for w in windows}),
        inferences=requests,
        errors=errors,
        p95_latency_ms=histogram_quantile(bounds, lat, 0.95),
        confidence_counts=_whole(conf) if seen else None,
        input_drift=score,
    )
