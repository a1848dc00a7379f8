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
        b = math.floor(w.start / policy.downsample_s)
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
    if len(a) != len(b):
        return None
    out: list[Any] = []
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list) and isinstance(y, list):
            sub = _add_lists(x, y)
            if sub is None:
                return None
            out.append(sub)
        elif isinstance(x, int | float) and isinstance(y, int | float):
            out.append(x + y)
        else:
            return None
    return out


def _merge_hist(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    if a.get("edges") != b.get("edges"):
        return None
    counts = _add_lists(list(a.get("counts", [])), list(b.get("counts", [])))
    return None if counts is None else {"edges": a.get("edges"), "counts": counts}


def merge_window_data(datas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One window's data from several of one device pipeline (pure).

    Counts and latency, confidence and feature histograms add up; the drift score
    becomes the sample-weighted mean of sufficient windows (with the maximum kept);
    resources keep the mean CPU and memory and the maximum temperature. Parts that do
    not line up (other bins) are dropped rather than guessed.
    """
    if not datas:
        raise ValueError("nothing to merge")
    first = datas[0]
    out: dict[str, Any] = {
        k: first[k] for k in ("pipeline", "model", "version", "deployment") if k in first
    }
    out["start"] = min(float(d.get("start", 0.0)) for d in datas)
    out["end"] = max(float(d.get("end", 0.0)) for d in datas)
    out["merged"] = sum(int(d.get("merged", 1)) for d in datas)
    counts: dict[str, int] = {}
    for d in datas:
        for k, v in dict(d.get("counts") or {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    if counts:
        out["counts"] = counts
    lat: dict[str, Any] | None = None
    for d in datas:
        cur = d.get("latency")
        if not isinstance(cur, Mapping) or not cur.get("stages"):
            continue
        if lat is None:
            lat = {"bounds": cur.get("bounds"), "stages": {}}
        if cur.get("bounds") != lat["bounds"]:
            continue
        for stage, h in dict(cur["stages"]).items():
            have = lat["stages"].get(stage)
            if have is None:
                lat["stages"][stage] = {"counts": list(h["counts"]), "sum": h.get("sum", 0.0)}
                continue
            added = _add_lists(have["counts"], list(h["counts"]))
            if added is not None:
                have["counts"] = added
                have["sum"] = round(float(have["sum"]) + float(h.get("sum", 0.0)), 4)
    if lat is not None:
        out["latency"] = lat
    for key in ("confidence",):
        hist: dict[str, Any] | None = None
        for d in datas:
            cur = d.get(key)
            if isinstance(cur, Mapping):
                hist = dict(cur) if hist is None else (_merge_hist(hist, cur) or hist)
        if hist is not None:
            out[key] = hist
    feats: dict[str, Any] | None = None
    for d in datas:
        cur = d.get("features")
        if not isinstance(cur, Mapping):
            continue
        if feats is None:
            feats = {k: cur[k] for k in ("features", "confidence", "classes") if k in cur}
            continue
        merged = {k: _add_lists(list(feats.get(k, [])), list(cur.get(k, []))) for k in feats}
        if all(v is not None for v in merged.values()):
            feats = merged
    if feats is not None:
        out["features"] = feats
    scored = [
        (float(d["drift"]["score"]), int(d["drift"].get("samples", 0)))
        for d in datas
        if isinstance(d.get("drift"), Mapping) and d["drift"].get("sufficient")
    ]
    weight = sum(n for _, n in scored)
    if scored and weight:
        out["drift"] = {
            "score": round(sum(s * n for s, n in scored) / weight, 6),
            "max_score": max(s for s, _ in scored),
            "samples": weight,
            "sufficient": True,
            "drifted": any(
                bool(d["drift"].get("drifted"))
                for d in datas
                if isinstance(d.get("drift"), Mapping)
            ),
        }
    res = [d["resources"] for d in datas if isinstance(d.get("resources"), Mapping)]
    if res:
        merged_res: dict[str, Any] = {}
        for k in ("cpu_percent", "memory_percent", "rss_mb"):
            vals = [float(r[k]) for r in res if isinstance(r.get(k), int | float)]
            if vals:
                merged_res[k] = round(sum(vals) / len(vals), 3)
        temps = [
            float(r["temperature_c"])
            for r in res
            if isinstance(r.get("temperature_c"), int | float)
        ]
        if temps:
            merged_res["temperature_c"] = max(temps)
        merged_res["throttled"] = any(bool(r.get("throttled")) for r in res)
        out["resources"] = merged_res
    return out
