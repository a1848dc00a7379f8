"""A running pipeline: its lanes (one per model tier), batch execution and results.

`ModelLane.execute` is the hot path: one backend call per batch, vectorised
postprocess, cascade escalation of low-confidence rows, then one metrics update and one
completion per request.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime._degrade import DegradeState, Mode
from edgewise.runtime._errors import InferenceFailed
from edgewise.runtime._metrics import PipelineMetrics
from edgewise.runtime._model import LoadedModel
from edgewise.runtime._scheduler import Executor, Request
from edgewise.runtime._stages import Post, PostFn, PreFn

__all__ = ["InferenceResult", "ModelLane", "RunningPipeline"]

Array = npt.NDArray[Any]


@dataclass(slots=True)
class InferenceResult:
    """What one request gets back: one entry per input row."""

    pipeline: str
    model: str
    tier: str
    labels: list[str | None]
    confidences: list[float | None]
    escalated: list[bool]
    outputs: dict[str, Array]
    topk: list[list[tuple[str, float]]] | None = None
    queue_ms: float = 0.0
    compute_ms: float = 0.0

    @property
    def label(self) -> str | None:
        """Top-1 label of the first row."""
        return self.labels[0] if self.labels else None

    @property
    def confidence(self) -> float | None:
        """Top-1 confidence of the first row."""
        return self.confidences[0] if self.confidences else None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for the HTTP API and sinks."""
        body: dict[str, Any] = {
            "pipeline": self.pipeline,
            "model": self.model,
            "tier": self.tier,
            "labels": self.labels,
            "confidences": self.confidences,
            "escalated": self.escalated,
            "outputs": {k: v.tolist() for k, v in self.outputs.items()},
            "queue_ms": round(self.queue_ms, 4),
            "compute_ms": round(self.compute_ms, 4),
        }
        if self.topk is not None:
            body["topk"] = self.topk
        return body


Escalator = Callable[[Array], tuple[Array, list[str | None]] | None]


class ModelLane:
    """A pipeline bound to one model tier; the unit the executor batches."""

    def __init__(self, pipeline: RunningPipeline, model: LoadedModel, tier: str) -> None:
        self.pipeline = pipeline
        self.model = model
        self.tier = tier
        self.max_batch = pipeline.spec.batching.max_batch
        self.max_queue_delay_s = pipeline.spec.batching.max_queue_delay_ms / 1000.0
        self._run = model.session.run
        self._conf = model.confidence_output
        self._labels = model.info.labels

    def execute(self, batch: list[Request]) -> None:
        """Run a batch end to end and complete its requests."""
        p = self.pipeline
        clock = p.clock
        t0 = clock()
        single = len(batch) == 1
        x = batch[0].x if single else np.concatenate([r.x for r in batch])
        try:
            out = self._run(x)
        except Exception as exc:
            err = InferenceFailed(f"{self.model.key}: {exc}")
            with p.metrics.lock:
                p.metrics.failure += len(batch)
            for r in batch:
                r.fail(err)
            return
        t1 = clock()
        post = Post(out, out.get(self._conf) if self._conf else None, self._labels)
        for fn in p.post:
            fn(post)
        post.finish()
        n = x.shape[0]
        labels = self._labels
        names: list[str | None]
        conf: list[float | None]
        if post.top is not None and post.confidence is not None:
            nl = len(labels)
            names = [labels[i] if i < nl else str(i) for i in post.top.tolist()]
            conf = post.confidence.tolist()
        else:
            names, conf = [None] * n, [None] * n
        if post.accepted is not None:
            for i in np.flatnonzero(~post.accepted).tolist():
                names[i] = post.rejected_label
        escalated = [False] * n
        n_esc = 0
        t2 = clock()
        if p.escalate is not None and post.confidence is not None:
            low = np.flatnonzero(post.confidence < p.cascade_threshold)
            if low.size:
                upper = p.escalate(x[low])
                if upper is not None:
                    c_conf, c_names = upper
                    n_esc = int(low.size)
                    for j, i in enumerate(low.tolist()):
                        escalated[i] = True
                        conf[i] = float(c_conf[j])
                        names[i] = c_names[j]
        t3 = clock()
        compute_ms = (t1 - t0) * 1000.0
        tier, key, pname, topk = self.tier, self.model.key, p.name, post.topk
        results = []
        start = 0
        for r in batch:
            end = start + r.rows
            results.append(
                InferenceResult(
                    pname,
                    key,
                    tier,
                    names[start:end],
                    conf[start:end],
                    escalated[start:end],
                    out if single else {k: v[start:end] for k, v in out.items()},
                    topk[start:end] if topk is not None else None,
                    (t0 - r.enqueued) * 1000.0,
                    compute_ms,
                )
            )
            start = end
        p.metrics.record(
            t3,
            tier,
            n,
            n_esc,
            (compute_ms, (t2 - t1) * 1000.0, (t3 - t2) * 1000.0),
            [(t0 - r.enqueued) * 1000.0 for r in batch],
            [(t3 - r.enqueued) * 1000.0 for r in batch],
            conf,
        )
        for r, res in zip(batch, results, strict=True):
            r.complete(res)
        if p._every:
            p.sample(batch)
        if p.sinks:
            for res in results:
                p.emit(res)


@dataclass(eq=False)
class RunningPipeline:
    """Owner of a pipeline's state; the executor sees it through the `Owner` protocol."""

    spec: PipelineSpec
    executor: Executor
    clock: Callable[[], float]
    pre: Sequence[PreFn]
    post: Sequence[PostFn]
    sinks: list[Any] = field(default_factory=list)
    source: Any = None
    escalate: Escalator | None = None
    cascade_threshold: float = 0.0
    queued: int = 0
    inflight: int = 0
    accepting: bool = True
    degrade: DegradeState = field(default_factory=DegradeState)
    primary: ModelLane = field(init=False)
    fallback: ModelLane | None = field(init=False, default=None)
    metrics: PipelineMetrics = field(init=False)
    samples: deque[tuple[Array, str | None]] = field(default_factory=lambda: deque(maxlen=64))
    _count: int = 0
    _swap_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.name = self.spec.name
        self.rank = self.spec.priority.rank
        self.slo_s = self.spec.slo.p95_ms / 1000.0
        self.capacity = self.spec.batching.queue_capacity
        self.metrics = PipelineMetrics(window_s=self.spec.slo.window_s)
        self._every = round(1 / self.spec.sample_rate) if self.spec.sample_rate > 0 else 0

    @property
    def active(self) -> ModelLane:
        """The lane new requests go to."""
        if self.degrade.mode is Mode.FALLBACK and self.fallback is not None:
            return self.fallback
        return self.primary

    def summary(self) -> dict[str, Any]:
        """One row for listings (`GET /v1/pipelines`)."""
        model = self.active.model
        return {
            "name": self.name,
            "priority": str(self.spec.priority),
            "model": model.key,
            "tier": self.active.tier,
            "mode": str(self.degrade.mode),
            "provider": model.provider,
            "input": {
                "dtype": str(model.session.input.dtype),
                "shape": list(model.session.input.shape),
            },
        }

    def on_shed(self, n: int) -> None:
        """Count shed requests."""
        with self.metrics.lock:
            self.metrics.shed += n

    def on_rejected(self) -> None:
        """Count one rejected request."""
        with self.metrics.lock:
            self.metrics.rejected += 1

    def prepare(self, x: Array, exact_dtype: bool = False) -> tuple[Array, ModelLane]:
        """Preprocess and validate one request against the active model."""
        if self.pre:
            t0 = self.clock()
            for fn in self.pre:
                x = fn(x)
            # Callers' threads run this concurrently: a deque append is atomic.
            self.metrics.pre_ms.append((self.clock() - t0) * 1000.0)
        lane = self.active
        return lane.model.validate(x, exact_dtype), lane

    def sample(self, batch: list[Request]) -> None:
        """Keep every n-th input (the spec's sample rate) for telemetry."""
        if not self._every:
            return
        for r in batch:
            self._count += 1
            if self._count % self._every == 0:
                res = r.result
                self.samples.append((r.x, getattr(res, "label", None)))

    def emit(self, result: InferenceResult) -> None:
        """Hand a result to every sink; a failing sink never fails the request."""
        for sink in self.sinks:
            try:
                sink.emit(result)
            except Exception:  # sinks are I/O at the edge; count, don't propagate
                with self.metrics.lock:
                    self.metrics.stage("sink_errors", 0.0)
