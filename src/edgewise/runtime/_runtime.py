"""The `Runtime`: loads models, runs pipelines, degrades gracefully, swaps models hot.

The clock, the thermal and CPU readers and the provider preference are passed in, so
tests drive degradation with injected pressure and no sleeping.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime import _sinks, _sources  # noqa: F401  (registers the built-ins)
from edgewise.runtime._aio import LoopBatchers
from edgewise.runtime._backend import CPU, DEFAULT_PROVIDERS
from edgewise.runtime._cascade import UpstreamEscalator, make_escalator
from edgewise.runtime._degrade import (
    Mode,
    Observation,
    read_cpu_percent,
    read_thermal_c,
    reading,
    step,
)
from edgewise.runtime._errors import (
    AcceleratorUnavailable,
    BadInput,
    RuntimeFailure,
    UnknownPipeline,
)
from edgewise.runtime._loader import ModelSource, load_model
from edgewise.runtime._model import (
    HealthResult,
    Input,
    LoadedModel,
    ModelInfo,
    cast_fitting,
    castable,
    health_check,
    input_mismatch,
)
from edgewise.runtime._pipeline import InferenceResult, ModelLane, RunningPipeline, check_fits
from edgewise.runtime._request import Stacked
from edgewise.runtime._scheduler import Executor, Request
from edgewise.runtime._stages import POSTPROCESS, PREPROCESS, SINKS, SOURCES

__all__ = ["Runtime", "RuntimeEvent"]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class RuntimeEvent:
    """A discrete runtime event (degradation switch, hot swap, start, stop)."""

    time: float
    pipeline: str
    kind: str
    reason: str
    detail: dict[str, Any]


class Runtime:
    """Hosts pipelines on this device's executors. Thread-safe; close() when done."""

    def __init__(
        self,
        cores: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        thermal_reader: Callable[[], float | None] = read_thermal_c,
        cpu_reader: Callable[[], float | None] = read_cpu_percent,
        providers_preference: Sequence[str] = DEFAULT_PROVIDERS,
        on_event: Callable[[RuntimeEvent], None] | None = None,
        monitor_interval_s: float | None = 1.0,
        shed_fraction: float = 0.5,
        critical_hold_ms: float = 2.0,
        inline_async_max_ms: float = 5.0,
        allow_spinning: bool = True,
        gil_switch_interval_s: float | None = None,
    ) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.clock = clock
        self._thermal = thermal_reader
        self._cpu = cpu_reader
        self._preference = tuple(providers_preference)
        self._on_event = on_event
        self._shed_fraction = shed_fraction
        # How long a lower-priority submitter waits at most for running critical work to
        # finish before it is admitted (see the scheduler); 0 turns the wait off.
        self._critical_hold_s = critical_hold_ms / 1000.0
        self._inline_max_s = inline_async_max_ms / 1000.0
        self._spinning = allow_spinning
        self._executors: dict[str, Executor] = {}
        # Threads running an event loop that calls this runtime: never made to wait for
        # critical work (they serve critical clients too). Shared by every executor.
        self._loop_threads: set[int] = set()
        self._pipelines: dict[str, RunningPipeline] = {}
        self._events: list[RuntimeEvent] = []
        self._batchers = LoopBatchers(self)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # Process-wide and opt-in: a shorter GIL switch interval lets a critical caller
        # that the worker just completed run again sooner when other Python threads are
        # busy (CPython's default is 5 ms). Restored on close().
        self._old_switch: float | None = None
        if gil_switch_interval_s is not None:
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(gil_switch_interval_s)
        if monitor_interval_s:
            self._monitor = threading.Thread(
                target=self._monitor_loop, args=(monitor_interval_s,), daemon=True
            )
            self._monitor.start()

    # -- models -----------------------------------------------------------------------

    def load_model(
        self,
        source: ModelSource,
        manifest: Any = None,
        *,
        require_accelerator: bool = False,
        warmup: int = 3,
    ) -> LoadedModel:
        """Create a session from ONNX/TFLite bytes, a model file, or a bundle directory.

        A bundle directory is read with its `manifest` (or its `manifest.json`). The
        session gets this runtime's cores and provider preference and is warmed up with
        `warmup` zero batches before it is returned.

        Raises:
            ModelLoadError: unreadable model, or AcceleratorUnavailable.
        """
        return load_model(
            source,
            manifest,
            cores=self.cores,
            preference=self._preference,
            require_accelerator=require_accelerator,
            allow_spinning=self._spinning,
            warmup=warmup,
        )

    def health_check(self, model: LoadedModel, manifest: Any = None) -> HealthResult:
        """Run the manifest's health samples on `model` (the install gate)."""
        info = ModelInfo.from_manifest(manifest) if manifest is not None else model.info
        return health_check(model, info)

    # -- pipelines --------------------------------------------------------------------

    def _executor(self, provider: str) -> Executor:
        name = "cpu" if provider == CPU else provider.removesuffix("ExecutionProvider").lower()
        ex = self._executors.get(name)
        if ex is None:
            ex = self._executors[name] = Executor(
                name,
                self.clock,
                self._shed_fraction,
                critical_hold_s=self._critical_hold_s,
                loop_threads=self._loop_threads,
            )
        return ex

    def start_pipeline(
        self,
        spec: PipelineSpec,
        model: LoadedModel,
        fallback: LoadedModel | None = None,
        cascade_model: LoadedModel | None = None,
    ) -> None:
        """Start serving `spec` with `model` (and its optional fallback and cascade tier).

        Raises:
            ValueError: an unknown stage name or bad stage parameters, a name in use,
                stages that cannot feed a model, or a fallback or local cascade model
                that does not take the model's inputs.
            RuntimeError: the runtime was closed (its executors would never run the
                pipeline's requests).
        """
        if self._stop.is_set():
            raise RuntimeError(f"pipeline {spec.name!r}: the runtime is closed")
        _check_accelerator(spec, model)
        for m in (model, fallback):
            if m is not None:
                check_fits(spec, m)
                _check_cascade(spec.name, cascade_model, m)
        if fallback is not None and not _takes_inputs_of(fallback, model):
            # Degraded, the pipeline would turn away every request its clients send.
            raise ValueError(
                f"pipeline {spec.name!r}: the fallback model {fallback.key} takes other "
                f"inputs than {model.key} (under pressure it is given the same requests)"
            )
        pre = [PREPROCESS.build(s.type, s.params) for s in spec.preprocess]
        post = [POSTPROCESS.build(s.type, s.params) for s in spec.postprocess]
        if spec.name in self._pipelines:
            raise ValueError(f"pipeline {spec.name!r} is already running")
        p = RunningPipeline(spec, self._executor(model.provider), self.clock, pre, post)
        p.cascade_model = cascade_model
        # (A batch escalating to an upstream server does not wait for it: it may run in
        # an event loop's thread like any other.)
        p.inline_max_s = self._inline_max_s
        p.primary = ModelLane(p, model, "primary")
        if fallback is not None:
            p.fallback = ModelLane(p, fallback, "fallback")
        try:
            if spec.cascade is not None:
                p.cascade_threshold = spec.cascade.threshold
                p.escalate = make_escalator(spec, cascade_model)
                if isinstance(p.escalate, UpstreamEscalator):
                    p.upstream = p.escalate
            for s in spec.sinks:  # I/O (broker connections) outside the runtime lock
                p.sinks.append(SINKS.build(s.type, s.params, spec.name))
            with self._lock:
                if spec.name in self._pipelines:
                    raise ValueError(f"pipeline {spec.name!r} is already running")
                self._pipelines[spec.name] = p
        except Exception:
            _close_parts(p)
            raise
        try:
            p.source = SOURCES.build(spec.source.type, spec.source.params, self, spec.name)
            p.source.start()
        except Exception:
            with self._lock:
                self._pipelines.pop(spec.name, None)
            _close_parts(p)
            raise
        self._event(spec.name, "pipeline_started", f"serving {model.key}", {"model": model.key})

    def _get(self, name: str) -> RunningPipeline:
        p = self._pipelines.get(name)
        if p is None:
            raise UnknownPipeline(f"no pipeline named {name!r}")
        return p

    def swap_model(self, name: str, new_model: LoadedModel, tier: str = "primary") -> str:
        """Replace a tier's model while requests flow; returns the old model's key.

        The new model must already be loaded and warmed (load_model does both). Queued
        requests finish on the lane they were admitted to, so none fails or is lost.

        Raises:
            UnknownPipeline: no pipeline by that name.
            AcceleratorUnavailable: a primary model on the CPU for a pipeline that
                requires an accelerator (as `start_pipeline` refuses it): the old model
                keeps serving.
            ValueError: a tier other than primary or fallback, or a model the pipeline
                cannot feed, or whose rows its local cascade model cannot take (every
                escalation would fail): the old model keeps serving.
        """
        if tier not in ("primary", "fallback"):
            raise ValueError(f"tier must be 'primary' or 'fallback', not {tier!r}")
        p = self._get(name)
        if tier == "primary":
            _check_accelerator(p.spec, new_model)
        check_fits(p.spec, new_model)
        _check_cascade(name, p.cascade_model, new_model)
        with p._swap_lock:
            if tier == "fallback":
                old = p.fallback.model.key if p.fallback else "none"
                p.fallback = ModelLane(p, new_model, "fallback")
            else:
                old = p.primary.model.key
                p.primary = ModelLane(p, new_model, "primary")
        self._event(name, "model_swapped", f"{old} -> {new_model.key}", {"tier": tier})
        return old

    def swap_models(
        self, name: str, primary: LoadedModel, fallback: LoadedModel | None = None
    ) -> None:
        """Replace the primary model, and the fallback with it, checking both first.

        An update that changes both must not leave half of it in place: when either is
        refused (see `swap_model`), neither changes and the old models keep serving.
        """
        p = self._get(name)
        _check_accelerator(p.spec, primary)
        for model in (primary, fallback):
            if model is not None:
                check_fits(p.spec, model)
                _check_cascade(name, p.cascade_model, model)
        if fallback is not None:
            self.swap_model(name, fallback, tier="fallback")
        self.swap_model(name, primary)

    def stop_pipeline(self, name: str, drain_timeout: float = 10.0) -> None:
        """Stop accepting work, finish what is queued, stop the source, close sinks."""
        p = self._get(name)
        p.accepting = False
        if p.source is not None:
            p.source.stop()
        p.executor.drain(p, drain_timeout)
        # What did not drain in time is not run on closed sinks later: failed now.
        p.executor.cancel(p, f"pipeline {name!r} stopped before the request was served")
        with self._lock:
            self._pipelines.pop(name, None)
        _close_parts(p)
        self._event(name, "pipeline_stopped", "stopped", {})

    def pipelines(self) -> list[dict[str, Any]]:
        """A summary row per running pipeline."""
        return [p.summary() for p in list(self._pipelines.values())]

    # -- inference --------------------------------------------------------------------

    def add_loop_thread(self, tid: int) -> None:
        """Mark thread `tid` as running an event loop: it never waits for critical work.

        The asyncio entry points (`infer_async`, the local inference API) call this when
        they first see a loop in a thread. A thread id the system later reuses for a
        plain thread only spares that thread the (courtesy) wait.
        """
        self._loop_threads.add(tid)

    def infer(
        self, name: str, x: Input, *, exact_dtype: bool = False, timeout: float | None = None
    ) -> InferenceResult:
        """Run one request (one row or a batch of rows) through pipeline `name`.

        `x` is an array, or the model's inputs by name (`{"ids": ..., "mask": ...}`, as
        a model with several inputs needs them). With `timeout` (seconds), the call gives
        up then with `Expired`, and the request is not run if it is still queued by then.

        Raises:
            ValueError: `timeout` is not a number of seconds >= 0.
            UnknownPipeline, BadInput, Rejected, Shed, Expired, Superseded,
            PipelineStopped, InferenceFailed.
        """
        p = self._pipelines.get(name)
        if p is None:
            raise UnknownPipeline(f"no pipeline named {name!r}")
        x, lane = p.prepare(x, exact_dtype)
        req = Request(x, lane, p, self.clock())
        if timeout is not None:  # nobody waits for it after that: do not run it then
            if not timeout >= 0:  # -1 is "forever" to the lock waited on, NaN an error
                raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
            req.bound_wait(timeout)
        result: InferenceResult = p.executor.run_sync(req, timeout)
        return result

    async def infer_async(
        self,
        name: str,
        x: Input,
        *,
        exact_dtype: bool = False,
        max_queue_s: float | None = None,
    ) -> InferenceResult:
        """`infer` for asyncio code: requests made in one loop turn are batched together.

        `max_queue_s` bounds this request's wait in the queue (see `submit`).

        Raises:
            UnknownPipeline, BadInput, Rejected, Shed, Expired, Superseded,
            PipelineStopped, InferenceFailed.
        """
        if max_queue_s is not None:  # submitted on its own: a group shares one deadline
            return await self._batchers.current().infer(
                name, x, exact_dtype, max_queue_s=max_queue_s
            )
        group, i = self._batchers.current().join(name, x, exact_dtype)
        try:
            await group.fut
        except asyncio.CancelledError:  # maybe another member's: see `wait_again`
            await group.wait_again()
        return group.outcome(i)

    def submit(
        self,
        name: str,
        x: Input,
        callback: Callable[[Request], None],
        *,
        exact_dtype: bool = False,
        inline: bool = False,
        ctx: Any = None,
        max_queue_s: float | None = None,
    ) -> Request:
        """Queue a request and return at once; `callback(request)` runs on completion.

        With `inline`, an idle executor runs a fast model's request in the calling thread
        (the HTTP API does this from its event loop for sub-`inline_async_max_ms` models).
        `ctx` is stored on the request before it can complete (e.g. an asyncio future).
        `max_queue_s` tightens the pipeline's `max_queue_ms` for this request: if it is
        still queued after that long, it fails with `Expired` and is not run.

        Raises:
            ValueError: `max_queue_s` is not a number of seconds > 0.
            UnknownPipeline, BadInput, Rejected, Shed, PipelineStopped: at admission.
        """
        if max_queue_s is not None and not max_queue_s > 0:  # NaN too
            raise ValueError(f"max_queue_s must be a number of seconds > 0, not {max_queue_s!r}")
        p = self._pipelines.get(name)
        if p is None:
            raise UnknownPipeline(f"no pipeline named {name!r}")
        x, lane = p.prepare(x, exact_dtype)
        req = Request(x, lane, p, self.clock(), callback, ctx)
        if max_queue_s is not None:
            req.bound_wait(max_queue_s)
        p.executor.submit(req, inline and p.executor.typical_batch_s < p.inline_max_s)
        return req

    def submit_group(
        self,
        name: str,
        xs: Sequence[tuple[Input, bool]],
        callback: Callable[[Request], None],
        *,
        inline: bool = True,
    ) -> tuple[list[Request], list[tuple[int, int, int] | BaseException] | int]:
        """Submit many callers' inputs (each `(array, exact_dtype)`) as stacked requests.

        The callers' rows are validated one by one and stacked into as few requests as
        the lane's `max_batch` (and the queue's capacity) allow; each such request counts
        as its callers (`Request.n`) for admission and metrics. This is how an event loop
        batches the requests of one loop turn without one Request, admission and
        completion per caller. An idle executor runs a fast model's group in the calling
        thread. `callback` runs once per stacked request, when it completes or fails.

        Returns:
            The stacked requests, and per input either `(request index, first row, end
            row)` or the `BadInput` it was refused with; or, when every input was one
            valid row, the number of inputs per request (`step`: input `i` is row
            `i % step` of request `i // step`).

        Raises:
            UnknownPipeline: no pipeline by that name.
        """
        p = self._pipelines.get(name)
        if p is None:
            raise UnknownPipeline(f"no pipeline named {name!r}")
        now = self.clock()
        lane = p.active
        model = lane.model
        # The common case (no preprocess, the model's dtype, batched rows of the fixed
        # shape) is checked inline; anything else takes the full validation path.
        fast = not p.pre and not model.several_inputs
        dtype, fixed, ndim = model.session.input.dtype, model.fixed_shape, model.input_ndim
        max_rows, max_callers = lane.max_batch, max(1, p.capacity)
        if fast and len(xs) > 1:
            stacked = _single_rows(xs, dtype, fixed, ndim)
            if stacked is not None:  # the usual group: checked and stacked at once
                step = min(max_rows, max_callers)
                stacks = [
                    Request(stacked[i : i + step], lane, p, now, callback, n=min(step, len(xs) - i))
                    for i in range(0, len(xs), step)
                ]
                ex = p.executor
                ex.submit_many(stacks, inline and ex.typical_batch_s < p.inline_max_s)
                return stacks, step
        slots: list[tuple[int, int, int] | BaseException] = []
        reqs: list[Request] = []
        parts: list[Array] = []
        rows = 0
        ragged = lane.ragged  # inputs of other inner shapes are never stacked together
        for x, exact in xs:
            if not (
                fast
                and type(x) is np.ndarray
                # builtin dtypes are singletons: `is` settles the usual case
                and ((xd := x.dtype) is dtype or xd == dtype)
                and x.ndim == ndim
                and x.shape[1:] == fixed
            ):
                try:
                    x, _ = p.prepare(x, exact, lane)
                except BadInput as exc:  # counted by prepare
                    slots.append(exc)
                    continue
                except Exception as exc:  # a stage an app registered: this caller's alone
                    with p.metrics.lock:
                        p.metrics.failure += 1
                    slots.append(RuntimeFailure(f"a preprocess stage failed: {exc!r}"))
                    continue
            k = len(x)
            if not k:
                slots.append(BadInput("empty batch"))
                continue
            if (
                parts
                and (
                    rows + k > max_rows
                    or len(parts) >= max_callers
                    or (
                        ragged  # (packed inputs keep their shapes in their dtype)
                        and (x.shape[1:] != parts[0].shape[1:] or x.dtype != parts[0].dtype)
                    )
                )
            ):
                reqs.append(_stacked(parts, lane, p, now, callback))
                parts, rows = [], 0
            slots.append((len(reqs), rows, rows + k))
            parts.append(x)
            rows += k
        if parts:
            reqs.append(_stacked(parts, lane, p, now, callback))
        if reqs:
            ex = p.executor
            ex.submit_many(reqs, inline and ex.typical_batch_s < p.inline_max_s)
        return reqs, slots

    def count_bad_input(self, name: str) -> None:
        """Count an undecodable request (body or headers) in pipeline `name`'s bad input.

        A request that does not fit the model is counted there by the pipeline itself.
        """
        p = self._pipelines.get(name)
        if p is not None:
            p.count_bad_input()

    def stats(self, name: str) -> dict[str, Any]:
        """Counters and histograms of one pipeline, plus its current mode."""
        p = self._get(name)
        snap = p.metrics.snapshot()
        p95 = p.metrics.p95(self.clock())
        snap.update(
            pipeline=name,
            mode=str(p.degrade.mode),
            model=p.active.model.key,
            queued=p.queued,
            executor_batch_ms=p.executor.typical_batch_s * 1000.0,
            # None without requests in the window, or with 5 % or more of them expired.
            p95_ms=None if p95 is None or math.isinf(p95) else p95,
        )
        return snap

    def prometheus(self) -> str:
        """Every pipeline's metrics in the Prometheus text format (for `/metrics`)."""
        from edgewise.runtime._metrics import prometheus_text

        return prometheus_text({name: self.stats(name) for name in list(self._pipelines)})

    def summaries(self, name: str, reset: bool = True) -> list[dict[str, Any]]:
        """Windowed counts of the pipeline's `summary` sinks (for telemetry)."""
        return [s.snapshot(reset) for s in self._get(name).sinks if hasattr(s, "snapshot")]

    def source(self, name: str) -> Any:
        """The pipeline's running source object (for its counters)."""
        return self._get(name).source

    def sampled_inputs(self, name: str) -> list[tuple[Array, str | None]]:
        """Inputs kept at the spec's sample rate, with their labels (for telemetry)."""
        return list(self._get(name).samples)

    # -- degradation and events -------------------------------------------------------

    def events(self) -> list[RuntimeEvent]:
        """Every event so far, oldest first."""
        with self._lock:
            return list(self._events)

    def _event(self, pipeline: str, kind: str, reason: str, detail: dict[str, Any]) -> None:
        ev = RuntimeEvent(self.clock(), pipeline, kind, reason, detail)
        with self._lock:
            self._events.append(ev)
            del self._events[:-1000]
        if self._on_event is not None:
            self._on_event(ev)

    def tick(self) -> list[RuntimeEvent]:
        """Evaluate one monitor window for every pipeline; returns the switch events."""
        # A reader that fails is no reading; the others (and the SLO) still count.
        thermal, cpu = reading(self._thermal), reading(self._cpu)
        now = self.clock()
        out = []
        for p in list(self._pipelines.values()):
            if p.fallback is None:
                continue
            obs = Observation(p.metrics.p95(now), cpu, thermal)
            state, reason = step(p.degrade, obs, p.spec.degradation, p.spec.slo.p95_ms)
            before = p.degrade.mode
            p.degrade = state
            if reason is not None:
                kind = "degraded" if state.mode is Mode.FALLBACK else "recovered"
                to = p.active.model.key
                self._event(
                    p.name, kind, reason, {"from": str(before), "to": str(state.mode), "model": to}
                )
                out.append(self._events[-1])
        return out

    def _monitor_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:  # a broken reader must not kill the monitor
                continue

    # -- executor control, shutdown ---------------------------------------------------

    def pause(self) -> None:
        """Hold every executor after its current batch (requests queue up)."""
        for ex in self._executors.values():
            ex.pause()

    def resume(self) -> None:
        """Let executors serve their queues again."""
        for ex in self._executors.values():
            ex.resume()

    def close(self) -> None:
        """Stop every pipeline and executor."""
        self._stop.set()
        for name in list(self._pipelines):
            self.stop_pipeline(name, drain_timeout=2.0)
        for ex in self._executors.values():
            ex.close()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _takes_inputs_of(model: LoadedModel, other: LoadedModel) -> bool:
    """Whether `model` can run the rows `other` was given.

    `other`'s inputs are checked as a manifest's against `model`'s (`input_mismatch`), by
    name only when there are several, and with any batch size (a model with a fixed one
    runs any rows in calls of it).
    """
    own = model.session.inputs
    several = len(own) > 1
    given = [
        (i.name if several else own[0].name, str(i.dtype), (None, *i.shape[1:]))
        for i in other.session.inputs
    ]
    return input_mismatch(given, own) is None


def _check_accelerator(spec: PipelineSpec, model: LoadedModel) -> None:
    """Whether `model` may serve `spec` as its primary model.

    The fallback tier is not held to it: it is what the pipeline degrades to.

    Raises:
        AcceleratorUnavailable: the spec requires an accelerator and the model's
            session runs on the CPU (onnxruntime fell back to it silently, say).
    """
    if spec.requires_accelerator and model.provider == CPU:
        raise AcceleratorUnavailable(
            f"pipeline {spec.name!r} requires an accelerator; {model.key} runs on {CPU}"
        )


def _check_cascade(name: str, cascade_model: LoadedModel | None, model: LoadedModel) -> None:
    """Whether the local cascade model can take the rows `model` is given.

    Raises:
        ValueError: it cannot: every escalation from `model`'s lane would fail.
    """
    if cascade_model is not None and not _takes_inputs_of(cascade_model, model):
        raise ValueError(
            f"pipeline {name!r}: the cascade model {cascade_model.key} takes other "
            f"inputs than {model.key} (it is given the rows the model was given)"
        )


def _single_rows(
    xs: Sequence[tuple[Input, bool]], dtype: np.dtype[Any], fixed: tuple[int, ...], ndim: int
) -> Array | None:
    """Every caller's input stacked, when each is one row of the model's shape, or None.

    With one row each and one dtype among them, one `np.concatenate` checks a whole
    group: it refuses inputs of other ranks, and the result's shape shows any other
    shape. Numbers that need a cast (JSON's float64) are cast once for the group,
    unless a caller asked for its exact dtype (raw tensors). Anything else takes the
    caller-by-caller path, which says what is wrong with each.
    """
    first = getattr(xs[0][0], "dtype", None)
    # Arrays (not inputs sent by name), one row each (a two-row and an empty input would
    # add up to two rows), and one dtype (concatenate would cast a stray one silently).
    nd = np.ndarray
    if any(type(x) is not nd or x.dtype is not first or x.shape[:1] != (1,) for x, _ in xs):
        return None
    try:
        stacked = np.concatenate([x for x, _ in xs])
    except ValueError:
        return None
    if stacked.ndim != ndim or stacked.shape[1:] != fixed:
        return None
    if stacked.dtype != dtype:
        if any(exact for _, exact in xs) or not castable(stacked.dtype, dtype):
            return None
        try:
            stacked = cast_fitting(stacked, dtype)
        except BadInput:  # some caller's value does not fit: say which, one by one
            return None
    return stacked


def _stacked(
    parts: list[Array],
    lane: ModelLane,
    p: RunningPipeline,
    now: float,
    callback: Callable[[Request], None],
) -> Request:
    """One request carrying the rows of `len(parts)` callers."""
    if len(parts) == 1:
        return Request(parts[0], lane, p, now, callback)
    x = np.concatenate(parts)
    if len(x) == len(parts):  # one row each: `callers` knows where each caller's row is
        return Request(x, lane, p, now, callback, n=len(parts))
    req = Stacked(x, lane, p, now, callback, n=len(parts))
    req.ends = np.cumsum([len(a) for a in parts]).tolist()
    return req


def _close_parts(p: RunningPipeline) -> None:
    """Close a pipeline's cascade client and sinks (whatever has a close()).

    The cascade client first: closing it completes the batches still waiting on an
    upstream server (with their local answers), whose results go to the sinks.
    """
    for part in [p.escalate, *p.sinks]:
        close = getattr(part, "close", None)
        if close is not None:
            close()
