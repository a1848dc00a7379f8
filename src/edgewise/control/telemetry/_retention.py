"""Retention and downsampling of stored telemetry (pure plan + pure merge).

Device windows are kept as sent for `raw_keep_s`; after that, the windows of one
device, pipeline and model version within one `downsample_s` bucket merge into one
downsampled window (counts and histograms add up bin by bin, so fleet views over old
data stay exact at the coarser resolution); everything ends at `keep_s`. Events and
samples are kept `events_keep_s` and `samples_keep_s` and never merged.

The job around this (`_store` in this package) reads window metadata, calls
`plan_retention`, then merges and deletes in one transaction per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgewise.control.telemetry._figures import (
    finite,
    window_count,
    window_counts,
    window_edges,
    window_name,
)

__all__ = [
    "MergeGroup",
    "RetentionPlan",
    "RetentionPolicy",
    "WindowMeta",
    "merge_window_data",
    "plan_retention",
]


class RetentionPolicy(BaseModel):
    """How long telemetry lives, and at what resolution."""

    model_config = ConfigDict(extra="forbid")

    raw_keep_s: float = Field(default=86400.0, gt=0)
    downsample_s: float = Field(default=3600.0, gt=0)
    keep_s: float = Field(default=30 * 86400.0, gt=0)
    events_keep_s: float = Field(default=90 * 86400.0, gt=0)
    samples_keep_s: float = Field(default=7 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetentionPolicy:
        if self.raw_keep_s > self.keep_s:
            raise ValueError("raw_keep_s must not exceed keep_s")
        return self


@dataclass(frozen=True)
class WindowMeta:
    """What planning needs to know of one stored window."""

    id: int
    device_id: str
    pipeline: str
    model_key: str
    start: float
    end: float
    downsampled: bool = False


@dataclass(frozen=True)
class MergeGroup:
    """Windows to replace with one downsampled window."""

    device_id: str
    pipeline: str
    model_key: str
    bucket_start: float
    bucket_end: float
    ids: tuple[int, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention run does: merges first, then deletes."""

    merges: tuple[MergeGroup, ...]
    deletes: tuple[int, ...]
    events_before: float
    samples_before: float

    @property
    def empty(self) -> bool:
        """Nothing to merge or delete among windows."""
        return not self.merges and not self.deletes


def plan_retention(
    windows: Sequence[WindowMeta], now: float, policy: RetentionPolicy
) -> RetentionPlan:
    """Which windows to merge and which to delete (pure, deterministic order)."""
    delete_before = now - policy.keep_s
    merge_before = now - policy.raw_keep_s
    deletes = []
    buckets: dict[tuple[str, str, str, int], list[WindowMeta]] = {}
    for w in windows:
        if w.end < delete_before:
            deletes.append(w.id)
            continue
        at = w.start / policy.downsample_s
        if not math.isfinite(at):
            continue  # a start no bucket holds (-1.7e308 over 0.5 s): kept raw until it expires
        b = math.floor(at)
        # Only whole buckets that ended before the raw horizon: never half a bucket.
        if (b + 1) * policy.downsample_s <= merge_before:
            buckets.setdefault((w.device_id, w.pipeline, w.model_key, b), []).append(w)
    merges = []
    for (device, pipeline, model, b), ws in sorted(buckets.items()):
        if len(ws) == 1 and ws[0].downsampled:
            continue  # already one merged window: nothing to gain
        merges.append(
            MergeGroup(
                device,
                pipeline,
                model,
                b * policy.downsample_s,
                (b + 1) * policy.downsample_s,
                tuple(sorted(w.id for w in ws)),
            )
        )
    return RetentionPlan(
        tuple(merges),
        tuple(sorted(deletes)),
        now - policy.events_keep_s,
        now - policy.samples_keep_s,
    )


def _add_lists(a: list[Any], b: list[Any]) -> list[Any] | None:
    """Counts (or lists of them) added element by element; None if they do not line up."""
    if len(a) != len(b):
        return None
    out: list[Any] = []
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list) and isinstance(y, list):
            sub = _add_lists(x, y)
            if sub is None:
                return None
            out.append(sub)
            continue
        cx, cy = window_count(x), window_count(y)
        if cx is None or cy is None:
            return None
        out.append(cx + cy)
    return out


def _counts_of(hist: Any, bins: int | None = None) -> list[int] | None:
    """A histogram's counts (`window_counts`), if there are `bins` of them (any if None)."""
    counts = window_counts(hist.get("counts")) if isinstance(hist, Mapping) else ()
    if not counts or (bins is not None and len(counts) != bins):
        return None
    return list(counts)


def _merge_confidence(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    hist: dict[str, Any] | None = None
    for d in datas:
        cur = d.get("confidence")
        edges = list(window_edges(cur.get("edges"))) if isinstance(cur, Mapping) else []
        if not edges:
            continue
        counts = _counts_of(cur, len(edges) - 1)
        if counts is None:
            continue
        if hist is None:
            hist = {"edges": edges, "counts": counts}
        elif edges == hist["edges"]:
            hist["counts"] = [a + b for a, b in zip(hist["counts"], counts, strict=True)]
    return hist


def _merge_latency(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    lat: dict[str, Any] | None = None
    for d in datas:
        cur = d.get("latency")
        if not isinstance(cur, Mapping) or not isinstance(cur.get("stages"), Mapping):
            continue
        bounds = list(window_edges(cur.get("bounds")))
        if not bounds or not cur["stages"]:
            continue
        if lat is None:
            lat = {"bounds": bounds, "stages": {}}
        if bounds != lat["bounds"]:
            continue
        for stage, h in cur["stages"].items():
            counts = _counts_of(h, len(bounds) + 1)
            if counts is None:
                continue
            total = finite(h.get("sum", 0.0)) or 0.0
            have = lat["stages"].get(stage)
            if have is None:
                lat["stages"][stage] = {"counts": counts, "sum": total}
                continue
            have["counts"] = [a + b for a, b in zip(have["counts"], counts, strict=True)]
            have["sum"] = round(have["sum"] + total, 4)
    return lat


def _as_counts(value: Any, depth: int) -> list[Any] | None:
    """Counts (`depth` 1) or lists of counts (`depth` 2), as ints; None if not that.

    No deeper: a sketch nested 900 lists deep is no sketch, and walking it had
    recursed past Python's limit (a RecursionError, every retention run).
    """
    if not isinstance(value, list):
        return None
    if depth > 1:
        rows = [_as_counts(v, depth - 1) for v in value]
        return None if None in rows else rows
    counts = window_counts(value)
    return list(counts) if counts or not value else None


def _merge_features(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    feats: dict[str, Any] | None = None
    for d in datas:
        cur = d.get("features")
        if not isinstance(cur, Mapping):
            continue
        depths = {"features": 2, "confidence": 1, "classes": 1}
        parts = {k: _as_counts(cur[k], n) for k, n in depths.items() if k in cur}
        if not all(v is not None for v in parts.values()):
            continue
        if feats is None:
            feats = parts
            continue
        merged = {k: _add_lists(feats.get(k, []), parts.get(k) or []) for k in feats}
        if all(v is not None for v in merged.values()):
            feats = merged
    return feats


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON PostgreSQL stores.

    (Python's json writes NaN and Infinity, which PostgreSQL's json type refuses: a
    sum that overflowed had failed the retention run, every hour, for every device.)
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def merge_window_data(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One window's data from several of one device pipeline (pure).

    Counts and latency, confidence and feature histograms add up; the drift score
    becomes the sample-weighted mean of sufficient windows (with the maximum kept);
    resources keep the mean CPU and memory and the maximum temperature. Parts that do
    not line up (other bins) or are not what they should be (counts that are no counts,
    numbers that are not finite: the data came from a device) are dropped rather than
    guessed; nothing a device sent makes this raise.
    """
    if not datas:
        raise ValueError("nothing to merge")
    first = datas[0]
    out: dict[str, Any] = {
        k: window_name(first[k], k)
        for k in ("pipeline", "model", "version", "deployment")
        if k in first
    }
    starts = [v for d in datas if (v := finite(d.get("start"))) is not None]
    ends = [v for d in datas if (v := finite(d.get("end"))) is not None]
    out["start"] = min(starts, default=0.0)
    out["end"] = max(ends, default=0.0)
    out["merged"] = sum(window_count(d.get("merged", 1)) or 1 for d in datas)
    counts: dict[str, int] = {}
    for d in datas:
        cur = d.get("counts")
        if not isinstance(cur, Mapping):
            continue
        for k, v in cur.items():
            c = window_count(v)
            if c is not None:
                counts[str(k)] = counts.get(str(k), 0) + c
    if counts:
        out["counts"] = counts
    lat = _merge_latency(datas)
    if lat is not None:
        out["latency"] = lat
    conf = _merge_confidence(datas)
    if conf is not None:
        out["confidence"] = conf
    feats = _merge_features(datas)
    if feats is not None:
        out["features"] = feats
    scored = []
    for d in datas:
        drift = d.get("drift")
        if not isinstance(drift, Mapping) or drift.get("sufficient") is not True:
            continue
        score, n = finite(drift.get("score")), window_count(drift.get("samples", 0))
        if score is not None and score >= 0 and n is not None:
            scored.append((score, n))
    weight = sum(n for _, n in scored)
    if scored and weight:
        out["drift"] = {
            "score": round(sum(s * (n / weight) for s, n in scored), 6),
            "max_score": max(s for s, _ in scored),
            "samples": weight,
            "sufficient": True,
            "drifted": any(
                d["drift"].get("drifted") is True
                for d in datas
                if isinstance(d.get("drift"), Mapping)
            ),
        }
    res = [d["resources"] for d in datas if isinstance(d.get("resources"), Mapping)]
    if res:
        merged_res: dict[str, Any] = {}
        for k in ("cpu_percent", "memory_percent", "rss_mb"):
            vals = [v for r in res if (v := finite(r.get(k))) is not None]
            if vals:
                merged_res[k] = round(sum(v / len(vals) for v in vals), 3)
        temps = [v for r in res if (v := finite(r.get("temperature_c"))) is not None]
        if temps:
            merged_res["temperature_c"] = max(temps)
        merged_res["throttled"] = any(r.get("throttled") is True for r in res)
        out["resources"] = merged_res
    safe: dict[str, Any] = _json_safe(out)
    return safe
