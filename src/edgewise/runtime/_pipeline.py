"""A running pipeline: its lanes (one per model tier), batch execution and results.

`ModelLane.execute` is the hot path: one backend call per batch, vectorised
postprocess, cascade escalation of low-confidence rows, then one metrics update and one
completion per request. A batch that escalates to an upstream server is completed
later, by the escalator's thread, when the server answers or its time is up
(`_Escalation`): the executor goes on with its next batch meanwhile.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime._backend import rejected_input
from edgewise.runtime._degrade import DegradeState, Mode
from edgewise.runtime._errors import BadInput, InferenceFailed, ModelRejectedInput
from edgewise.runtime._metrics import PipelineMetrics
from edgewise.runtime._model import Input, LoadedModel
from edgewise.runtime._request import Request, callers, complete_all
from edgewise.runtime._scheduler import Executor
from edgewise.runtime._stages import Post, PostFn, PreFn

if TYPE_CHECKING:
    from edgewise.runtime._cascade import UpstreamEscalator

__all__ = ["InferenceResult", "ModelLane", "RunningPipeline", "check_fits"]

Array = npt.NDArray[Any]
Answer = tuple[Array, list[str | None]] | None  # an upper tier's (None: no answer)
Escalator = Callable[[Array], Answer]


class _Served:
    """What one executed batch produced, shared by the results of its requests.

    Results slice it on access, so a batch of 32 single-row requests costs one object
    here plus 32 small views, not 32 sets of lists and array slices built up front.
    """

    __slots__ = (
        "compute_ms",
        "confidences",
        "escalated",
        "labels",
        "model",
        "outputs",
        "pipeline",
        "tier",
        "topk",
    )

    def __init__(
        self,
        pipeline: str,
        model: str,
        tier: str,
        labels: list[str | None],
        confidences: list[float | None],
        escalated: list[bool],
        outputs: dict[str, Array],
        topk: list[list[tuple[str, float]]] | None,
        compute_ms: float,
    ) -> None:
        self.pipeline = pipeline
        self.model = model
        self.tier = tier
        self.labels = labels
        self.confidences = confidences
        self.escalated = escalated
        self.outputs = outputs
        self.topk = topk
        self.compute_ms = compute_ms


class InferenceResult:
    """What one request gets back: one entry per input row.

    Attributes (read-only): `pipeline`, `model`, `tier`, `labels`, `confidences`,
    `escalated`, `outputs` (name -> array), `topk` (or None), `queue_ms`, `compute_ms`.
    The per-row lists and arrays are views of the batch the request ran in, cut when
    first read.
    """

    __slots__ = ("_end", "_served", "_start", "_whole", "queue_ms")

    def __init__(self, served: _Served, start: int, end: int, queue_ms: float) -> None:
        self._served = served
        self._start = start
        self._end = end
        # The request was the whole batch: hand out the batch's own lists and arrays.
        self._whole = start == 0 and end == len(served.labels)
        self.queue_ms = queue_ms

    def __repr__(self) -> str:
        return (
            f"InferenceResult(pipeline={self.pipeline!r}, model={self.model!r}, "
            f"tier={self.tier!r}, labels={self.labels!r}, confidences={self.confidences!r})"
        )

    def part(self, start: int, end: int) -> InferenceResult:
        """The result of rows `start:end` of this result (one caller of a group)."""
        a = self._start
        return InferenceResult(self._served, a + start, a + end, self.queue_ms)

    @property
    def pipeline(self) -> str:
        """Name of the pipeline that served the request."""
        return self._served.pipeline

    @property
    def model(self) -> str:
        """Key (`name@version`) of the model that served it."""
        return self._served.model

    @property
    def tier(self) -> str:
        """`primary` or `fallback`."""
        return self._served.tier

    @property
    def compute_ms(self) -> float:
        """Model time of the batch the request ran in."""
        return self._served.compute_ms

    @property
    def labels(self) -> list[str | None]:
        """Top-1 label per row (None when the model has no class scores)."""
        v = self._served.labels
        return v if self._whole else v[self._start : self._end]

    @property
    def confidences(self) -> list[float | None]:
        """Top-1 confidence per row."""
        v = self._served.confidences
        return v if self._whole else v[self._start : self._end]

    @property
    def escalated(self) -> list[bool]:
        """Whether each row was answered by the cascade's upper tier."""
        v = self._served.escalated
        return v if self._whole else v[self._start : self._end]

    @property
    def outputs(self) -> dict[str, Array]:
        """Every model output by name, this request's rows only."""
        out = self._served.outputs
        if self._whole:
            return out
        a, b = self._start, self._end
        return {k: v[a:b] for k, v in out.items()}

    @property
    def topk(self) -> list[list[tuple[str, float]]] | None:
        """Top-k (label, score) pairs per row, when a `topk` stage ran."""
        v = self._served.topk
        return v if v is None or self._whole else v[self._start : self._end]

    @property
    def label(self) -> str | None:
        """Top-1 label of the first row."""
        return self._served.labels[self._start] if self._end > self._start else None

    @property
    def confidence(self) -> float | None:
        """Top-1 confidence of the first row."""
        return self._served.confidences[self._start] if self._end > self._start else None

    def to_json(self, arrays: bool = False) -> dict[str, Any]:
        """JSON-ready form for the HTTP API and sinks.

        Args:
            arrays: leave `outputs` as numpy arrays, for an encoder that writes them
                itself (orjson's OPT_SERIALIZE_NUMPY), instead of nested lists.
        """
        sv = self._served
        outputs = self.outputs
        whole, a, b = self._whole, self._start, self._end
        body: dict[str, Any] = {
            "pipeline": sv.pipeline,
            "model": sv.model,
            "tier": sv.tier,
            "labels": sv.labels if whole else sv.labels[a:b],
            "confidences": sv.confidences if whole else sv.confidences[a:b],
            "escalated": sv.escalated if whole else sv.escalated[a:b],
            "outputs": outputs if arrays else {k: v.tolist() for k, v in outputs.items()},
            # To 0.1 us; round(x, 4) formats through snprintf, this is two float ops.
            "queue_ms": int(self.queue_ms * 1e4 + 0.5) / 1e4,
            "compute_ms": int(sv.compute_ms * 1e4 + 0.5) / 1e4,
        }
        topk = sv.topk if whole or sv.topk is None else sv.topk[a:b]
        if topk is not None:
            body["topk"] = topk
        return body


class _Split:
    """The result of a request whose callers were run one by one (`ModelLane._isolate`).

    It runs as one request per caller (`parts`), and completes the request it splits
    once the last of them completes (an escalation to a server may complete one later,
    in another thread). It answers `part` as an `InferenceResult` does, for the rows of
    one caller: that caller's own result, or its error raised.
    """

    __slots__ = ("_left", "_lock", "_request", "_starts", "parts")

    def __init__(self, lane: ModelLane, request: Request) -> None:
        spans = callers(request)
        self._request = request
        self._starts = [a for a, _ in spans]
        self._left = len(spans)
        self._lock = threading.Lock()
        x, owner, enqueued = request.x, request.owner, request.enqueued
        self.parts = [Request(x[a:b], lane, owner, enqueued, self._done) for a, b in spans]

    def _done(self, part: Request) -> None:
        part.callback = None  # (no cycle through the bound method once it has run)
        with self._lock:
            self._left -= 1
            if self._left:
                return
        self._request.complete(self)

    def part(self, start: int, end: int) -> InferenceResult:
        """The result of the caller whose rows are `start:end`; raises its error."""
        i = bisect.bisect_right(self._starts, start) - 1
        req = self.parts[i]
        if req.error is not None:
            raise req.error
        whole: InferenceResult = req.result
        a = start - self._starts[i]
        return whole.part(a, a + end - start)


def _take(upper: tuple[Array, list[str | None]], low: Array, served: _Served) -> int:
    """Put the upper tier's answer for rows `low` into a batch's results; how many."""
    c_conf, c_names = upper
    names, conf, escalated = served.labels, served.confidences, served.escalated
    for j, i in enumerate(low.tolist()):
        escalated[i] = True
        conf[i] = float(c_conf[j])
        names[i] = c_names[j]
    return int(low.size)


class _Escalation:
    """A batch whose low-confidence rows went to an upstream server: done on its answer.

    The executor hands the rows off (`begin`) and goes on with its next batch; the
    escalator's waiter thread then completes the batch (`finish`) with the upstream's
    answer, or with the local one when the upstream did not answer in time. Nothing on
    the executor waits for a server.
    """

    __slots__ = ("batch", "low", "pipeline", "queue_ms", "results", "served", "stamps")

    def __init__(
        self,
        pipeline: RunningPipeline,
        batch: list[Request],
        results: list[InferenceResult],
        queue_ms: list[float],
        served: _Served,
        low: Array,
        stamps: tuple[float, float, float],
    ) -> None:
        self.pipeline = pipeline
        self.batch = batch
        self.results = results
        self.queue_ms = queue_ms
        self.served = served
        self.low = low
        self.stamps = stamps  # the batch's start, its postprocess's start, and end

    def begin(self, upstream: UpstreamEscalator, rows: Array) -> bool:
        """Hand `rows` to `upstream`; False (nothing handed off) when it refuses them."""
        for r in self.batch:
            # A caller that ran the batch in its own thread (`Executor.run_sync`) waits
            # on this for the result, which now comes from another thread.
            if r._waiter is None:
                r._waiter = waiter = threading.Lock()
                waiter.acquire()
        return upstream.begin(rows, self.finish)

    def finish(self, upper: Answer) -> None:
        """Complete the batch with the upstream's answer (None: the local one stands)."""
        p, batch, served, low = self.pipeline, self.batch, self.served, self.low
        failed = n_esc = 0
        if upper is None:
            failed = int(low.size)
        else:
            n_esc = _take(upper, low, served)
        t0, tp, t2 = self.stamps
        t3 = p.clock()
        p.metrics.record_late(
            t3,
            served.tier,
            len(served.labels),
            n_esc,
            failed,
            (served.compute_ms, (t2 - tp) * 1000.0, (t3 - t2) * 1000.0),
            self.queue_ms,
            (t3 - t0) * 1000.0,
            served.confidences,
        )
        complete_all(batch, self.results)
        # (Its sample count may race the executor's: which row is kept matters little.)
        p.sample(batch)
        if p.sinks:
            for res in self.results:
                p.emit(res)


class ModelLane:
    """A pipeline bound to one model tier; the unit the executor batches."""

    def __init__(self, pipeline: RunningPipeline, model: LoadedModel, tier: str) -> None:
        self.pipeline = pipeline
        self.model = model
        self.tier = tier
        self.max_batch = pipeline.spec.batching.max_batch
        fixed = model.session.fixed_batch
        if fixed is not None:  # batching beyond the model's own batch size gains nothing
            self.max_batch = min(self.max_batch, fixed)
        if not model.rows_aligned:  # its outputs cannot be split among requests
            self.max_batch = 1
        self.max_queue_delay_s = pipeline.spec.batching.max_queue_delay_ms / 1000.0
        self._run = model.session.run
        # A free inner dimension (an image's height, a sequence's length): requests of
        # different shapes can share a batch, and are run as one model call per shape.
        self.ragged = model.ragged
        self._conf = model.confidence_output
        self._labels = model.info.labels
        self._key = model.key

    def _named(
        self, top: Array | None, confidence: Array | None, n: int
    ) -> tuple[list[str | None], list[float | None]]:
        """Top-1 label names and confidences as lists (None each without scores)."""
        if top is None or confidence is None:
            return [None] * n, [None] * n
        labels = self._labels
        nl = len(labels)
        return [labels[i] if i < nl else str(i) for i in top.tolist()], confidence.tolist()

    def _by_shape(self, batch: list[Request]) -> bool:
        """Run requests of different shapes as one batch per shape.

        Shapes go in the order of their first request. Returns False, having run
        nothing, when every request has one shape. (Packed inputs keep their shapes in
        their dtype: requests of one shape have one dtype.)
        """
        shape, dtype = batch[0].x.shape[1:], batch[0].x.dtype
        if all(r.x.shape[1:] == shape and r.x.dtype == dtype for r in batch):
            return False
        groups: dict[tuple[tuple[int, ...], np.dtype[Any]], list[Request]] = {}
        for r in batch:
            groups.setdefault((r.x.shape[1:], r.x.dtype), []).append(r)
        for group in groups.values():
            self.execute(group)
        return True

    def _isolate(self, batch: list[Request]) -> None:
        """Run each caller of a batch the model failed on alone (the error path).

        Onnxruntime fails a whole call for one bad row (an index out of range, a value a
        custom op refuses): run alone, only the callers whose own rows fail it fail. A
        request carrying several callers (an asyncio group) is completed with a
        `_Split`: each caller's own result or error.
        """
        for r in batch:
            if r.n == 1:
                self.execute([r])
                continue
            split = _Split(self, r)
            for part in split.parts:
                self.execute([part])

    def execute(self, batch: list[Request]) -> None:
        """Run a batch end to end and complete its requests."""
        if self.ragged and len(batch) > 1 and self._by_shape(batch):
            return
        p = self.pipeline
        clock = p.clock
        t0 = clock()
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
        try:
            out = self._run(x)
        except Exception as exc:
            if len(batch) > 1 or batch[0].n > 1:
                self._isolate(batch)
                return
            with p.metrics.lock:
                p.metrics.failure += 1
            batch[0].fail(_failure(self._key, exc))
            return
        t1 = tp = clock()
        if p.executor.yield_to_critical(p.rank):
            tp = clock()  # the wait is neither model nor postprocess time
        scores = out.get(self._conf) if self._conf else None
        top: Array | None = None
        confidence: Array | None = None
        topk: list[list[tuple[str, float]]] | None = None
        n = x.shape[0]
        names: list[str | None]
        conf: list[float | None]
        post: Post | None = None
        if p.post or scores is None or scores.ndim != 2:
            post = Post(out, scores, self._labels)
            for fn in p.post:
                fn(post)
            post.finish()
            top, confidence, topk = post.top, post.confidence, post.topk
            names, conf = self._named(top, confidence, n)
        elif n == 1 and p.escalate is None:
            # One row, nothing to escalate: read the scores once as floats rather than
            # make four small numpy calls (argmax, max and two tolist) for one row.
            row = scores[0].tolist()
            best = max(row)
            i = row.index(best)
            names = [self._labels[i] if i < len(self._labels) else str(i)]
            conf = [best]
        else:  # no postprocess stage: what Post.finish would do, without the Post
            top = scores.argmax(axis=1)
            confidence = np.maximum.reduce(scores, axis=1)
            names, conf = self._named(top, confidence, n)
        if post is not None and post.accepted is not None:
            for i in np.flatnonzero(~post.accepted).tolist():
                names[i] = post.rejected_label
        escalated = [False] * n
        compute_ms = (t1 - t0) * 1000.0
        served = _Served(
            p.name, self._key, self.tier, names, conf, escalated, out, topk, compute_ms
        )
        results: list[InferenceResult]
        queue_ms: list[float]
        if len(batch) == 1:  # the lone request (or one group): no per-request loop
            r = batch[0]
            waited = (t0 - r.enqueued) * 1000.0
            queue_ms = [waited] * r.n
            results = [InferenceResult(served, 0, n, waited)]
        else:
            results, queue_ms = [], []
            start = 0
            for r in batch:
                end = start + r.rows
                waited = (t0 - r.enqueued) * 1000.0
                if r.n == 1:
                    queue_ms.append(waited)
                else:
                    queue_ms.extend([waited] * r.n)
                results.append(InferenceResult(served, start, end, waited))
                start = end
        n_esc = 0
        t2 = clock()
        if p.escalate is not None and confidence is not None:
            low = np.flatnonzero(confidence < p.cascade_threshold)
            if low.size:
                upper: Answer
                if p.upstream is not None:  # a server: its answer completes the batch
                    late = _Escalation(p, batch, results, queue_ms, served, low, (t0, tp, t2))
                    if late.begin(p.upstream, x[low]):
                        return
                    upper = None  # refused at once (busy, stuck, closed): ours stand
                else:
                    upper = p.escalate(x[low])
                if upper is None:  # the upper tier could not answer: ours stand
                    p.metrics.cascade_failures += int(low.size)
                else:
                    n_esc = _take(upper, low, served)
        t3 = clock()
        p.metrics.record(
            t3,
            self.tier,
            n,
            n_esc,
            (compute_ms, (t2 - tp) * 1000.0, (t3 - t2) * 1000.0),
            queue_ms,
            (t3 - t0) * 1000.0,
            conf,
        )
        complete_all(batch, results)
        every = p._every
        if every:
            first = batch[0]
            if len(batch) == 1 and first.n == 1:
                # One caller, the usual case: counted here, not in a call per request
                # (1 % of a digits request with telemetry's sample rate on).
                p._count += 1
                if not p._count % every:
                    p.keep(first)
            else:
                p.sample(batch)
        if p.sinks:
            for res in results:
                p.emit(res)


def _failure(key: str, exc: Exception) -> InferenceFailed:
    """The error a request gets when model `key` raised `exc` on its rows alone.

    The model refusing the input's values is the caller's bad input (a 422), anything
    else the runtime's failure (a 500).
    """
    reason = rejected_input(exc)
    if reason is not None:
        return ModelRejectedInput(f"{key} rejected the input: {reason}")
    return InferenceFailed(f"{key}: {exc}")


def _features(x: Array) -> Array:
    """A sampled input as telemetry takes it: an array of numbers per row.

    A packed request (a model with several inputs) gives its inputs' values side by side.
    """
    names = x.dtype.names
    if names is None:
        return x
    return np.concatenate([x[n].reshape(len(x), -1) for n in names], axis=1)


def check_fits(spec: PipelineSpec, model: LoadedModel) -> None:
    """Whether `spec`'s stages can feed `model`.

    Raises:
        ValueError: preprocess stages in front of a model with several inputs (each
            stage takes one tensor).
    """
    if spec.preprocess and model.several_inputs:
        names = ", ".join(repr(i.name) for i in model.session.inputs)
        raise ValueError(
            f"pipeline {spec.name!r}: {model.key} has {len(model.session.inputs)} inputs "
            f"({names}) and preprocess stages take one tensor; send the inputs prepared"
        )


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
    cascade_model: LoadedModel | None = None  # a local cascade's (its rows must fit it)
    # A cascade to a server: the executor hands escalations to it (see `_Escalation`).
    upstream: UpstreamEscalator | None = None
    # An event loop runs this pipeline's requests itself (no thread hand-off) while the
    # executor's typical batch takes less (see `Runtime.submit`).
    inline_max_s: float = 0.0
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
        batching = self.spec.batching
        self.capacity = batching.queue_capacity
        self.drop_oldest = batching.overflow == "drop_oldest"
        self.max_wait_s = (
            math.inf if batching.max_queue_ms is None else batching.max_queue_ms / 1000.0
        )
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
            # A model with several inputs has no one input: requests name them.
            "input": None
            if model.several_inputs
            else {
                "dtype": str(model.session.input.dtype),
                "shape": list(model.session.input.shape),
            },
            "inputs": [
                {"name": i.name, "dtype": str(i.dtype), "shape": list(i.shape)}
                for i in model.session.inputs
            ],
            "max_batch": self.active.max_batch,
            "queue": {
                "queued": self.queued,
                "capacity": self.capacity,
                "overflow": self.spec.batching.overflow,
                "max_queue_ms": self.spec.batching.max_queue_ms,
            },
        }

    def on_shed(self, n: int) -> None:
        """Count shed requests."""
        with self.metrics.lock:
            self.metrics.shed += n

    def on_rejected(self, n: int = 1) -> None:
        """Count rejected requests."""
        with self.metrics.lock:
            self.metrics.rejected += n

    def on_expired(self, n: int, now: float) -> None:
        """Count requests found in the queue past their deadline at `now`.

        For the SLO they never got an answer: each goes into the rolling latency window
        as infinitely late, so a pipeline that expires 5 % or more of its requests
        breaches its p95 and degrades to its fallback, whatever `max_queue_ms` is.
        """
        with self.metrics.lock:
            self.metrics.expired += n
            self.metrics.rolling.add_many(np.full(n, now), np.full(n, np.inf))

    def on_superseded(self, n: int) -> None:
        """Count queued requests dropped for newer ones (`overflow: drop_oldest`)."""
        with self.metrics.lock:
            self.metrics.superseded += n

    def on_failed(self, n: int) -> None:
        """Count requests failed by an error out of their lane (a stage that raised)."""
        with self.metrics.lock:
            self.metrics.failure += n

    def prepare(
        self, x: Input, exact_dtype: bool = False, lane: ModelLane | None = None
    ) -> tuple[Array, ModelLane]:
        """Preprocess and validate one request against `lane` (default: the active one).

        `x` is an array, or the model's inputs by name (a model with several inputs has
        no preprocess stages: see `check_fits`).

        Raises:
            BadInput: the request does not fit the model (counted in `bad_input`).
        """
        try:
            if self.pre:
                if type(x) is not np.ndarray:  # one input, sent by its name
                    x = (lane or self.active).model.unwrap(x)
                t0 = self.clock()
                for fn in self.pre:
                    x = fn(x)
                # Callers' threads run this concurrently: a deque append is atomic.
                self.metrics.pre_ms.append((self.clock() - t0) * 1000.0)
            if lane is None:
                lane = self.active
            return lane.model.validate(x, exact_dtype), lane
        except BadInput:
            self.count_bad_input()
            raise

    def count_bad_input(self) -> None:
        """Count a request that does not fit (or could not even be decoded)."""
        with self.metrics.lock:
            self.metrics.bad_input += 1

    def sample(self, batch: list[Request]) -> None:
        """Keep every n-th input (the spec's sample rate) for telemetry."""
        if not self._every:
            return
        for r in batch:
            if r.n == 1:
                self._count += 1
                if self._count % self._every == 0:
                    self.keep(r)
                continue
            labels = r.result.labels  # a group of callers: sample its rows one by one
            for j in range(r.rows):
                self._count += 1
                if self._count % self._every == 0:
                    self.samples.append((_features(r.x[j : j + 1]), labels[j]))

    def keep(self, r: Request) -> None:
        """Keep one caller's input and its label as a sample."""
        self.samples.append((_features(r.x), getattr(r.result, "label", None)))

    def emit(self, result: InferenceResult) -> None:
        """Hand a result to every sink; a failing sink never fails the request."""
        for sink in self.sinks:
            try:
                sink.emit(result)
            except Exception:  # sinks are I/O at the edge; count, don't propagate
                with self.metrics.lock:
                    self.metrics.stage("sink_errors", 0.0)
