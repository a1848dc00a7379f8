"""Per-pipeline metrics, named after Triton's (`nv_inference_request_success`, ...).

Recording sits on the hot path, so it is plain Python arithmetic on lists under the
GIL: one bisect and one increment per observation. Snapshots copy the numbers out; the
agent turns them into telemetry windows and Prometheus exposition.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LATENCY_BOUNDS_MS",
    "Histogram",
    "PipelineMetrics",
    "RollingLatency",
    "prometheus_text",
]

LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
)
CONFIDENCE_BOUNDS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Cumulative-style histogram: counts per upper bound plus an overflow bucket."""

    __slots__ = ("_edges", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._edges = np.asarray(bounds, dtype=np.float64)  # searchsorted on a tuple
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Add `n` observations of `value`."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.count += n
        self.sum += value * n

    def observe_many(self, values: Any) -> None:
        """Add many observations at once (vectorised)."""
        arr = np.asarray(values, dtype=np.float64)
        if not arr.size:
            return
        idx = self._edges.searchsorted(arr, side="left")
        for i, c in enumerate(np.bincount(idx, minlength=len(self.counts)).tolist()):
            self.counts[i] += c
        self.count += int(arr.size)
        self.sum += float(arr.sum())

    def snapshot(self) -> dict[str, Any]:
        """Bounds, per-bucket counts (last is overflow), count and sum."""
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "count": self.count,
            "sum": round(self.sum, 6),
        }


class RollingLatency:
    """Latencies of the last `window_s` seconds, for the SLO's rolling p95.

    Kept as chunks of (finish times, latencies) arrays, one chunk per metrics flush, so
    that recording costs nothing per request; at most `max_values` latencies are kept.
    """

    def __init__(self, window_s: float, max_values: int = 65536) -> None:
        self.window_s = window_s
        self.max_values = max_values
        self._chunks: deque[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = deque()
        self._size = 0

    def add(self, now: float, latency_ms: float) -> None:
        """Record one request's end-to-end latency."""
        self.add_many(np.array([now]), np.array([latency_ms]))

    def add_batch(self, now: float, latencies_ms: list[float]) -> None:
        """Record the requests of one batch, all finished at `now`."""
        values = np.asarray(latencies_ms, dtype=np.float64)
        self.add_many(np.full(values.shape, now), values)

    def add_many(self, times: np.ndarray[Any, Any], latencies_ms: np.ndarray[Any, Any]) -> None:
        """Record requests finished at `times` (non-decreasing) with their latencies."""
        if not len(times):
            return
        self._chunks.append((times, latencies_ms))
        self._size += len(times)
        horizon = float(times[-1]) - self.window_s
        chunks = self._chunks
        while chunks and (
            float(chunks[0][0][-1]) < horizon or self._size - len(chunks[0][0]) >= self.max_values
        ):
            self._size -= len(chunks.popleft()[0])

    def p95(self, now: float) -> float | None:
        """p95 over the window, or None when the window is empty.

        Infinite when 5 % or more of the window's requests expired unanswered.
        """
        cutoff = now - self.window_s
        parts = [v[t >= cutoff] for t, v in list(self._chunks) if float(t[-1]) >= cutoff]
        if not parts:
            return None
        values = np.concatenate(parts)
        if not len(values):
            return None
        k = min(len(values) - 1, int(0.95 * len(values)))
        # The k-th smallest without sorting the rest: a tenth of np.sort's time at 65k.
        return float(np.partition(values, k)[k])


@dataclass
class PipelineMetrics:
    """Counters and histograms of one pipeline."""

    window_s: float = 10.0
    success: int = 0
    rows: int = 0
    failure: int = 0
    rejected: int = 0
    shed: int = 0
    expired: int = 0  # waited in the queue past the deadline: not run
    superseded: int = 0  # dropped from a full queue for a newer request
    escalated: int = 0
    # Rows that were to escalate but whose upper tier could not answer (down, slow, a
    # wrong answer, a model that failed): the local answer stood.
    cascade_failures: int = 0
    fallback: int = 0
    # Rows whose top-1 score was NaN or infinite (a model overflowing, say): counted here,
    # kept out of the confidence histogram, whose sum one NaN would spoil for good.
    nonfinite_scores: int = 0
    bad_input: int = 0
    queue_ms: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_MS))
    compute_ms: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_MS))
    total_ms: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_MS))
    stage_ms: dict[str, Histogram] = field(default_factory=dict)
    confidence: Histogram = field(default_factory=lambda: Histogram(CONFIDENCE_BOUNDS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BOUNDS))
    tier_ms: dict[str, Histogram] = field(default_factory=dict)
    tier_count: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    rolling: RollingLatency = field(init=False)

    def __post_init__(self) -> None:
        self.rolling = RollingLatency(self.window_s)
        # Batches recorded since the last flush, as flat lists of numbers (8 per batch in
        # `_nums`, one wait and one confidence per request): nothing the cyclic garbage
        # collector tracks accumulates per batch. A tuple of lists per batch did, and the
        # survivors drove full collections (tens of ms on a large heap) from the hot path.
        self._nums: list[float] = []
        self._tiers: list[str] = []
        self._waits: list[float] = []
        self._confs: list[float | None] = []
        self._pending_lock = threading.Lock()  # record (executor) vs flush (any reader)
        # Counts of batches completed off the executor (`record_late`): success, rows,
        # escalated, fallback, cascade failures.
        self._late = [0, 0, 0, 0, 0]
        self.pre_ms: deque[float] = deque()

    def record(
        self,
        t_end: float,
        tier: str,
        rows: int,
        n_esc: int,
        stage_ms: tuple[float, float, float],
        queue_ms: list[float],
        rest_ms: float,
        confidences: list[float | None],
    ) -> None:
        """Record one served batch; aggregation is deferred off the hot path.

        `queue_ms` holds one wait per request; each request's end-to-end latency is its
        wait plus `rest_ms`, the batch's own time (added up when flushed, not here).
        A pipeline never runs two batches at once, so counters need no lock; the
        pending lists are swapped out by a flush under a lock of their own.
        """
        n = len(queue_ms)
        self.success += n
        self.rows += rows
        self.escalated += n_esc
        if tier == "fallback":
            self.fallback += n
        model, post, casc = stage_ms
        with self._pending_lock:
            self._nums.extend((t_end, rows, n_esc, model, post, casc, rest_ms, n))
            self._tiers.append(tier)
            self._waits.extend(queue_ms)
            self._confs.extend(confidences)
            full = len(self._tiers) >= 512
        if full:
            self.flush()

    def record_late(
        self,
        t_end: float,
        tier: str,
        rows: int,
        n_esc: int,
        n_failed: int,
        stage_ms: tuple[float, float, float],
        queue_ms: list[float],
        rest_ms: float,
        confidences: list[float | None],
    ) -> None:
        """`record` for a batch completed off the executor (its upstream answered late).

        The executor may run the pipeline's next batch meanwhile, so the counts go to
        counters of their own, under a lock, and are added in when read: `record`, on the
        hot path, takes no lock. `n_failed` rows could not escalate (cascade failures).
        """
        n = len(queue_ms)
        with self._pending_lock:
            late = self._late
            late[0] += n
            late[1] += rows
            late[2] += n_esc
            late[3] += n if tier == "fallback" else 0
            late[4] += n_failed
            self._nums.extend((t_end, rows, n_esc, *stage_ms, rest_ms, n))
            self._tiers.append(tier)
            self._waits.extend(queue_ms)
            self._confs.extend(confidences)
            full = len(self._tiers) >= 512
        if full:
            self.flush()

    def flush(self) -> None:
        """Fold pending batch records into the histograms (vectorised).

        Reads the pending numbers as one array of 8 columns, so the cost per recorded
        batch is a few C-level operations, not a Python loop body.
        """
        with self.lock:
            pre = [self.pre_ms.popleft() for _ in range(len(self.pre_ms))]
            if pre:
                self._hist(self.stage_ms, "preprocess").observe_many(pre)
            with self._pending_lock:
                nums, tiers, waits_l, confs = self._nums, self._tiers, self._waits, self._confs
                if not tiers:
                    return
                self._nums, self._tiers, self._waits, self._confs = [], [], [], []
            cols = np.array(nums, dtype=np.float64).reshape(-1, 8).T
            t_ends, rows, n_escs, model, post, casc, rests, counts_f = cols
            counts = counts_f.astype(np.int64)
            waits = np.array(waits_l, dtype=np.float64)
            totals = waits + np.repeat(rests, counts)
            self.rolling.add_many(np.repeat(t_ends, counts), totals)
            self.batch_size.observe_many(rows)
            self.compute_ms.observe_many(model)
            self._hist(self.stage_ms, "model").observe_many(model)
            self._hist(self.stage_ms, "postprocess").observe_many(post)
            served = rows - n_escs
            tier_set = set(tiers)
            if len(tier_set) == 1:  # the usual case: no string array, no masks
                tier = tiers[0]
                self._hist(self.tier_ms, tier).observe_many(model)
                self.tier_count[tier] = self.tier_count.get(tier, 0) + int(served.sum())
            else:
                tier_arr = np.asarray(tiers)
                for tier in tier_set:
                    mask = tier_arr == tier
                    self._hist(self.tier_ms, tier).observe_many(model[mask])
                    self.tier_count[tier] = self.tier_count.get(tier, 0) + int(served[mask].sum())
            escalated = np.flatnonzero(n_escs)
            if escalated.size:
                self._hist(self.tier_ms, "cascade").observe_many(casc[escalated])
                n_esc_total = int(n_escs.sum())
                self.tier_count["cascade"] = self.tier_count.get("cascade", 0) + n_esc_total
            self.queue_ms.observe_many(waits)
            self.total_ms.observe_many(totals)
            scores = np.array([v for v in confs if v is not None], dtype=np.float64)
            finite = np.isfinite(scores)
            if not finite.all():
                self.nonfinite_scores += int(scores.size - finite.sum())
                scores = scores[finite]
            self.confidence.observe_many(scores)

    @staticmethod
    def _hist(table: dict[str, Histogram], name: str) -> Histogram:
        h = table.get(name)
        if h is None:
            h = table[name] = Histogram(LATENCY_BOUNDS_MS)
        return h

    def stage(self, name: str, ms: float, n: int = 1) -> None:
        """Record time spent in a named stage."""
        h = self.stage_ms.get(name)
        if h is None:
            h = self.stage_ms[name] = Histogram(LATENCY_BOUNDS_MS)
        h.observe(ms, n)

    def tier(self, name: str, ms: float, n: int = 1) -> None:
        """Record a cascade tier's batch latency and how many rows it served."""
        h = self.tier_ms.get(name)
        if h is None:
            h = self.tier_ms[name] = Histogram(LATENCY_BOUNDS_MS)
        h.observe(ms)
        self.tier_count[name] = self.tier_count.get(name, 0) + n

    def p95(self, now: float) -> float | None:
        """Rolling p95 end-to-end latency over the SLO window."""
        self.flush()
        return self.rolling.p95(now)

    def snapshot(self) -> dict[str, Any]:
        """Everything as plain data, with Triton-style names."""
        self.flush()
        with self._pending_lock:
            success, rows, escalated, fallback, cascade_failures = self._late
        success += self.success
        rows += self.rows
        escalated += self.escalated
        fallback += self.fallback
        cascade_failures += self.cascade_failures
        with self.lock:
            served = rows or 1
            return {
                "nv_inference_request_success": success,
                "nv_inference_exec_rows": rows,
                "nv_inference_request_failure": self.failure,
                "nv_inference_request_rejected": self.rejected,
                "nv_inference_request_shed": self.shed,
                "nv_inference_request_expired": self.expired,
                "nv_inference_request_superseded": self.superseded,
                "nv_inference_request_bad_input": self.bad_input,
                "nv_inference_escalated": escalated,
                "edgewise_cascade_failures": cascade_failures,
                "nv_inference_fallback": fallback,
                "edgewise_nonfinite_scores": self.nonfinite_scores,
                "escalation_rate": escalated / served,
                "nv_inference_queue_duration_ms": self.queue_ms.snapshot(),
                "nv_inference_compute_infer_duration_ms": self.compute_ms.snapshot(),
                "nv_inference_request_duration_ms": self.total_ms.snapshot(),
                "stage_duration_ms": {k: v.snapshot() for k, v in self.stage_ms.items()},
                "tier_duration_ms": {k: v.snapshot() for k, v in self.tier_ms.items()},
                "tier_count": dict(self.tier_count),
                "confidence": self.confidence.snapshot(),
                "batch_size": self.batch_size.snapshot(),
            }


def _labels(pairs: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in pairs.items())
    return "{" + inner + "}"


def prometheus_text(snapshots: dict[str, dict[str, Any]]) -> str:
    """Prometheus text exposition of `Runtime.stats` snapshots, keyed by pipeline."""
    lines: list[str] = []
    counters = [
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_request_rejected",
        "nv_inference_request_shed",
        "nv_inference_request_expired",
        "nv_inference_request_superseded",
        "nv_inference_request_bad_input",
        "nv_inference_escalated",
        "edgewise_cascade_failures",
        "nv_inference_fallback",
        "nv_inference_exec_rows",
        "edgewise_nonfinite_scores",
    ]
    for name in counters:
        lines.append(f"# TYPE {name} counter")
        for pipe, snap in snapshots.items():
            lines.append(f"{name}{_labels({'pipeline': pipe})} {snap.get(name, 0)}")
    # Requests waiting in the queue now (Triton's name): a backlog that grows shows a
    # device falling behind before anything expires or is shed.
    lines.append("# TYPE nv_inference_pending_request_count gauge")
    for pipe, snap in snapshots.items():
        pending = snap.get("queued", 0)
        lines.append(f"nv_inference_pending_request_count{_labels({'pipeline': pipe})} {pending}")
    hists: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "nv_inference_queue_duration_ms": lambda s: {"": s["nv_inference_queue_duration_ms"]},
        "nv_inference_compute_infer_duration_ms": lambda s: {
            "": s["nv_inference_compute_infer_duration_ms"]
        },
        "nv_inference_request_duration_ms": lambda s: {"": s["nv_inference_request_duration_ms"]},
        "edgewise_stage_duration_ms": lambda s: s["stage_duration_ms"],
        "edgewise_tier_duration_ms": lambda s: s["tier_duration_ms"],
        "edgewise_confidence": lambda s: {"": s["confidence"]},
        "edgewise_batch_size": lambda s: {"": s["batch_size"]},
    }
    for name, pick in hists.items():
        lines.append(f"# TYPE {name} histogram")
        for pipe, snap in snapshots.items():
            for part, h in pick(snap).items():
                base = {"pipeline": pipe}
                if part:
                    base["stage" if "stage" in name else "tier"] = part
                cumulative = 0
                for bound, count in zip([*h["bounds"], "+Inf"], h["counts"], strict=True):
                    cumulative += count
                    le = bound if bound == "+Inf" else f"{bound:g}"
                    lines.append(f"{name}_bucket{_labels({**base, 'le': str(le)})} {cumulative}")
                lines.append(f"{name}_sum{_labels(base)} {h['sum']}")
                lines.append(f"{name}_count{_labels(base)} {h['count']}")
    return "\n".join(lines) + "\n"
