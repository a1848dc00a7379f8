"""Telemetry windows: one aggregator per pipeline turns inferences into window records.

Usage (the agent's loop; the clock is injected, default wall time)::

    agg = WindowAggregator("digits", model="digits-mlp", version="1.0.0",
                           reference=reference_from_manifest(manifest["reference"]),
                           labels=manifest["labels"], policy=EgressPolicy.from_desired(d.egress))
    agg.observe(x, result.confidences, result.labels)      # per served batch (drift, capture)
    agg.observe_stats(runtime.stats("digits"))              # any time; deltas per window
    if agg.due():
        buffer.append(agg.close(resources=readers.read(), uplink={"state": "online"}))

Counts and latency histograms come from the runtime's cumulative `stats()` as deltas
between window boundaries (the hot path records them anyway, so telemetry adds nothing
there); inputs, confidences and predicted classes are counted on the bundle's reference
bins per observed batch. Every record leaves through the egress filter, so what the
caller buffers is already what the policy lets leave the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.agent.telemetry._capture import SampleCapture
from edgewise.agent.telemetry._drift import DriftTracker, KsTracker
from edgewise.drift import DEFAULT_CONFIDENCE_EDGES, DriftReference, Histogram
from edgewise.protocol import EgressPolicy, filter_payload

__all__ = ["COUNT_KEYS", "FLEET_CONFIDENCE_EDGES", "WindowAggregator", "stats_delta"]

Array = npt.NDArray[Any]
NewRecord = tuple[str, str, dict[str, Any], float]  # (cls, kind, data, ts): the buffer's input

# One confidence binning for the whole fleet, so cohorts on different models compare.
FLEET_CONFIDENCE_EDGES: tuple[float, ...] = DEFAULT_CONFIDENCE_EDGES
# Window count name -> the runtime's cumulative counter.
COUNT_KEYS: dict[str, str] = {
    "ok": "nv_inference_request_success",
    "failed": "nv_inference_request_failure",
    "shed": "nv_inference_request_shed",
    "rejected": "nv_inference_request_rejected",
    "expired": "nv_inference_request_expired",
    "superseded": "nv_inference_request_superseded",
    "bad_input": "nv_inference_request_bad_input",
    "escalated": "nv_inference_escalated",
    "fallback": "nv_inference_fallback",
    # rows answered with a NaN or infinite top-1 score: errors for a rollout
    "nonfinite": "edgewise_nonfinite_scores",
    # escalations the upstream or local cascade model could not answer (the local stood)
    "cascade_failures": "edgewise_cascade_failures",
}
_STAGE_KEYS: dict[str, str] = {
    "total": "nv_inference_request_duration_ms",
    "queue": "nv_inference_queue_duration_ms",
    "compute": "nv_inference_compute_infer_duration_ms",
}


def _hist_delta(prev: Mapping[str, Any] | None, cur: Mapping[str, Any]) -> dict[str, Any]:
    counts = list(cur.get("counts", []))
    total = float(cur.get("sum", 0.0))
    if prev and list(prev.get("bounds", [])) == list(cur.get("bounds", [])):
        before = list(prev.get("counts", []))
        if len(before) == len(counts) and all(b <= c for b, c in zip(before, counts, strict=True)):
            counts = [c - b for b, c in zip(before, counts, strict=True)]
            total -= float(prev.get("sum", 0.0))
    return {"counts": counts, "sum": round(max(total, 0.0), 4)}


def stats_delta(prev: Mapping[str, Any] | None, cur: Mapping[str, Any]) -> dict[str, Any]:
    """Window counts and latency histograms between two runtime `stats()` snapshots (pure).

    A counter that went backwards (the pipeline restarted) counts from zero.

    Returns:
        {"counts": {ok, failed, ...}, "latency": {"bounds", "stages": {name: {counts, sum}}},
        "confidence_runtime": {counts, sum}}
    """
    prev = prev or {}
    counts = {}
    for name, key in COUNT_KEYS.items():
        now_v, before = int(cur.get(key, 0)), int(prev.get(key, 0))
        counts[name] = now_v - before if now_v >= before else now_v
    stages: dict[str, Any] = {}
    bounds: list[float] = []
    named = {k: cur[v] for k, v in _STAGE_KEYS.items() if v in cur}
    named.update({k: h for k, h in dict(cur.get("stage_duration_ms", {})).items()})
    prev_named = {k: prev[v] for k, v in _STAGE_KEYS.items() if v in prev}
    prev_named.update(dict(prev.get("stage_duration_ms", {})))
    for stage, hist in named.items():
        bounds = bounds or list(hist.get("bounds", []))
        stages[stage] = _hist_delta(prev_named.get(stage), hist)
    out: dict[str, Any] = {"counts": counts, "latency": {"bounds": bounds, "stages": stages}}
    if "confidence" in cur:
        conf = _hist_delta(prev.get("confidence"), cur["confidence"])
        conf["bounds"] = list(cur["confidence"].get("bounds", []))
        out["confidence_runtime"] = conf
    return out


def _round(values: Sequence[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


class WindowAggregator:
    """Aggregates one pipeline's telemetry per window (default 10 s); not thread-safe."""

    def __init__(
        self,
        pipeline: str,
        *,
        model: str = "",
        version: str = "",
        deployment: str = "",
        reference: DriftReference | None = None,
        labels: Sequence[str] = (),
        policy: EgressPolicy | None = None,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        capture_seed: int | None = None,
    ) -> None:
        """Start the first window now (by `clock`)."""
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.pipeline = pipeline
        self.deployment = deployment
        self.window_s = window_s
        self.clock = clock
        self.policy = policy or EgressPolicy()
        self.capture = SampleCapture(pipeline, self.policy, clock, seed=capture_seed)
        self.last_drift_score: float | None = None
        self._alarmed = False
        self._start = clock()
        self._window_stats: Mapping[str, Any] | None = None
        self._latest_stats: Mapping[str, Any] | None = None
        self._samples: list[dict[str, Any]] = []
        self._conf = Histogram(FLEET_CONFIDENCE_EDGES)
        self._observed = 0
        self._pending: list[tuple[Array, Sequence[Any], Sequence[Any]]] = []
        self._pending_rows = 0
        self.flush_rows = 256
        self.target_rows = 1000
        self._offered = 0
        self._stride = 1
        self.set_model(model, version, reference, labels)

    # -- configuration ----------------------------------------------------------------

    def set_model(
        self,
        model: str,
        version: str,
        reference: DriftReference | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        """Switch the model the window describes (close the window first on a hot swap)."""
        self.model, self.version = model, version
        self.reference = reference
        self._label_index = {str(lab): i for i, lab in enumerate(labels)}
        self.drift = DriftTracker(reference) if reference is not None else None
        self.ks = KsTracker() if reference is None else None

    def set_policy(self, policy: EgressPolicy) -> None:
        """Apply a new egress policy from the next record on (capture budget kept)."""
        self.policy = policy
        self.capture.policy = policy

    # -- observation ------------------------------------------------------------------

    def _class_indices(self, predicted: Sequence[Any] | Array) -> tuple[Array, Array]:
        """Predicted classes as indices, and a mask of rows that map to a known class."""
        arr = np.asarray(predicted)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64), np.ones(arr.shape[0], dtype=bool)
        idx = np.array([self._label_index.get(str(p), -1) for p in arr.tolist()], dtype=np.int64)
        return idx, idx >= 0

    def observe(
        self,
        inputs: Array,
        confidences: Sequence[float | None] | Array,
        predicted: Sequence[Any] | Array,
        fields: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Count one served batch: inputs [N, ...], top-1 confidence and predicted class.

        Args:
            inputs: The model inputs, one row per inference.
            confidences: Top-1 confidence per row (None where unknown).
            predicted: Predicted class per row, as index or label.
            fields: Structured raw inputs per row, captured instead of `inputs` when
                given (so redaction can name fields).
        """
        x = np.asarray(inputs)
        x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        conf = np.array([np.nan if c is None else float(c) for c in confidences])
        if x.shape[0] != conf.shape[0]:
            raise ValueError("inputs and confidences differ in length")
        self._conf.add(conf)
        self._observed += int(x.shape[0])
        if self.drift is not None:
            # Rows without a confidence (the runtime's sampled inputs) still count for
            # features and class prior; the drift monitor skips NaN in the confidence bins.
            classes, known = self._class_indices(predicted)
            n_classes = self.drift.reference.n_classes
            known &= (classes >= 0) & (classes < n_classes)
            if x.shape[1] == self.drift.reference.n_features and known.any():
                self.drift.observe(x[known], conf[known], classes[known])
        elif self.ks is not None:
            self.ks.observe(x)
        if self.policy.allows("samples"):
            labels = [None if p is None else str(p) for p in np.asarray(predicted).tolist()]
            rows: Sequence[Any] | Array = fields if fields is not None else x
            confs = [None if np.isnan(c) else float(c) for c in conf]
            self._samples += self.capture.offer(
                rows, confs, labels, self.last_drift_score, self.model_key
            )

    def record(self, inputs: Array, confidences: Sequence[Any], predicted: Sequence[Any]) -> None:
        """Offer one served request for drift and confidence counting (hot path: cheap).

        Drift needs a few hundred inferences per window, not every one: requests are
        taken at a stride chosen from the previous window's volume so that about
        `target_rows` are counted per window (all of them on a quiet pipeline). Taken
        rows are counted in one vectorised `observe` per `flush_rows` and at close.
        """
        self._offered += 1
        if self._offered % self._stride:
            return
        self._pending.append((inputs, confidences, predicted))
        self._pending_rows += len(confidences)
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Count the queued requests now."""
        if not self._pending:
            return
        # A busy first window would be counted in full; widen the stride as soon as the
        # rate shows (once per flush, so the clock is read rarely).
        elapsed = self.clock() - self._start
        if elapsed > 0:
            projected = self._offered * self.window_s / elapsed
            self._stride = max(self._stride, int(projected // self.target_rows))
        pending, self._pending, self._pending_rows = self._pending, [], 0
        x = np.concatenate([np.asarray(p[0]).reshape(len(p[1]), -1) for p in pending])
        conf = [c for p in pending for c in p[1]]
        pred = [c for p in pending for c in p[2]]
        self.observe(x, conf, pred)

    def observe_stats(self, stats: Mapping[str, Any]) -> None:
        """Note the runtime's cumulative `stats(name)`; windows report deltas."""
        if self._window_stats is None:
            self._window_stats = stats
        self._latest_stats = stats

    @property
    def model_key(self) -> str:
        """`name@version` of the model the window describes."""
        return f"{self.model}@{self.version}" if self.version else self.model

    # -- closing ----------------------------------------------------------------------

    def due(self, now: float | None = None) -> bool:
        """Whether the current window has run its length."""
        return (self.clock() if now is None else now) - self._start >= self.window_s

    def take_samples(self) -> list[NewRecord]:
        """Captured samples so far (already filtered), to buffer without waiting."""
        ts = self.clock()
        out = [("sample", "input", s, ts) for s in self._samples]
        self._samples = []
        return out

    def close(
        self,
        now: float | None = None,
        *,
        resources: Mapping[str, Any] | None = None,
        queues: Mapping[str, Any] | None = None,
        uplink: Mapping[str, Any] | None = None,
    ) -> list[NewRecord]:
        """Close the window; returns its records (window metric, drift events, samples).

        Everything returned has passed the egress filter; records the policy refuses
        entirely are left out.
        """
        end = self.clock() if now is None else now
        self.flush()
        data: dict[str, Any] = {
            "pipeline": self.pipeline,
            "model": self.model,
            "version": self.version,
            "start": round(self._start, 3),
            "end": round(end, 3),
        }
        if self.deployment:
            data["deployment"] = self.deployment
        events: list[NewRecord] = []
        if self._latest_stats is not None:
            delta = stats_delta(self._window_stats, self._latest_stats)
            data["counts"] = delta["counts"]
            data["latency"] = delta["latency"]
            if not self._conf.counts.sum() and "confidence_runtime" in delta:
                rc = delta["confidence_runtime"]
                data["confidence"] = {"edges": [0.0, *rc["bounds"], 1.0], "counts": rc["counts"]}
            q = dict(queues or {})
            q.setdefault("queued", int(self._latest_stats.get("queued", 0) or 0))
            data["queues"] = q
        elif queues:
            data["queues"] = dict(queues)
        if self._conf.counts.sum():
            data["confidence"] = self._conf.to_dict()
        if self.drift is not None:
            dw = self.drift.close()
            rep = dw.report
            data["features"] = dw.counts.to_dict()
            data["drift"] = {
                "score": round(rep.score, 6),
                "threshold": rep.threshold,
                "samples": rep.samples,
                "sufficient": rep.sufficient,
                "drifted": rep.drifted,
                "psi_mean": round(rep.feature_psi_mean, 6),
                "psi_max": round(rep.feature_psi_max, 6),
                "confidence_js": round(rep.confidence_js, 6),
                "confidence_psi": round(rep.confidence_psi, 6),
                "prior_js": round(rep.prior_js, 6),
                "components": {k: round(v, 6) for k, v in rep.components.items()},
                "feature_psi": _round(rep.feature_psi, 5),
            }
            if rep.sufficient:
                self.last_drift_score = rep.score
                events += self._alarm(rep.drifted, rep.score, rep.components, end)
        elif self.ks is not None:
            ks = self.ks.close()
            if ks is not None:
                data["ks"] = ks
                events += self._alarm(bool(ks["drifted"]), float(ks["d_max"]), {}, end)
        if resources is not None:
            data["resources"] = dict(resources)
        if uplink is not None:
            data["uplink"] = dict(uplink)
        records: list[NewRecord] = [("metric", "window", data, end), *events]
        records += [("sample", "input", s, end) for s in self._samples]
        self._reset(end)
        return self._egress(records)

    def _alarm(
        self, drifted: bool, score: float, components: Mapping[str, float], ts: float
    ) -> list[NewRecord]:
        if drifted == self._alarmed:
            return []
        self._alarmed = drifted
        body = {
            "pipeline": self.pipeline,
            "model": self.model,
            "version": self.version,
            "score": round(score, 6),
            "components": {k: round(v, 6) for k, v in components.items()},
        }
        return [("event", "drift.alarm" if drifted else "drift.cleared", body, ts)]

    def _reset(self, start: float) -> None:
        # Requests offered this window set the sampling stride of the next one.
        self._stride = max(1, self._offered // self.target_rows)
        self._offered = 0
        self._start = start
        self._window_stats = self._latest_stats
        self._samples = []
        self._conf.reset()
        self._observed = 0

    def _egress(self, records: list[NewRecord]) -> list[NewRecord]:
        out = []
        for cls, kind, data, ts in records:
            kept = filter_payload(self.policy, cls, kind, data)
            if kept is not None:
                out.append((cls, kind, kept, ts))
        return out
