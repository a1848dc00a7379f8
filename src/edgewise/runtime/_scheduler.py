"""The scheduler: one executor per accelerator, strict priority queues, dynamic batching.

Invariants:
- Requests are served strictly by class (critical, then normal, then best_effort), FIFO
  within a class; a batch is the head request plus every queued request for the same
  lane (pipeline + model), in that order, up to the lane's `max_batch` rows.
- A lone request never waits for company: when the executor is idle and nothing is
  queued, the submitting thread runs the request itself (no thread hand-off at all).
- A critical request that finds the worker busy with lower-priority work and no critical
  work queued runs at once in its caller's thread, beside that batch (one such request at
  a time; `critical_bypass=False` turns this off). It never waits behind best-effort,
  and the worker starts no new batch until it is done.
- While critical work runs (in a caller's thread or on the worker), lower-priority work
  lets it finish first, waiting at most `critical_hold_s` each time: a submitter before
  admission, and a batch between its model call and its post-processing. Their Python
  work would otherwise take the GIL from the critical request between its steps. The
  wait is bounded, so no source blocks for long. An event loop's thread (the local
  inference API, asyncio callers: see `loop_threads`) never waits: it serves every
  client, critical ones included, so blocking it would delay the very work the wait is
  for. Its lower-priority requests queue behind the critical work instead, as they do
  whenever the executor is busy.
- Admission is otherwise immediate: a full per-pipeline queue raises `Rejected`, or,
  for a pipeline whose queue overflows by dropping its oldest (`drop_oldest`), fails
  that pipeline's oldest queued requests with `Superseded` to make room for the new one.
  Capacity counts callers' requests: a request that carries a group of them (`n`, see
  `Request`) takes `n` places.
- A queued request whose deadline (`Request.deadline`: the pipeline's `max_queue_ms`, or
  its caller's timeout) has passed when the worker reaches it is not run: it fails with
  `Expired`. A request that runs at once (inline, or beside the worker) never waited.
- When a queued critical request has waited long enough that one more batch would take
  it past `shed_fraction` of its SLO, every queued best_effort request is shed, and new
  best_effort requests are shed on arrival for `shed_hold_s`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgewise.runtime._errors import (
    Expired,
    PipelineStopped,
    Rejected,
    RuntimeFailure,
    Shed,
    Superseded,
)
from edgewise.runtime._request import Lane, Owner, Request, complete_all

__all__ = ["Executor", "Lane", "Owner", "Request", "complete_all", "should_shed"]

CRITICAL, NORMAL, BEST_EFFORT = 0, 1, 2


def should_shed(waited_s: float, est_batch_s: float, slo_s: float, fraction: float) -> bool:
    """Whether a critical request that has waited `waited_s` is at risk of its SLO."""
    return waited_s + est_batch_s >= slo_s * fraction


class Executor:
    """Serves requests for one accelerator (or the CPU) with one worker thread."""

    def __init__(
        self,
        name: str = "cpu",
        clock: Callable[[], float] = time.monotonic,
        shed_fraction: float = 0.5,
        shed_hold_s: float = 0.5,
        critical_bypass: bool = True,
        critical_hold_s: float = 0.002,
        loop_threads: set[int] | None = None,
    ) -> None:
        self.name = name
        self.critical_bypass = critical_bypass
        self.critical_hold_s = critical_hold_s
        # Set while no critical work runs; lower-priority submitters wait on it (bounded).
        self._critical_clear = threading.Event()
        self._critical_clear.set()
        # Threads running critical work now (a thread runs at most one critical request
        # at a time: a second one it submits meanwhile queues behind the first).
        self._critical_threads: set[int] = set()
        # Threads that run an event loop: they never wait for critical work (shared with
        # the runtime, which adds a thread when a loop first calls it from there).
        self.loop_threads: set[int] = set() if loop_threads is None else loop_threads
        self._clock = clock
        self.shed_fraction = shed_fraction
        self.shed_hold_s = shed_hold_s
        # Hot paths enter the lock itself (C) rather than the Condition (a Python-level
        # __enter__); notify and wait still go through the Condition, which owns it.
        # Every wake-up is a notify_all: `drain` waits on this condition too, and a
        # single notify could wake a drainer instead of the worker, which then slept on
        # with requests queued.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queues: tuple[deque[Request], ...] = (deque(), deque(), deque())
        self._depth = 0
        self._busy = False
        self._running_rank = -1  # class of the batch the worker (or an inline caller) runs
        self._bypassing = False  # a critical request runs beside the worker's batch
        self._paused = False
        self._closed = False
        self._waiting = False  # the worker sleeps on the condition: a new request wakes it
        self._shed_until = float("-inf")
        self.est_batch_s = 0.0
        self._recent: deque[float] = deque(maxlen=33)
        # Median of recent batch times: what the model costs, robust to load spikes. (A
        # batch escalating to a server does not wait for it: see `ModelLane.execute`.)
        # Callers deciding whether to run a batch in an event loop's thread read this,
        # not the EWMA, so that one descheduled batch on a busy machine does not flip a
        # fast model onto the worker thread (and into GIL hand-offs).
        self.typical_batch_s = 0.0
        self._batches = 0
        self._thread = threading.Thread(target=self._loop, name=f"edgewise-{name}", daemon=True)
        self._thread.start()

    # -- submission -------------------------------------------------------------------

    def yield_to_critical(self, rank: int) -> bool:
        """Work of class `rank` lets running critical work finish first (bounded).

        Lower-priority submitters call this before admission, and a lower-priority batch
        between its model call and its Python post-processing. A thread that is itself
        running critical work (a completion callback submitting more) never waits: it
        would wait on itself. Nor does an event loop's thread (see the module's notes).
        Returns whether it waited.
        """
        if (
            rank != CRITICAL
            and self.critical_hold_s
            and not self._critical_clear.is_set()
            and (tid := threading.get_ident()) not in self._critical_threads
            and tid not in self.loop_threads
        ):
            self._critical_clear.wait(self.critical_hold_s)
            return True
        return False

    def _critical_started(self) -> None:
        # Called with the lock held, in the thread that runs the critical work.
        self._critical_threads.add(threading.get_ident())
        self._critical_clear.clear()

    def _critical_ended(self) -> None:
        # Called with the lock held, in the thread that ran the critical work.
        self._critical_threads.discard(threading.get_ident())
        if not self._critical_threads:
            self._critical_clear.set()

    def _admit(self, req: Request) -> list[Request] | None:
        """Admission checks, with the lock held.

        Returns the queued requests dropped to make room for `req` (`drop_oldest`), which
        the caller fails once the lock is released.
        """
        owner = req.owner
        if not owner.accepting:
            raise PipelineStopped(f"pipeline {owner.name!r} is stopping")
        if owner.rank == BEST_EFFORT and self._clock() < self._shed_until:
            owner.on_shed(req.n)
            raise Shed("best-effort request shed: critical work is at risk of its SLO")
        if owner.queued + req.n > owner.capacity:
            victims = self._make_room(owner, req.n) if owner.drop_oldest else None
            if victims is None:
                owner.on_rejected(req.n)
                raise Rejected(f"queue of pipeline {owner.name!r} is full ({owner.capacity})")
            return victims
        return None

    def _make_room(self, owner: Owner, n: int) -> list[Request] | None:
        """Take `owner`'s oldest queued requests out so that `n` more places are free.

        None (and nothing taken) when even all of them would not free enough: the new
        request carries more callers than the whole queue holds, or its own group's
        requests are not queued yet (`submit_many`).
        """
        need = owner.queued + n - owner.capacity
        q = self._queues[owner.rank]
        victims: list[Request] = []
        freed = 0
        for r in q:  # oldest first
            if r.owner is owner:
                victims.append(r)
                freed += r.n
                if freed >= need:
                    break
        if freed < need:
            return None
        for r in victims:
            q.remove(r)
        owner.queued -= freed
        self._depth -= len(victims)
        return victims

    def submit(self, req: Request, inline: bool = True, wait: bool = False) -> bool:
        """Admit `req`; run it in this thread when allowed and the executor is idle.

        Returns True when the request already ran (inline), False when it was queued and
        will be completed by the worker thread.

        Raises:
            Rejected: the pipeline's queue is full.
            Shed: best-effort work is being shed.
            PipelineStopped: the pipeline no longer accepts work.
        """
        cond = self._cond
        bypass = queued = False
        critical = req.owner.rank == CRITICAL
        if not critical and not self._critical_clear.is_set():
            self.yield_to_critical(req.owner.rank)
        with self._lock:
            victims = self._admit(req)
            if inline and not self._busy and not self._depth and not self._paused:
                self._busy = True
                self._running_rank = req.owner.rank
                req.owner.inflight += 1
                if critical:
                    self._critical_started()
            elif (
                inline
                and self.critical_bypass
                and req.owner.rank == CRITICAL
                and not self._paused
                and not self._bypassing
                and not self._queues[CRITICAL]
                and self._running_rank != CRITICAL
            ):
                # The worker is busy with lower-priority work: run this critical request
                # beside it in the caller's thread (sessions are safe to run
                # concurrently) instead of queueing it behind that batch.
                self._bypassing = bypass = True
                req.owner.inflight += 1
                self._critical_started()
            else:
                if wait:
                    req._waiter = waiter = threading.Lock()
                    waiter.acquire()
                self._queues[req.owner.rank].append(req)
                req.owner.queued += req.n
                self._depth += 1
                if self._waiting:  # a busy worker looks at the queue before it sleeps
                    cond.notify_all()
                queued = True
        if victims:
            supersede(victims)
        if queued:
            return False
        try:
            self._run([req])
        finally:
            with self._lock:
                req.owner.inflight -= 1
                if bypass:
                    self._bypassing = False
                else:
                    self._busy = False
                    self._running_rank = -1
                if critical:
                    self._critical_ended()
                if self._depth:
                    cond.notify_all()
        return True

    def submit_many(self, reqs: list[Request], inline: bool = True) -> None:
        """Admit a group at once; an idle executor runs it in this thread as batches.

        Requests refused at admission are failed (their callbacks run) right away. This is
        how an event loop batches the requests that arrived in one loop iteration without
        handing them to another thread.
        """
        cond = self._cond
        refused: list[tuple[Request, RuntimeFailure]] = []
        admitted: list[Request] = []
        dropped: list[Request] = []
        run_here = False
        critical = False
        if reqs and not self._critical_clear.is_set():
            self.yield_to_critical(min(r.owner.rank for r in reqs))
        with self._lock:
            for r in reqs:
                try:
                    victims = self._admit(r)
                    if victims:
                        dropped.extend(victims)
                    admitted.append(r)
                    r.owner.queued += r.n  # so the group as a whole respects the capacity
                except RuntimeFailure as exc:
                    refused.append((r, exc))
            if admitted and inline and not self._busy and not self._depth and not self._paused:
                self._busy = run_here = True
                self._running_rank = admitted[0].owner.rank
                critical = any(r.owner.rank == CRITICAL for r in admitted)
                if critical:
                    self._critical_started()
                for r in admitted:
                    r.owner.queued -= r.n
                    r.owner.inflight += 1
            else:
                for r in admitted:
                    self._queues[r.owner.rank].append(r)
                self._depth += len(admitted)
                if admitted and self._waiting:
                    cond.notify_all()
        for r, why in refused:
            r.fail(why)
        if dropped:
            supersede(dropped)
        if not run_here:
            return
        try:
            i, n = 0, len(admitted)
            while i < n:
                lane = admitted[i].lane
                limit = lane.max_batch
                j, rows = i + 1, admitted[i].rows
                while j < n and admitted[j].lane is lane and rows + admitted[j].rows <= limit:
                    rows += admitted[j].rows
                    j += 1
                self._run(admitted[i:j])
                i = j
        finally:
            with self._lock:
                for r in admitted:
                    r.owner.inflight -= 1
                self._busy = False
                self._running_rank = -1
                if critical:
                    self._critical_ended()
                if self._depth:
                    cond.notify_all()

    def run_sync(self, req: Request, timeout: float | None = None) -> Any:
        """Submit and wait for the result (raises the request's error).

        A request that was queued has a waiter, and so has one that ran here but whose
        batch went on to an upstream server (completed later, in another thread).
        """
        self.submit(req, wait=True)
        waiter = req._waiter
        if waiter is not None and not waiter.acquire(timeout=-1 if timeout is None else timeout):
            # Its deadline (see `Runtime.infer`) keeps it from running if still queued.
            raise Expired(f"no result within {timeout:g} s")
        if req.error is not None:
            raise req.error
        return req.result

    # -- control ----------------------------------------------------------------------

    def pause(self) -> None:
        """Hold the worker after its current batch (tests, maintenance); requests queue."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Let the worker serve the queue again."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def drain(self, owner: Owner, timeout: float = 10.0) -> None:
        """Wait until `owner` has nothing queued or running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (owner.queued or owner.inflight) and time.monotonic() < deadline:
                self._cond.wait(0.01)

    def cancel(self, owner: Owner, why: str) -> None:
        """Fail `owner`'s queued requests with `PipelineStopped(why)`; they are not run.

        For a pipeline that stopped without its queue draining in time: left queued, its
        requests would run later on its closed sinks, their callers waiting until then.
        """
        with self._cond:
            dropped = [r for q in self._queues for r in q if r.owner is owner]
            if not dropped:
                return
            for q in self._queues:
                keep = [r for r in q if r.owner is not owner]
                if len(keep) != len(q):
                    q.clear()
                    q.extend(keep)
            self._depth -= len(dropped)
            owner.queued -= sum(r.n for r in dropped)
            self._cond.notify_all()  # drainers
        for r in dropped:
            r.fail(PipelineStopped(why))

    def close(self) -> None:
        """Fail whatever is queued and stop the worker."""
        with self._cond:
            self._closed = True
            leftovers = [r for q in self._queues for r in q]
            for q in self._queues:
                q.clear()
            for r in leftovers:
                r.owner.queued -= r.n
            self._depth = 0
            self._cond.notify_all()
        for r in leftovers:
            r.fail(PipelineStopped("runtime closed"))
        self._thread.join(timeout=5)

    # -- the worker -------------------------------------------------------------------

    def _run(self, batch: list[Request]) -> None:
        # The caller counted the batch in its owner's `inflight` when it claimed it (under
        # the lock, as `queued` went down): `drain` always sees it in one or the other.
        t0 = time.perf_counter()
        try:
            batch[0].lane.execute(batch)
        except BaseException as exc:  # a lane must complete its requests; make sure
            left = [r for r in batch if r.result is None and r.error is None]
            if left:  # (a stage that raised, say): failed, and counted as failures
                left[0].owner.on_failed(sum(r.n for r in left))
                err = exc if isinstance(exc, RuntimeFailure) else RuntimeFailure(str(exc))
                for r in left:
                    r.fail(err)
        took = time.perf_counter() - t0
        self.est_batch_s = took if not self.est_batch_s else 0.8 * self.est_batch_s + 0.2 * took
        recent = self._recent
        recent.append(took)
        if len(recent) < 8 or not self._batches % 16:  # keep the median off the hot path
            ordered = sorted(recent)
            self.typical_batch_s = ordered[len(ordered) // 2]
        self._batches += 1

    def _shed_best_effort(self, now: float) -> list[Request]:
        crit = self._queues[CRITICAL]
        if not crit:
            return []
        head = crit[0]
        if not should_shed(
            now - head.enqueued, self.est_batch_s, head.owner.slo_s, self.shed_fraction
        ):
            return []
        self._shed_until = now + self.shed_hold_s
        dropped = list(self._queues[BEST_EFFORT])
        self._queues[BEST_EFFORT].clear()
        self._depth -= len(dropped)
        for r in dropped:
            r.owner.queued -= r.n
        return dropped

    def _take(self, now: float) -> tuple[list[Request], list[Request]]:
        """The next batch, and the queued requests found past their deadline.

        The expired ones are taken out of the queue too, to be failed once the lock is
        released. The batch is empty when every request left had expired.
        """
        head: Request | None = None
        expired: list[Request] = []
        for q in self._queues:
            while q:
                r = q.popleft()
                if r.deadline < now:
                    expired.append(r)
                else:
                    head = r
                    break
            if head is not None:
                break
        batch: list[Request] = []
        if head is not None:
            lane, limit = head.lane, head.lane.max_batch
            batch, rows = [head], head.rows
            for q in self._queues:
                if rows >= limit or not q:
                    continue
                keep: deque[Request] = deque()
                while q:
                    r = q.popleft()
                    if r.deadline < now:
                        expired.append(r)
                    elif r.lane is lane and rows + r.rows <= limit:
                        batch.append(r)
                        rows += r.rows
                    else:
                        keep.append(r)
                q.extend(keep)
            head.owner.inflight += 1  # a batch never mixes lanes, so never mixes pipelines
        self._depth -= len(batch) + len(expired)
        for r in batch:
            r.owner.queued -= r.n
        for r in expired:
            r.owner.queued -= r.n
        return batch, expired

    def _wait_for_company(self, now: float) -> float:
        """Seconds to wait for more requests to join the head's batch (0: go now)."""
        head = next(q[0] for q in self._queues if q)
        delay = head.lane.max_queue_delay_s
        if delay <= 0 or self._depth < 2:
            return 0.0
        same = sum(r.rows for q in self._queues for r in q if r.lane is head.lane)
        if same >= head.lane.max_batch:
            return 0.0
        return max(0.0, head.enqueued + delay - now)

    def _must_wait(self) -> bool:
        # While a critical request runs beside the worker, the worker starts nothing new:
        # queued critical work (maybe of the same pipeline) waits for it, since one
        # pipeline never runs two batches at once, and lower-priority batches would only
        # compete with it for the cores and the GIL. It waits at most for the batch the
        # worker was already running.
        return self._busy or self._paused or not self._depth or self._bypassing

    def _loop(self) -> None:
        cond = self._cond
        rank = -1
        while True:
            with cond:
                while not self._closed and self._must_wait():
                    self._waiting = True
                    cond.wait()
                    self._waiting = False
                if self._closed:
                    return
                now = self._clock()
                shed = self._shed_best_effort(now)
                batch: list[Request] = []
                expired: list[Request] = []
                if self._depth:
                    pause = 0.0 if shed else self._wait_for_company(now)
                    if pause > 0:
                        self._waiting = True
                        cond.wait(pause)
                        self._waiting = False
                        if self._must_wait():
                            continue
                    batch, expired = self._take(now)
                    if batch:
                        self._busy = True
                        self._running_rank = rank = batch[0].owner.rank
                        if rank == CRITICAL:
                            self._critical_started()
                    elif self._depth == 0:  # nothing left but what expired: drainers
                        cond.notify_all()
            if expired:  # before the batch: their callers learn at once
                expire(expired, now)
            if batch:
                try:
                    self._run(batch)
                finally:
                    with cond:
                        batch[0].owner.inflight -= 1
                        self._busy = False
                        self._running_rank = -1
                        if rank == CRITICAL:
                            self._critical_ended()
                        cond.notify_all()
            # Critical work first; telling shed requests they were shed can wait a batch.
            for r in shed:
                r.owner.on_shed(r.n)
                r.fail(Shed("best-effort request shed: critical work is at risk of its SLO"))


def expire(reqs: list[Request], now: float) -> None:
    """Fail requests found past their deadline in the queue (not run)."""
    for r in reqs:
        r.owner.on_expired(r.n, now)
        waited = (now - r.enqueued) * 1000.0
        r.fail(
            Expired(
                f"waited {waited:.0f} ms in the queue of pipeline {r.owner.name!r}, past its "
                "deadline; not run"
            )
        )


def supersede(reqs: list[Request]) -> None:
    """Fail queued requests dropped to make room for newer ones."""
    for r in reqs:
        r.owner.on_superseded(r.n)
        r.fail(
            Superseded(
                f"dropped from the full queue of pipeline {r.owner.name!r} for a newer request"
            )
        )
