"""Pure view models: plain data in, what a page shows out (no I/O, no templates).

Every page handler gathers rows through `_sources` and hands them to one function here,
so the arithmetic (fleet counts, versions in the field, chart series, histograms against
the reference) is tested without a server. Telemetry payloads are read tolerantly: the
console draws every numeric field it finds, because the window format is owned by the
agent and may grow fields the console has never heard of.

Tolerantly also means defensively: a window is written by a device, and a compromised
or broken one sends what it likes (strings for counts, negative or astronomical counts,
one bin edge a dict, timestamps a thousand years apart). Such parts are left out of the
figures; none of them may fail the page for the rest of the fleet.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FleetSummary",
    "Histogram",
    "Series",
    "bucketed_series",
    "compare_histograms",
    "counts_of",
    "edges_of",
    "flatten_numbers",
    "fleet_summary",
    "model_placements",
    "number",
    "slot_of",
    "version_key",
    "window_histograms",
]


@dataclass(frozen=True)
class FleetSummary:
    """What the overview shows."""

    total: int
    online: int
    offline: int
    decommissioned: int
    versions: list[tuple[str, int]]  # "model@version", devices running it; most first
    failing: int  # devices with a pipeline in status failed / rolled_back


@dataclass(frozen=True)
class Series:
    """One time series for a line chart."""

    name: str
    xs: list[float]
    ys: list[float | None]


@dataclass(frozen=True)
class Histogram:
    """Bin edges and relative frequencies (sum 1, or all zero when empty)."""

    name: str
    edges: list[float]
    freqs: list[float]
    reference: list[float] | None = None  # the bundle's frequencies on the same bins
    extra: dict[str, float] = field(default_factory=dict)


# Beyond 2**53 a number is not even an exact integer in the browser that draws it; a
# counter, latency or timestamp that large is a device's garbage, not a figure.
LARGEST = float(2**53)


def number(value: Any) -> float | None:
    """A JSON number fit to draw (finite, within +-2**53, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not -LARGEST <= value <= LARGEST:
        return None  # (float() of a 400-digit int raises)
    out = float(value)
    return out if math.isfinite(out) and -LARGEST <= out <= LARGEST else None


def edges_of(values: Any) -> list[float] | None:
    """Bin edges: a list of numbers fit to draw, else None (one dict among them will do)."""
    if not isinstance(values, list):
        return None
    out: list[float] = []
    for value in values:
        figure = number(value)
        if figure is None:
            return None
        out.append(figure)
    return out


def counts_of(values: Any) -> list[float] | None:
    """Histogram counts: a list of numbers fit to draw and none negative, else None."""
    out = edges_of(values)
    return out if out is not None and all(v >= 0 for v in out) else None


def slot_of(at: float, lo: float, width: float, buckets: int) -> int:
    """The time bucket of `at` (buckets `width` wide from `lo`); 0 when that is no number.

    Timestamps are the devices' own: two of them 1e308 apart, or 5e-324 apart, make the
    width infinite or zero, and a page must still draw the others.
    """
    try:
        share = (at - lo) / width
    except ZeroDivisionError:
        return 0
    return min(max(int(share), 0), buckets - 1) if math.isfinite(share) else 0


def version_key(version: str) -> tuple[int | str, ...]:
    """A sort key for semver-ish strings (numeric parts numerically)."""
    parts: list[int | str] = []
    for chunk in version.replace("-", ".").replace("+", ".").split("."):
        # ASCII digits of a sane length only: int() refuses "²" and thousands of digits
        numeric = chunk.isascii() and chunk.isdigit() and len(chunk) <= 30
        parts.append(int(chunk) if numeric else chunk)
    # Mixed int/str tuples do not compare: make every element comparable.
    return tuple((0, p) if isinstance(p, int) else (1, p) for p in parts)  # type: ignore[misc]


def fleet_summary(
    devices: Sequence[Mapping[str, Any]],
    pipelines: Mapping[str, Sequence[Mapping[str, Any]]],
) -> FleetSummary:
    """Count devices by connectivity and model versions running in the field.

    Args:
        devices: operator views of devices (`id`, `status`, `online`).
        pipelines: device id -> reported pipelines (`model`, `version`, `status`).
    """
    online = sum(1 for d in devices if d.get("online"))
    retired = sum(1 for d in devices if d.get("status") != "active")
    versions: Counter[str] = Counter()
    failing = 0
    for device in devices:
        if device.get("status") != "active":
            continue
        rows = pipelines.get(str(device["id"]), ())
        if any(p.get("status") in ("failed", "rolled_back") for p in rows):
            failing += 1
        for p in rows:
            if p.get("model") and p.get("status") == "active":
                versions[f"{p['model']}@{p.get('version') or '?'}"] += 1
    ordered = sorted(versions.items(), key=lambda kv: (-kv[1], kv[0]))
    return FleetSummary(
        total=len(devices),
        online=online,
        offline=len(devices) - online - retired,
        decommissioned=retired,
        versions=ordered,
        failing=failing,
    )


def model_placements(
    pipelines: Iterable[Mapping[str, Any]],
) -> dict[str, dict[str, int]]:
    """`name@version` -> reported status -> device count (where each version runs)."""
    out: dict[str, Counter[str]] = {}
    for p in pipelines:
        if not p.get("model"):
            continue
        ref = f"{p['model']}@{p.get('version') or '?'}"
        out.setdefault(ref, Counter())[str(p.get("status") or "unknown")] += 1
    return {ref: dict(counts) for ref, counts in out.items()}


def flatten_numbers(data: Mapping[str, Any], prefix: str = "", depth: int = 3) -> dict[str, float]:
    """Numeric leaves of a nested mapping as dotted names.

    Bools, lists and numbers not fit to draw (see `number`) are skipped.
    """
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            figure = number(value)
            if figure is not None:
                out[name] = figure
        elif isinstance(value, Mapping) and depth > 1:
            out.update(flatten_numbers(value, f"{name}.", depth - 1))
    return out


def bucketed_series(
    records: Sequence[Mapping[str, Any]], buckets: int = 60, limit: int = 12
) -> list[Series]:
    """Fleet-wide series: records of many devices merged into equal time buckets.

    Counters (fields under `counts`) are summed per bucket, everything else averaged,
    so a version's chart shows one line per figure, not one zig-zag across devices.
    """
    rows = [r for r in records if r.get("cls", "metric") == "metric"]
    if not rows:
        return []
    stamps = [float(r.get("ts") or 0.0) for r in rows]
    lo, hi = min(stamps), max(stamps)
    width = (hi - lo) / buckets if hi > lo else 1.0
    flat = [flatten_numbers(r.get("data") or {}) for r in rows]
    seen: Counter[str] = Counter(k for f in flat for k in f if k not in ("ts", "seq", "window_s"))
    names = sorted(k for k, _ in seen.most_common(limit))
    sums: dict[int, dict[str, list[float]]] = {}
    for ts, fields in zip(stamps, flat, strict=True):
        bucket = sums.setdefault(slot_of(ts, lo, width, buckets), {})
        for name in names:
            if name in fields:
                bucket.setdefault(name, []).append(fields[name])
    slots = sorted(sums)
    xs = [lo + (slot + 0.5) * width for slot in slots]
    out = []
    for name in names:
        ys: list[float | None] = []
        for slot in slots:
            values = sums[slot].get(name)
            if not values:
                ys.append(None)
            elif name.startswith("counts."):
                ys.append(sum(values))
            else:
                ys.append(sum(values) / len(values))
        out.append(Series(name, xs, ys))
    return out


def _hist_from(value: Any) -> tuple[list[float], list[float]] | None:
    """Read `{bin_edges|edges, frequencies|counts}` (or a bare count list) as a histogram.

    None unless the counts are a non-empty list of non-negative numbers; edges that are
    not all numbers (or not one more than the counts) are replaced by even ones.
    """
    if isinstance(value, Mapping):
        edges = edges_of(value.get("bin_edges", value.get("edges")))
        counts = counts_of(value.get("frequencies", value.get("counts")))
    else:
        edges, counts = None, counts_of(value)
    if not counts:
        return None
    if edges is not None and len(edges) == len(counts) + 1:
        return edges, counts
    n = len(counts)
    return [i / n for i in range(n + 1)], counts


_EDGE_KEYS = frozenset({"edges", "bin_edges"})


def window_histograms(records: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Sum the histogram-shaped fields of metric records, by field name.

    A field is histogram-shaped when it is a list of numbers or a mapping with
    `counts`/`frequencies` (and optional `edges`/`bin_edges`), one level deep.
    Records whose bin count differs from the first seen are skipped for that field.
    """
    sums: dict[str, list[float]] = {}
    for rec in records:
        data = rec.get("data") or {}
        candidates: list[tuple[str, Any]] = []
        for key, value in data.items():
            if key in _EDGE_KEYS:
                continue
            candidates.append((key, value))
            if isinstance(value, Mapping) and _hist_from(value) is None:
                candidates.extend(
                    (f"{key}.{k}", v) for k, v in value.items() if k not in _EDGE_KEYS
                )
        for name, value in candidates:
            hist = _hist_from(value)
            if hist is None:
                continue
            counts = hist[1]
            if name not in sums:
                sums[name] = list(counts)
            elif len(sums[name]) == len(counts):
                sums[name] = [a + b for a, b in zip(sums[name], counts, strict=True)]
    return sums


def _same_edges(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 for x, y in zip(a, b, strict=True))


def _normalise(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts] if total > 0 else [0.0 for _ in counts]


def compare_histograms(
    name: str,
    observed: Sequence[float],
    reference: Mapping[str, Any] | None,
    edges: Sequence[float] | None = None,
) -> Histogram:
    """Observed counts against the bundle's reference histogram on the same bins.

    Adds the population stability index when both are on the same bins, so the
    chart carries the figure the drift gate reads. When the observed bin `edges` are
    given and differ from the reference's, the two are not comparable: the observed
    histogram is shown alone on its own edges.
    """
    ref = _hist_from(reference) if reference is not None else None
    freqs = _normalise(observed)
    if ref is not None and edges is not None and not _same_edges(edges, ref[0]):
        return Histogram(name, [float(e) for e in edges], freqs)
    if ref is None or len(ref[1]) != len(freqs):
        n = len(freqs)
        return Histogram(name, [i / n for i in range(n + 1)] if n else [], freqs)
    edges, ref_counts = ref
    ref_freqs = _normalise(ref_counts)
    extra: dict[str, float] = {}
    if sum(observed) > 0:
        from edgewise.drift import psi

        extra["psi"] = round(float(psi(ref_freqs, freqs)), 4)
    return Histogram(name, edges, freqs, ref_freqs, extra)
