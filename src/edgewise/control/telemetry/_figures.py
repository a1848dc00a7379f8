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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "UNANSWERED_KEYS",
    "WindowFigures",
    "histogram_quantile",
    "merge_counts",
    "merge_latency",
    "requests_and_errors",
]

# Requests that got no answer, whatever the reason: each counts against a rollout.
UNANSWERED_KEYS = ("failed", "shed", "rejected", "expired", "superseded")


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


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list | tuple):
        return ()
    try:
        return tuple(max(0, int(v)) for v in values)
    except (TypeError, ValueError):
        return ()


def _floats(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list | tuple):
        return ()
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return ()
    return out if all(math.isfinite(v) for v in out) else ()


def _map(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


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
        """Read a `window` record's data; malformed parts are left empty, never raise."""
        counts = {str(k): int(v) for k, v in _map(data, "counts").items() if _num(v) is not None}
        latency = _map(data, "latency")
        total = _map(_map(latency, "stages"), "total")
        bounds, lat = _floats(latency.get("bounds")), _ints(total.get("counts"))
        if len(lat) != len(bounds) + 1:
            bounds, lat = (), ()
        conf = _map(data, "confidence")
        c_edges, c_counts = _floats(conf.get("edges")), _ints(conf.get("counts"))
        if len(c_counts) != len(c_edges) - 1:
            c_edges, c_counts = (), ()
        drift = _map(data, "drift")
        score = _num(drift.get("score")) if drift.get("sufficient") else None
        features = data.get("features") if isinstance(data.get("features"), Mapping) else None
        return cls(
            device_id=device_id,
            pipeline=str(data.get("pipeline", "")),
            model=str(data.get("model", "")),
            version=str(data.get("version", "")),
            deployment=str(data.get("deployment", "")),
            start=_num(data.get("start")) or 0.0,
            end=_num(data.get("end")) or 0.0,
            counts=counts,
            latency_bounds=bounds,
            latency=lat,
            confidence_edges=c_edges,
            confidence=c_counts,
            drift_score=score,
            drift_samples=int(_num(drift.get("samples")) or 0) if score is not None else 0,
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

    The bounds of the first window with a histogram win; the runtime uses one fixed set,
    so a mismatch means an agent of another version, not something to interpolate.
    """
    bounds: tuple[float, ...] = ()
    merged: list[int] = []
    for w in windows:
        if not w.latency:
            continue
        if not bounds:
            bounds, merged = w.latency_bounds, [0] * len(w.latency)
        if w.latency_bounds != bounds:
            continue
        merged = [a + b for a, b in zip(merged, w.latency, strict=True)]
    return bounds, merged


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
