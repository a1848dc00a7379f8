"""SLO and drift figures of a model version, from its telemetry windows (pure).

Windows are read with the telemetry part's own reader (`WindowFigures.from_record`), so
the console's success rate and p95 are the numbers `edgewise fleet health` and the
rollout gates see. Histograms are drawn against the bundle's `reference`: the top-1
confidence, the class prior, and the input features that moved most (by PSI), because a
64-feature model would otherwise bury the one feature that drifted.

Windows come from devices, so every number is checked before it is summed (here and
in `_views` as in `WindowFigures`): a window whose counts are not counts is left out of
that figure, and one device's garbage never fails the page that shows the fleet's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.control.telemetry import WindowFigures, histogram_quantile, merge_latency
from edgewise.drift import psi
from edgewise.web._views import (
    LARGEST,
    Histogram,
    Series,
    compare_histograms,
    counts_of,
    edges_of,
    number,
    slot_of,
)

__all__ = ["TOP_FEATURES", "reference_histograms", "slo_series"]

TOP_FEATURES = 4


def _when(record: Mapping[str, Any]) -> float:
    data = record.get("data") or {}
    end = number(data.get("end")) if isinstance(data, Mapping) else None
    if end is not None and end > 0:
        return end
    return float(record.get("ts") or 0.0)


def slo_series(records: Sequence[Mapping[str, Any]], buckets: int = 60) -> list[Series]:
    """Requests, success rate, p95/p99 latency and drift score per time bucket.

    Series with no value at all are left out (e.g. latency when agents send none).
    """
    rows = [(r, _when(r)) for r in records if r.get("cls", "metric") == "metric"]
    if not rows:
        return []
    lo = min(t for _, t in rows)
    hi = max(t for _, t in rows)
    width = (hi - lo) / buckets if hi > lo else 1.0
    grouped: dict[int, list[WindowFigures]] = {}
    for record, at in rows:
        fig = WindowFigures.from_record(str(record.get("device_id", "")), record.get("data") or {})
        grouped.setdefault(slot_of(at, lo, width, buckets), []).append(fig)
    slots = sorted(grouped)
    xs = [lo + (s + 0.5) * width for s in slots]
    columns: dict[str, list[float | None]] = {
        "requests": [],
        "success rate": [],
        "p95 latency ms": [],
        "p99 latency ms": [],
        "drift score": [],
    }
    for slot in slots:
        ws = grouped[slot]
        requests = sum(w.requests for w in ws)
        errors = sum(w.errors for w in ws)
        bounds, lat = merge_latency(ws)
        scored = [(w.drift_score, max(1, w.drift_samples)) for w in ws if w.drift_score is not None]
        weight = sum(n for _, n in scored)
        columns["requests"].append(float(requests) if requests else None)
        columns["success rate"].append((requests - errors) / requests if requests else None)
        columns["p95 latency ms"].append(histogram_quantile(bounds, lat, 0.95))
        columns["p99 latency ms"].append(histogram_quantile(bounds, lat, 0.99))
        columns["drift score"].append(
            sum(float(v) * n for v, n in scored if v is not None) / weight if weight else None
        )
    return [Series(name, xs, ys) for name, ys in columns.items() if any(y is not None for y in ys)]


def _sum_lists(target: list[float] | None, values: Any) -> list[float] | None:
    values = counts_of(values)
    if values is None:
        return target
    if target is None:
        return [float(v) for v in values]
    if len(target) != len(values):
        return target
    return [a + float(b) for a, b in zip(target, values, strict=True)]


def _add_features(
    total: npt.NDArray[np.float64] | None, counts: Any
) -> npt.NDArray[np.float64] | None:
    """Add one window's per-feature bin counts (features x bins) to the running total.

    numpy, because a 64-feature window is a few thousand numbers and a page reads
    hundreds of windows. Ragged or differently shaped windows are skipped, and so are
    windows with a count that is not one (negative, not finite, beyond 2**53).
    """
    if not isinstance(counts, list) or not counts:
        return total
    try:
        arr = np.asarray(counts, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return total
    if arr.ndim != 2 or (total is not None and total.shape != arr.shape):
        return total
    if not (np.all(np.isfinite(arr)) and np.all((arr >= 0) & (arr <= LARGEST))):
        return total
    return arr if total is None else total + arr


def reference_histograms(
    records: Sequence[Mapping[str, Any]], reference: Mapping[str, Any]
) -> list[Histogram]:
    """Observed histograms of the windows against the bundle's reference.

    Args:
        records: window records (`data` as agents send it).
        reference: the manifest's `reference` (features, class_prior, confidence).
    """
    conf: list[float] | None = None
    conf_edges: list[float] | None = None
    classes: list[float] | None = None
    features: npt.NDArray[np.float64] | None = None
    latency_bounds: tuple[float, ...] = ()
    windows = []
    for record in records:
        data = record.get("data") or {}
        if not isinstance(data, Mapping):
            continue
        window_conf = data.get("confidence")
        if isinstance(window_conf, Mapping):
            edges = window_conf.get("edges")
            if conf_edges is None and isinstance(edges, list):
                conf_edges = edges_of(edges)
            if conf_edges is not None and edges == conf_edges:
                conf = _sum_lists(conf, window_conf.get("counts"))
        counts = data.get("features")
        if isinstance(counts, Mapping):
            classes = _sum_lists(classes, counts.get("classes"))
            features = _add_features(features, counts.get("features"))
        windows.append(WindowFigures.from_record("", data))
    out: list[Histogram] = []
    if conf is not None:
        ref_conf = reference.get("confidence")
        edges = conf_edges if conf_edges and len(conf_edges) == len(conf) + 1 else None
        out.append(compare_histograms("top-1 confidence", conf, ref_conf, edges))
    prior = reference.get("class_prior")
    if classes is not None:
        ref_prior = None
        if isinstance(prior, list) and len(prior) == len(classes):
            n = len(prior)
            ref_prior = {"bin_edges": list(range(n + 1)), "frequencies": prior}
        out.append(compare_histograms("predicted class vs prior", classes, ref_prior))
    ref_features = reference.get("features") or []
    scored: list[tuple[float, int]] = []
    rows = [] if features is None else features.tolist()
    for i, observed in enumerate(rows):
        if i >= len(ref_features) or sum(observed) <= 0:
            continue
        ref_freqs = ref_features[i].get("frequencies") or []
        if len(ref_freqs) == len(observed):
            scored.append((float(psi(ref_freqs, observed)), i))
    for _, i in sorted(scored, reverse=True)[:TOP_FEATURES]:
        name = ref_features[i].get("name") or f"feature {i}"
        out.append(compare_histograms(f"input {name}", rows[i], ref_features[i]))
    latency_bounds, latency = merge_latency(windows)
    if latency_bounds and sum(latency) > 0:
        # The overflow bucket gets a right edge one bucket-width past the last bound.
        step = latency_bounds[-1] - (latency_bounds[-2] if len(latency_bounds) > 1 else 0.0)
        edges = [0.0, *latency_bounds, latency_bounds[-1] + step]
        total = float(sum(latency))
        out.append(Histogram("end-to-end latency ms", edges, [c / total for c in latency]))
    return out
