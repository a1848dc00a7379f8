"""Batching for asyncio callers: requests made in one event-loop turn form one group.

The first request for a pipeline opens a group and schedules its drain with
`call_soon`; every request made before the loop gets to it joins the group; the drain
submits the group at once and one shared future wakes every member. A lone request
therefore waits one loop turn, never a fixed delay, and concurrent coroutines (HTTP
connections, async apps) are served as a batch without a thread hand-off: an idle
executor runs a fast model's group right in the loop thread.

`first_goes_now` (the HTTP app) skips that turn for the first request of a loop turn: it
runs at once, and only the requests that start later in the same turn are grouped. This
needs no peek at the loop's private ready queue (uvloop has none): the first request
marks the turn and schedules the mark's removal with `call_soon`, which runs after every
callback that was already ready, i.e. after the rest of this turn's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any

from edgewise.runtime._errors import RuntimeFailure
from edgewise.runtime._scheduler import Request

if TYPE_CHECKING:
    from edgewise.runtime._model import Input
    from edgewise.runtime._pipeline import InferenceResult
    from edgewise.runtime._runtime import Runtime

__all__ = ["LoopBatcher", "LoopBatchers", "Pending", "wake"]


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def wake(req: Request) -> None:
    """Completion callback of a request whose waiter may not exist yet.

    The waiter sets `req.ctx = (future, loop, loop's thread id)` only when the request
    did not complete inline, and then checks the result again: a completion that finds
    no ctx has already been seen by the waiter (see `LoopBatcher.infer`).
    """
    ctx = req.ctx
    if ctx is None:
        return
    fut, loop, tid = ctx
    if threading.get_ident() == tid:
        if not fut.done():
            fut.set_result(None)
    else:
        with contextlib.suppress(RuntimeError):  # the loop closed; nobody waits
            loop.call_soon_threadsafe(_resolve, fut, None)


class _Group:
    """The requests one loop turn made for one pipeline, and their one shared future.

    The drain stacks the members' rows into as few `Request`s as the lane allows
    (`Runtime.submit_group`); `slots[i]` says where member `i`'s rows are, or why it
    was refused, unless every member sent one valid row: then `step` says how many
    members each request carries. The last stacked request to complete wakes every
    member at once.
    """

    __slots__ = ("error", "fut", "left", "lock", "reqs", "slots", "step", "tid", "xs")

    def __init__(self, fut: asyncio.Future[None], tid: int) -> None:
        self.fut = fut
        self.tid = tid  # the loop's thread
        self.xs: list[tuple[Input, bool]] = []
        self.reqs: list[Request] = []
        self.slots: list[tuple[int, int, int] | BaseException] = []
        self.step = 0  # when set: member i is row i % step of request i // step
        # Requests not completed yet; no completion may wake the members before the
        # drain knows them all (it takes this placeholder down to their number).
        self.left = 1 << 30
        self.error: RuntimeFailure | None = None  # the drain's, when it failed
        # Refused requests are failed in the loop thread while admitted ones may already
        # complete on the worker: the count is shared by two threads.
        self.lock = threading.Lock()

    def done(self, req: Request) -> None:
        """Per-request completion: the last one wakes every member (from any thread)."""
        # The request no longer needs its way back here: without this link the group
        # and its requests are freed by reference counting, not left as a cycle for the
        # garbage collector (whose collections cost a fifth of the c32 throughput).
        req.callback = None
        with self.lock:
            self.left -= 1
            if self.left:
                return
            fut = self.fut  # (see `wait_again`)
        if threading.get_ident() == self.tid:
            if not fut.done():
                fut.set_result(None)
        else:
            with contextlib.suppress(RuntimeError):
                fut.get_loop().call_soon_threadsafe(_resolve, fut, None)

    async def wait_again(self) -> None:
        """Wait for the group once its shared future was cancelled under this member.

        A task that is cancelled (its caller went away, a `wait_for` ran out) cancels
        the future it awaits: here the group's, which every member awaits. The members
        whose own tasks were not cancelled wait on, on a new future, and are answered.

        Raises:
            CancelledError: this member's own task was cancelled.
            RuntimeFailure: the group could not be submitted.
        """
        task = asyncio.current_task()
        while True:
            if task is None or task.cancelling():
                raise asyncio.CancelledError
            with self.lock:  # `done` reads the future under it as the last completes
                if not self.left:
                    if self.error is not None:
                        raise self.error
                    return
                fut = self.fut
                if fut.cancelled():
                    fut = self.fut = fut.get_loop().create_future()
            with contextlib.suppress(asyncio.CancelledError):  # another member's again
                await fut
                return

    def outcome(self, i: int) -> InferenceResult:
        """Member `i`'s result; raises its error."""
        step = self.step
        if step:
            k, start = divmod(i, step)
            end = start + 1
        else:
            slot = self.slots[i]
            if isinstance(slot, BaseException):
                raise slot
            k, start, end = slot
        req = self.reqs[k]
        if req.error is not None:
            raise req.error
        whole: InferenceResult = req.result
        return whole.part(start, end)


def _outcome(req: Request) -> InferenceResult:
    if req.error is not None:
        raise req.error
    result: InferenceResult = req.result
    return result


class Pending:
    """A request that did not complete where it was made.

    Once `fut` is done, `outcome()` gives its result or raises its error.
    """

    __slots__ = ("fut", "group", "i", "req")

    def __init__(
        self, fut: asyncio.Future[None], group: _Group | None, i: int, req: Request | None
    ) -> None:
        self.fut = fut
        self.group = group
        self.i = i
        self.req = req

    def outcome(self) -> InferenceResult:
        """The result; raises the request's `RuntimeFailure`."""
        self.fut.result()  # what the drain failed the whole group with, if it did
        if self.group is not None:
            return self.group.outcome(self.i)
        assert self.req is not None
        return _outcome(self.req)


class LoopBatcher:
    """Per-event-loop request grouping in front of a `Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pending: dict[str, _Group] = {}
        self._turn: asyncio.AbstractEventLoop | None = None  # loop whose turn is marked
        self._loop: tuple[int, asyncio.AbstractEventLoop] | None = None

    def _running(self) -> tuple[int, asyncio.AbstractEventLoop]:
        """(thread id, running loop), without asking asyncio on every request.

        `asyncio.get_running_loop()` costs a getpid() system call each time; a thread
        runs one loop at a time, so the last one seen is still current while it runs.
        """
        tid = threading.get_ident()
        last = self._loop
        if last is not None and last[0] == tid and last[1].is_running():
            return last
        self._loop = last = (tid, asyncio.get_running_loop())
        self.runtime.add_loop_thread(tid)  # an event loop never waits for critical work
        return last

    async def infer(
        self,
        name: str,
        x: Input,
        exact_dtype: bool = False,
        first_goes_now: bool = False,
        max_queue_s: float | None = None,
    ) -> InferenceResult:
        """Run one request; raises its `RuntimeFailure`.

        With `first_goes_now`, the first request of a loop turn is submitted at once (an
        idle executor runs it right here); later requests of the same turn are grouped.
        `max_queue_s`: see `begin`.
        """
        got = self.begin(name, x, exact_dtype, first_goes_now, max_queue_s=max_queue_s)
        if isinstance(got, Pending):
            await got.fut
            return got.outcome()
        return got

    def begin(
        self,
        name: str,
        x: Input,
        exact_dtype: bool = False,
        first_goes_now: bool = False,
        alone: bool = False,
        max_queue_s: float | None = None,
    ) -> InferenceResult | Pending:
        """`infer` without a coroutine: the result when it is ready now, else a `Pending`.

        `alone` (with `first_goes_now`): the caller knows no other request can arrive in
        this loop turn (a server with one connection), so the turn is not marked: that
        mark is a `call_soon`, and an extra loop iteration, per request.

        A request with its own `max_queue_s` (see `Runtime.submit`) is submitted at once,
        not grouped: a group's requests share one deadline. The executor still batches
        it with whatever else is queued.

        Raises what admission raises (`UnknownPipeline`, `BadInput`, `Rejected`...) for a
        request that runs at once; a grouped request's failure comes from `outcome()`.
        """
        tid, loop = self._running()
        if max_queue_s is not None or (
            first_goes_now and self._turn is not loop and name not in self.pending
        ):
            if first_goes_now and not alone and self._turn is not loop:
                # others may send in this turn: they form a group after this one
                self._turn = loop
                loop.call_soon(self._end_turn)
            req = self.runtime.submit(
                name, x, wake, exact_dtype=exact_dtype, inline=True, max_queue_s=max_queue_s
            )
            if req.result is None and req.error is None:  # queued behind other work
                fut: asyncio.Future[None] = loop.create_future()
                req.ctx = (fut, loop, tid)
                if req.result is None and req.error is None:
                    return Pending(fut, None, 0, req)
            return _outcome(req)
        group, i = self.join(name, x, exact_dtype)
        return Pending(group.fut, group, i, None)

    def join(self, name: str, x: Input, exact_dtype: bool) -> tuple[_Group, int]:
        """Add a request to this loop turn's group for `name` (opening it if needed).

        The caller awaits `group.fut` and then takes `group.outcome(i)`; a plain function
        rather than a coroutine, so an async caller awaits one coroutine, not two.
        """
        group = self.pending.get(name)
        if group is None:
            tid, loop = self._running()
            group = self.pending[name] = _Group(loop.create_future(), tid)
            loop.call_soon(self._drain, name)
        i = len(group.xs)
        group.xs.append((x, exact_dtype))
        return group, i

    def _end_turn(self) -> None:
        self._turn = None

    def _drain(self, name: str) -> None:
        group = self.pending.pop(name, None)
        if group is None:
            return
        try:
            reqs, slots = self.runtime.submit_group(name, group.xs, group.done)
        except Exception as exc:  # UnknownPipeline, or a bug: never leave members waiting
            err = exc if isinstance(exc, RuntimeFailure) else RuntimeFailure(str(exc))
            with group.lock:
                group.left, group.error, fut = 0, err, group.fut
            if not fut.done():
                fut.set_exception(err)
            return
        group.reqs = reqs
        if isinstance(slots, int):
            group.step = slots
        else:
            group.slots = slots
        with group.lock:  # completions so far counted down from the placeholder
            group.left -= (1 << 30) - len(reqs)
            finished = group.left == 0
            fut = group.fut
        if finished and not fut.done():
            fut.set_result(None)


class LoopBatchers:
    """One `LoopBatcher` per event loop, forgotten when its loop is collected."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._by_loop: weakref.WeakKeyDictionary[Any, LoopBatcher] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[Any], LoopBatcher] | None = None
        self._hot: tuple[int, weakref.ref[Any], LoopBatcher] | None = None

    def of(self, loop: asyncio.AbstractEventLoop) -> LoopBatcher:
        """The batcher of `loop` (created on first use)."""
        last = self._last  # one loop usually does all the calling: skip the weak dict
        if last is not None and last[0]() is loop:
            return last[1]
        batcher = self._by_loop.get(loop)
        if batcher is None:
            batcher = self._by_loop[loop] = LoopBatcher(self.runtime)
        self._last = (weakref.ref(loop), batcher)
        return batcher

    def current(self) -> LoopBatcher:
        """The batcher of the running loop.

        Skips `asyncio.get_running_loop()` (a getpid() each call) while the last caller's
        loop still runs in this thread (see `LoopBatcher._running`).
        """
        hot = self._hot
        if hot is not None and hot[0] == threading.get_ident():
            loop = hot[1]()
            if loop is not None and loop.is_running():
                return hot[2]
        loop = asyncio.get_running_loop()
        batcher = self.of(loop)
        self._hot = (threading.get_ident(), weakref.ref(loop), batcher)
        return batcher
