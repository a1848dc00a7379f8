"""Pure view models: plain data in, what a page shows out (no I/O, no templates).

Every page handler gathers rows through `_sources` and hands them to one function here,
so the arithmetic (fleet counts, versions in the field, chart series, histograms against
the reference) is tested without a server. Telemetry payloads are read tolerantly: the
console draws every numeric field it finds, because the window format is owned by the
agent and may grow fields the console has never heard of.
"""

from __future__ import annotations

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
    "flatten_numbers",
    "fleet_summary",
    "model_placements",
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
    """Numeric leaves of a nested mapping as dotted names (bools and lists skipped)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
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
        slot = min(int((ts - lo) / width), buckets - 1)
        bucket = sums.setdefault(slot, {})
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
    """Read `{bin_edges|edges, frequencies|counts}` (or a bare count list) as a histogram."""
    if isinstance(value, Mapping):
        edges = value.get("bin_edges", value.get("edges"))
        counts = value.get("frequencies", value.get("counts"))
        if isinstance(counts, list) and all(isinstance(c, int | float) for c in counts):
            if isinstance(edges, list) and len(edges) == len(counts) + 1:
                return [float(e) for e in edges], [float(c) for c in counts]
            n = len(counts)
            return [i / n for i in range(n + 1)], [float(c) for c in counts]
    if isinstance(value, list) and value and all(isinstance(c, int | float) for c in value):
        n = len(value)
        return [i / n for i in range(n + 1)], [float(c) for c in value]
    return None


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
