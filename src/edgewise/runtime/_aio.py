"""Batching for asyncio callers: requests made in one event-loop turn form one group.

The first request for a pipeline schedules a drain with `call_soon`; every request made
before the loop gets to it joins the group; the drain submits the group at once. A lone
request therefore waits one loop turn, never a fixed delay, and concurrent coroutines
(HTTP connections, async apps) are served as a batch without a thread hand-off: an idle
executor runs a fast model's group right in the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from edgewise.runtime._errors import RuntimeFailure
from edgewise.runtime._scheduler import Request

if TYPE_CHECKING:
    from edgewise.runtime._pipeline import InferenceResult
    from edgewise.runtime._runtime import Runtime

__all__ = ["LoopBatcher", "LoopBatchers"]

Pending = list[tuple[np.ndarray[Any, Any], bool, "asyncio.Future[Request]"]]


def _resolve(fut: asyncio.Future[Request], req: Request) -> None:
    if not fut.done():
        fut.set_result(req)


class LoopBatcher:
    """Per-event-loop request grouping in front of a `Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pending: dict[str, Pending] = {}

    def add(
        self,
        name: str,
        x: np.ndarray[Any, Any],
        exact_dtype: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Future[Request]:
        """Join (or open) this loop turn's group for `name`; the future gets the request."""
        if loop is None:
            loop = asyncio.get_running_loop()
        fut: asyncio.Future[Request] = loop.create_future()
        group = self.pending.get(name)
        if group is None:
            group = self.pending[name] = []
            loop.call_soon(self._drain, name, loop)
        group.append((x, exact_dtype, fut))
        return fut

    async def infer(
        self, name: str, x: np.ndarray[Any, Any], exact_dtype: bool = False, alone: bool = False
    ) -> InferenceResult:
        """Run one request; raises its `RuntimeFailure`.

        With `alone` (the caller knows no other request is in progress, e.g. the HTTP
        app with one connection busy) the request goes at once, without a loop turn;
        otherwise it joins this loop turn's group.
        """
        if alone and name not in self.pending:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Request] = loop.create_future()
            self._submit(name, [(x, exact_dtype, fut)], loop)
        else:
            fut = self.add(name, x, exact_dtype)
        req = await fut
        if req.error is not None:
            raise req.error
        result: InferenceResult = req.result
        return result

    def _drain(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        group = self.pending.pop(name, [])
        if group:
            self._submit(name, group, loop)

    def _submit(self, name: str, group: Pending, loop: asyncio.AbstractEventLoop) -> None:
        loop_thread = threading.get_ident()

        def done(req: Request) -> None:
            fut: asyncio.Future[Request] = req.ctx
            if threading.get_ident() == loop_thread:
                if not fut.done():
                    fut.set_result(req)
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed; nobody waits
                    loop.call_soon_threadsafe(_resolve, fut, req)

        try:
            reqs = self.runtime.prepare_many(name, [(x, exact) for x, exact, _ in group], done)
        except RuntimeFailure as exc:
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for req, (_, _, fut) in zip(reqs, group, strict=True):
            req.ctx = fut
        self.runtime.dispatch_many(name, reqs)


class LoopBatchers:
    """One `LoopBatcher` per event loop, forgotten when its loop is collected."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._by_loop: weakref.WeakKeyDictionary[Any, LoopBatcher] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[Any], LoopBatcher] | None = None

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
