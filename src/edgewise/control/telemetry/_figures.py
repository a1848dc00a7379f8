"""Window figures: what the control plane reads out of stored `window` records (pure).

A device's `window` metric record (built by `edgewise.agent.telemetry`) becomes a
`WindowFigures`; histograms from many windows and devices merge bin by bin, and the
quantiles of a merged latency histogram are read the way Prometheus'
`histogram_quantile` reads them (linear inside the bucket). Error accounting, used
everywhere (fleet view, burn rates, rollout gates): requests = ok + errors, errors =
failed + shed + rejected; bad input is the client's fault and counts as neither.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_COUNT",
    "NAME_LIMITS",
    "UNANSWERED_KEYS",
    "WindowFigures",
    "finite",
    "histogram_quantile",
    "merge_counts",
    "merge_latency",
    "requests_and_errors",
    "window_count",
    "window_counts",
    "window_edges",
    "window_name",
]

# Requests that got no answer, whatever the reason: each counts against a rollout.
UNANSWERED_KEYS = ("failed", "shed", "rejected", "expired", "superseded")

# The most one counter or bucket of one window may hold. Windows come from devices, and
# a device may be compromised: a count past this (no device answers 9e15 requests in a
# window) is garbage, and left out like any other malformed part. Below it, sums over
# any number of stored windows stay exact Python ints and finite as floats (a histogram
# quantile multiplies its total by a float; 10**400 had made that an OverflowError, and
# every fleet view and alert round a 500).
MAX_COUNT = 2**53

# Widths of the window name columns (`telemetry_windows`): a name read from a window's
# data is cut the same way, so alert scopes built from it fit `alerts.scope`.
NAME_LIMITS = {"pipeline": 200, "model": 200, "version": 64, "deployment": 200}


def finite(value: Any) -> float | None:
    """`value` as a finite float; None for anything else (bools, strings, NaN, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:  # an int past the float range
        return None
    return out if math.isfinite(out) else None


def window_count(value: Any) -> int | None:
    """`value` as a count: a whole number in [0, MAX_COUNT]; None for anything else.

    Negative counts are refused rather than clamped: summed with other devices' windows,
    a `failed` of -10**6 had hidden every other device's failures from the burn-rate
    alert and the rollout error gate.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_COUNT:
        return int(value)
    return None


def window_counts(values: Any) -> tuple[int, ...]:
    """A list of counts (`window_count` each); () if any of them is not one."""
    if not isinstance(values, list | tuple) or not values:
        return ()
    if set(map(type, values)) == {int}:  # the usual case, checked in C (bools are not int)
        return tuple(values) if min(values) >= 0 and max(values) <= MAX_COUNT else ()
    out = tuple(map(window_count, values))
    return () if None in out else out  # type: ignore[return-value]  # no None left


def window_name(value: Any, field: str) -> str:
    """A window's pipeline, model, version or deployment name as stored and grouped.

    Cut to its column's width (`NAME_LIMITS`) and without NUL characters, which
    PostgreSQL text refuses (a NUL in a pipeline name had failed the whole ingest).
    """
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text[: NAME_LIMITS[field]]


def requests_and_errors(counts: Mapping[str, Any]) -> tuple[int, int]:
    """(requests, errors) of window counts.

    Requests are those answered (`ok`) and those that got no answer (`UNANSWERED_KEYS`).
    Errors are the unanswered ones plus the answers whose top-1 score was NaN or infinite
    (`nonfinite`, rows of answered requests, so at most `ok` of them count): a model that
    answers NaN is failing, though every request got an answer.
    """
    ok = int(counts.get("ok", 0))
    unanswered = sum(int(counts.get(k, 0)) for k in UNANSWERED_KEYS)
    return ok + unanswered, unanswered + min(int(counts.get("nonfinite", 0)), ok)


def window_edges(values: Any) -> tuple[float, ...]:
    """Bucket bounds or bin edges: finite numbers, strictly ascending; () otherwise."""
    if not isinstance(values, list | tuple):
        return ()
    if set(map(type, values)) == {float}:  # the usual case, checked in C
        out = tuple(values)
        if not all(map(math.isfinite, out)):
            return ()
    else:
        maybe = tuple(map(finite, values))
        if None in maybe:
            return ()
        out = maybe  # no None left
    return out if all(map(operator.lt, out, out[1:])) else ()


def _map(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class WindowFigures:
    """The figures of one stored window record (device-side window, or a downsampled one).

    Attributes:
        device_id: The reporting device.
        pipeline: Pipeline name.
        model: Model name; `version` its version.
        deployment: The deployment the pipeline came from ("" when unknown).
        start: Window start (device clock, unix seconds); `end` its end.
        counts: ok, failed, shed, rejected, expired, superseded, bad_input, escalated,
            fallback, nonfinite.
        latency_bounds: Upper bounds of the latency buckets (ms); the last count is overflow.
        latency: Counts per bucket of end-to-end latency ("total" stage).
        confidence_edges: Bin edges of the top-1 confidence histogram; `confidence` its counts.
        drift_score: The device's drift score for the window, if sufficient.
        drift_samples: Samples behind that score.
        features: The window's counts on the reference bins (`WindowCounts.to_dict()`).
        labels: The device's labels (for label-group views).
    """

    device_id: str
    pipeline: str
    model: str = ""
    version: str = ""
    deployment: str = ""
    start: float = 0.0
    end: float = 0.0
    counts: Mapping[str, int] = field(default_factory=dict)
    latency_bounds: tuple[float, ...] = ()
    latency: tuple[int, ...] = ()
    confidence_edges: tuple[float, ...] = ()
    confidence: tuple[int, ...] = ()
    drift_score: float | None = None
    drift_samples: int = 0
    features: Mapping[str, Any] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_key(self) -> str:
        """`name@version`."""
        return f"{self.model}@{self.version}" if self.version else self.model

    @property
    def errors(self) -> int:
        """Requests unanswered or answered with a non-finite score (`requests_and_errors`)."""
        return requests_and_errors(self.counts)[1]

    @property
    def requests(self) -> int:
        """Requests that counted for the SLO: answered or not (`requests_and_errors`)."""
        return requests_and_errors(self.counts)[0]

    @classmethod
    def from_record(
        cls, device_id: str, data: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> WindowFigures:
        """Read a `window` record's data; malformed parts are left empty, never raise.

        The data comes from a device, which may be compromised: counts that are no
        counts (negative, fractional, NaN, past `MAX_COUNT`, strings, bools) are left
        out, and a histogram with any such count, or bounds that are not finite and
        strictly ascending, is left out whole.
        """
        counts = {
            str(k): c for k, v in _map(data, "counts").items() if (c := window_count(v)) is not None
        }
        latency = _map(data, "latency")
        total = _map(_map(latency, "stages"), "total")
        bounds, lat = window_edges(latency.get("bounds")), window_counts(total.get("counts"))
        if not bounds or len(lat) != len(bounds) + 1:
            bounds, lat = (), ()
        conf = _map(data, "confidence")
        c_edges, c_counts = window_edges(conf.get("edges")), window_counts(conf.get("counts"))
        if not c_counts or len(c_counts) != len(c_edges) - 1:
            c_edges, c_counts = (), ()
        drift = _map(data, "drift")
        # A score is a largest excess over an alarm level: >= 0, and finite to be summed.
        score = finite(drift.get("score")) if drift.get("sufficient") is True else None
        samples = window_count(drift.get("samples")) if score is not None else None
        if score is None or score < 0 or samples is None:
            score, samples = None, 0
        features = data.get("features") if isinstance(data.get("features"), Mapping) else None
        return cls(
            device_id=device_id,
            pipeline=window_name(data.get("pipeline", ""), "pipeline"),
            model=window_name(data.get("model", ""), "model"),
            version=window_name(data.get("version", ""), "version"),
            deployment=window_name(data.get("deployment", ""), "deployment"),
            start=finite(data.get("start")) or 0.0,
            end=finite(data.get("end")) or 0.0,
            counts=counts,
            latency_bounds=bounds,
            latency=lat,
            confidence_edges=c_edges,
            confidence=c_counts,
            drift_score=score,
            drift_samples=samples,
            features=features,
            labels=dict(labels or {}),
        )


def merge_counts(windows: Iterable[WindowFigures]) -> dict[str, int]:
    """Counters summed over windows."""
    out: dict[str, int] = {}
    for w in windows:
        for k, v in w.counts.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def merge_latency(windows: Iterable[WindowFigures]) -> tuple[tuple[float, ...], list[int]]:
    """Latency histograms merged bin by bin (windows on other bounds are skipped).

    The bounds most devices report win (then: most windows, then the first seen); the
    runtime uses one fixed set, so a mismatch means an agent of another version, not
    something to interpolate. Not simply the first window's bounds: one device whose
    windows sorted first, on bounds of its own, had made every other device's latency
    vanish from the fleet view and the rollout latency gate.
    """
    merged: dict[tuple[float, ...], list[int]] = {}
    devices: dict[tuple[float, ...], set[str]] = {}
    windows_on: dict[tuple[float, ...], int] = {}
    for w in windows:
        if not w.latency:
            continue
        have = merged.get(w.latency_bounds)
        if have is None:
            merged[w.latency_bounds] = list(w.latency)
            devices[w.latency_bounds] = {w.device_id}
            windows_on[w.latency_bounds] = 1
            continue
        merged[w.latency_bounds] = [a + b for a, b in zip(have, w.latency, strict=True)]
        devices[w.latency_bounds].add(w.device_id)
        windows_on[w.latency_bounds] += 1
    if not merged:
        return (), []
    # max() keeps the first of equals: dicts iterate in the order bounds were first seen.
    bounds = max(merged, key=lambda b: (len(devices[b]), windows_on[b]))
    return bounds, merged[bounds]


def histogram_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of a bucketed histogram (buckets `(b[i-1], b[i]]`, last = overflow).

    Linear interpolation inside the bucket, from 0 for the first; an answer in the
    overflow bucket is its lower bound (nothing better is known). None when empty.
    """
    total = sum(counts)
    if total <= 0 or not bounds or len(counts) != len(bounds) + 1:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = 0.0 if i == 0 else float(bounds[i - 1])
            hi = float(bounds[i])
            return lo + (hi - lo) * max(0.0, rank - seen) / c
        seen += c
    return float(bounds[-1])
