from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from edgewise.examples import DigitsSplit
from edgewise.runtime import InferenceResult, Rejected, Runtime, Shed
from edgewise.runtime._aio import LoopBatcher, Pending
from edgewise.runtime._scheduler import Request, should_shed

from .conftest import FakeClock, SpecFactory


class Recorder:
    """Collects completions in order, from whichever thread completes them."""

    def __init__(self) -> None:
        self.order: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.done = threading.Semaphore(0)

    def __call__(self, req: Request) -> None:
        with self.lock:
            outcome = "ok" if req.error is None else type(req.error).__name__
            self.order.append((req.owner.name, outcome))
        self.done.release()

    def wait(self, n: int) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=10)


def _start_pair(rt: Runtime, mlp: bytes, make_spec: SpecFactory, be_capacity: int) -> None:
    model = rt.load_model(mlp)
    rt.start_pipeline(make_spec("crit", priority="critical", slo={"p95_ms": 10}), model)
    rt.start_pipeline(
        make_spec("bulk", priority="best_effort", batching={"queue_capacity": be_capacity}), model
    )


def test_shedding_rule_compares_wait_plus_one_batch_with_the_slo_budget() -> None:
    assert not should_shed(waited_s=0.001, est_batch_s=0.001, slo_s=0.010, fraction=0.5)
    assert should_shed(waited_s=0.004, est_batch_s=0.001, slo_s=0.010, fraction=0.5)


def test_critical_requests_are_served_before_queued_best_effort(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    rec = Recorder()
    rt.pause()
    for i in range(20):
        rt.submit("bulk", split.x_test[i], rec)
    for i in range(5):
        rt.submit("crit", split.x_test[i], rec)
    rt.resume()
    rec.wait(25)
    assert rec.order[:5] == [("crit", "ok")] * 5
    assert rec.order[5:] == [("bulk", "ok")] * 20


def test_saturating_best_effort_is_rejected_when_full_and_shed_for_critical(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=16)
    rec = Recorder()
    rt.pause()
    rejected = 0
    for i in range(40):
        try:
            rt.submit("bulk", split.x_test[i], rec)
        except Rejected:
            rejected += 1
    for i in range(3):
        rt.submit("crit", split.x_test[i], rec)
    clock.now += 0.008  # critical work has waited most of its 10 ms budget
    rt.resume()
    rec.wait(16 + 3)

    assert rejected == 24
    assert rec.order[:3] == [("crit", "ok")] * 3
    assert rec.order[3:] == [("bulk", "Shed")] * 16
    # While shedding holds, new best-effort work is shed on arrival, critical still runs.
    with pytest.raises(Shed):
        rt.submit("bulk", split.x_test[0], rec)
    assert rt.infer("crit", split.x_test[0]).label is not None
    bulk = rt.stats("bulk")
    assert bulk["nv_inference_request_rejected"] == 24
    assert bulk["nv_inference_request_shed"] == 17
    assert bulk["nv_inference_request_success"] == 0
    # After the hold, best-effort is admitted again.
    clock.now += 1.0
    assert rt.infer("bulk", split.x_test[0]).label is not None


def test_queued_requests_of_one_model_form_one_batch_up_to_max_batch(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"max_batch": 4}), rt.load_model(mlp_bytes))
    rec = Recorder()
    rt.pause()
    for i in range(10):
        rt.submit("digits", split.x_test[i], rec)
    rt.resume()
    rec.wait(10)
    sizes = rt.stats("digits")["batch_size"]
    by_bound = dict(zip(sizes["bounds"], sizes["counts"], strict=False))
    assert sizes["count"] == 3  # 4 + 4 + 2
    assert by_bound[2] == 1 and by_bound[4] == 2
    assert rec.order == [("digits", "ok")] * 10


def test_batched_results_go_back_to_the_right_request(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    model = rt.load_model(mlp_bytes)
    rt.start_pipeline(make_spec(), model)
    reqs = []
    rt.pause()
    for i in range(12):
        reqs.append(rt.submit("digits", split.x_test[i : i + 1 + (i % 3)], lambda r: None))
    rt.resume()
    rt.stop_pipeline("digits")  # drains the queue
    for i, req in enumerate(reqs):
        want = np.asarray(model.session.run(split.x_test[i : i + 1 + (i % 3)])["probabilities"])
        assert req.result.labels == [str(k) for k in want.argmax(axis=1)]


def test_a_lone_request_runs_at_once_in_the_callers_thread(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"max_queue_delay_ms": 50}), rt.load_model(mlp_bytes))
    req = rt.submit("digits", split.x_test[0], lambda r: None, inline=True)
    assert req.result is not None  # completed before submit returned: no wait for company
    assert req.result.queue_ms == 0.0


def test_max_queue_delay_lets_queued_requests_wait_for_company(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt = Runtime(cores=1, monitor_interval_s=None)
    try:
        spec = make_spec(batching={"max_batch": 4, "max_queue_delay_ms": 1000})
        rt.start_pipeline(spec, rt.load_model(mlp_bytes))
        rec = Recorder()
        rt.pause()
        rt.submit("digits", split.x_test[0], rec)
        rt.submit("digits", split.x_test[1], rec)
        rt.resume()  # two queued: the worker holds them for up to 1 s for more company
        rt.submit("digits", split.x_test[2], rec)
        rt.submit("digits", split.x_test[3], rec)  # the batch is full: it goes at once
        rec.wait(4)
        sizes = rt.stats("digits")["batch_size"]
        assert sizes["count"] == 1 and sizes["sum"] == 4
    finally:
        rt.close()


def test_critical_request_runs_beside_a_busy_best_effort_batch(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    in_worker, release = threading.Event(), threading.Event()

    def hold(req: Request) -> None:  # completions run in the worker: keep it busy
        in_worker.set()
        release.wait(10)

    try:
        rt.submit("bulk", split.x_test[0], hold)  # queued, so the worker thread runs it
        assert in_worker.wait(10)
        caller = threading.get_ident()
        seen: list[int] = []
        req = rt.submit(
            "crit", split.x_test[1], lambda r: seen.append(threading.get_ident()), inline=True
        )
        # Served while the best-effort batch still holds the worker, in this thread.
        assert req.error is None and req.result.label is not None
        assert seen == [caller]
    finally:
        release.set()
    assert rt.stats("crit")["nv_inference_request_success"] == 1


def test_critical_request_queues_when_bypass_is_off(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt = Runtime(cores=1, monitor_interval_s=None)
    try:
        _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
        for ex in rt._executors.values():
            ex.critical_bypass = False
        in_worker, release = threading.Event(), threading.Event()

        def hold(req: Request) -> None:
            in_worker.set()
            release.wait(10)

        rt.submit("bulk", split.x_test[0], hold)
        assert in_worker.wait(10)
        rec = Recorder()
        req = rt.submit("crit", split.x_test[1], rec, inline=True)
        assert req.result is None  # waits for the worker
        release.set()
        rec.wait(1)
        assert req.result is not None
    finally:
        release.set()
        rt.close()


def test_worker_starts_no_batch_while_a_critical_request_runs_beside_it(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    in_worker, release = threading.Event(), threading.Event()
    later = Recorder()

    def hold(req: Request) -> None:  # the worker's current best-effort batch
        in_worker.set()
        release.wait(10)

    seen_during_critical: list[int] = []

    def critical_done(req: Request) -> None:
        # Still beside the worker: free it, give it time; it must not start the next
        # best-effort batch until this critical request is over.
        release.set()
        threading.Event().wait(0.3)
        seen_during_critical.append(len(later.order))

    try:
        rt.submit("bulk", split.x_test[0], hold)
        assert in_worker.wait(10)
        rt.submit("bulk", split.x_test[2], later)  # queued behind the held batch
        req = rt.submit("crit", split.x_test[1], critical_done, inline=True)
        assert req.error is None
        assert seen_during_critical == [0]
        later.wait(1)  # and it runs once the critical request is done
        assert later.order == [("bulk", "ok")]
    finally:
        release.set()


def _hold_critical(rt: Runtime, hold_s: float) -> None:
    for ex in rt._executors.values():
        ex.critical_hold_s = hold_s


def _critical_running_in_a_thread(
    rt: Runtime, x: np.ndarray, then: Callable[[], None] = lambda: None
) -> tuple[threading.Thread, threading.Event]:
    """A critical request running inline in a thread of its own until the event is set
    (its completion callback holds it; `then` runs as it ends)."""
    running, release = threading.Event(), threading.Event()

    def during_critical(req: Request) -> None:
        running.set()
        release.wait(10)
        then()

    thread = threading.Thread(target=lambda: rt.submit("crit", x, during_critical, inline=True))
    thread.start()
    assert running.wait(10)
    return thread, release


def test_best_effort_submitters_wait_while_a_critical_request_runs(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 30.0)  # long enough that only the critical request's end frees it
    order: list[str] = []
    still_waiting: list[bool] = []

    def source() -> None:  # a best-effort source thread
        rt.submit("bulk", split.x_test[0], lambda r: None)
        order.append("best_effort admitted")

    def during_critical(req: Request) -> None:  # runs inside the critical request
        t = threading.Thread(target=source)
        t.start()
        t.join(0.5)
        still_waiting.append(t.is_alive())
        order.append("critical done")
        threads.append(t)

    threads: list[threading.Thread] = []
    req = rt.submit("crit", split.x_test[1], during_critical, inline=True)
    assert req.result is not None
    threads[0].join(10)
    assert still_waiting == [True]
    assert order == ["critical done", "best_effort admitted"]
    rt.stop_pipeline("bulk")  # drains the best-effort request before the runtime closes
    assert rt.stats("crit")["nv_inference_request_success"] == 1


def test_the_wait_for_critical_work_is_bounded(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 0.01)
    admitted = threading.Event()
    seen: list[bool] = []

    def source() -> None:
        rt.submit("bulk", split.x_test[0], lambda r: None)
        admitted.set()

    def during_critical(req: Request) -> None:
        threading.Thread(target=source).start()
        seen.append(admitted.wait(10))  # admitted while the critical request still runs

    rt.submit("crit", split.x_test[1], during_critical, inline=True)
    assert seen == [True]


def test_neither_the_worker_nor_the_critical_caller_waits_on_itself(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 30.0)
    done: list[str] = []

    def chain(req: Request) -> None:  # a critical completion that submits best-effort work
        rt.submit("bulk", split.x_test[0], lambda r: None)
        done.append(threading.current_thread().name)

    rt.submit("crit", split.x_test[1], chain, inline=True)  # in this thread
    rt.pause()
    rt.submit("crit", split.x_test[2], chain)  # queued: the worker runs it
    rt.resume()
    rt.stop_pipeline("crit")  # waits for the worker's critical batch
    assert done == [threading.current_thread().name, "edgewise-cpu"]


def test_a_lower_priority_batch_yields_to_running_critical_work_between_its_steps(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 30.0)
    (ex,) = rt._executors.values()
    crit, go = _critical_running_in_a_thread(rt, split.x_test[1])
    assert not ex.yield_to_critical(0)  # critical work itself never waits
    lower = threading.Thread(target=ex.yield_to_critical, args=(2,))
    lower.start()
    lower.join(0.5)
    assert lower.is_alive()  # a best-effort batch's thread waits for the critical request
    go.set()
    lower.join(10)
    crit.join(10)
    assert not lower.is_alive() and not crit.is_alive()
    # A batch asks between its model call and its postprocess, with its pipeline's rank.
    ranks: list[int] = []
    ex.yield_to_critical = lambda rank: bool(ranks.append(rank))  # type: ignore[method-assign]
    rt.infer("bulk", split.x_test[0])
    rt.infer("crit", split.x_test[0])
    assert ranks == [2, 0]


class _NotingEvent(threading.Event):
    """The executor's "no critical work runs" event, noting which threads wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[int] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waiters.append(threading.get_ident())
        return super().wait(timeout)


def test_an_event_loop_never_waits_for_critical_work_its_requests_queue_behind_it(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 1.0)
    (ex,) = rt._executors.values()
    ex._critical_clear = clear = _NotingEvent()
    clear.set()
    order: list[str] = []
    crit, go = _critical_running_in_a_thread(
        rt, split.x_test[1], then=lambda: order.append("critical done")
    )

    async def main() -> tuple[InferenceResult, InferenceResult]:
        # Both ways an event loop submits: a loop turn's group (`infer_async`) and a
        # request that would run at once (how the local inference API submits).
        grouped = asyncio.ensure_future(rt.infer_async("bulk", split.x_test[0]))
        first = LoopBatcher(rt).begin("bulk", split.x_test[2], first_goes_now=True, alone=True)
        for _ in range(10):
            await asyncio.sleep(0)  # the loop keeps turning while the critical request runs
        assert isinstance(first, Pending)
        assert not grouped.done() and not first.fut.done()
        go.set()  # from the loop itself, which was never blocked
        result = await grouped
        await first.fut
        order.append("best_effort done")
        return result, first.outcome()

    grouped_result, first_result = asyncio.run(main())
    crit.join(10)
    assert clear.waiters == []  # no wait at all, not a bounded one
    assert order == ["critical done", "best_effort done"]
    assert grouped_result.label == rt.infer("bulk", split.x_test[0]).label
    assert first_result.label == rt.infer("bulk", split.x_test[2]).label
    # A thread with no event loop still lets critical work finish first (bounded).
    _hold_critical(rt, 0.01)
    with ex._lock:
        ex._critical_started()  # critical work "runs" in this thread
    source = threading.Thread(target=rt.submit, args=("bulk", split.x_test[0], lambda r: None))
    try:
        source.start()
        source.join(10)
    finally:
        with ex._lock:
            ex._critical_ended()
    # It waited before its admission (the worker may wait too, before post-processing).
    assert clear.waiters[:1] == [source.ident]


def test_a_pipeline_draining_never_takes_the_wake_up_meant_for_the_worker(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    # `stop_pipeline` drains by waiting on the executor's condition, as the worker does.
    # A single notify could wake the drainer instead of the worker, which then slept on
    # with requests queued (found by test_runtime_chaos: 39 requests left for good). The
    # sleeps only order the threads' waits (the drainer re-waits every 10 ms).
    _start_pair(rt, mlp_bytes, make_spec, be_capacity=100)
    _hold_critical(rt, 0.0)
    (ex,) = rt._executors.values()
    bulk = rt._pipelines["bulk"]
    rec = Recorder()
    # keeps the executor busy in the submitting thread
    holder, release = _critical_running_in_a_thread(rt, split.x_test[0])
    rt.submit("bulk", split.x_test[1], rec)  # queued: the executor is busy
    time.sleep(0.002)  # the worker woke, saw the executor busy, waits again
    drainer = threading.Thread(target=ex.drain, args=(bulk, 10.0))
    drainer.start()
    time.sleep(0.002)  # the drainer waits on the condition too, after the worker
    rt.submit("bulk", split.x_test[2], rec)  # wakes the worker, which waits again: last
    time.sleep(0.002)
    release.set()  # the holder's end notifies the first waiter, now the drainer
    holder.join(10)
    rec.wait(2)  # both queued requests still run
    drainer.join(10)
    assert rec.order == [("bulk", "ok"), ("bulk", "ok")]


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
def test_draining_waits_for_a_batch_taken_from_the_queue_but_not_yet_running(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, inline: bool
) -> None:
    # A batch leaves the queue (`queued` goes down) before it runs: if `inflight` went up
    # only once it ran, `drain` could see neither in between and return, and
    # `stop_pipeline` would close the sinks of a batch about to run. The executor's
    # `_run` is wrapped to start a drain at the very moment the batch is handed to it.
    rt.start_pipeline(make_spec("digits"), rt.load_model(mlp_bytes))
    (ex,) = rt._executors.values()
    p = rt._pipelines["digits"]
    run = ex._run
    drained: list[bool] = []  # per drain: had the batch completed when it returned?
    ran: list[Request] = []
    drainers: list[threading.Thread] = []

    def drain_then_check() -> None:
        ex.drain(p, 10.0)
        drained.append(bool(ran) and all(r.result is not None for r in ran))

    def run_with_a_drain_starting(batch: list[Request]) -> None:
        drainer = threading.Thread(target=drain_then_check)
        drainers.append(drainer)
        drainer.start()
        drainer.join(0.2)  # with the gap, the drain returns right here
        ran.extend(batch)
        run(batch)

    ex._run = run_with_a_drain_starting  # type: ignore[method-assign]
    result = threading.Event()
    rt.submit("digits", split.x_test[:1], lambda _r: result.set(), inline=inline)
    assert result.wait(10)
    for drainer in drainers:
        drainer.join(10)
    assert drained == [True]
    assert (p.queued, p.inflight) == (0, 0)
