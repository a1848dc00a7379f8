"""Batching for device writes: what concurrent requests submit goes to one thread at a time.

A wave of a rollout makes thousands of devices report within seconds. Written one by
one, each report is a transaction on a worker thread, and on SQLite every such thread
queues on the one write lock: the server's thread pool fills with threads that wait,
and everything else that needs a thread (artifact reads, the rollout driver, cache
misses) waits behind them. `AsyncBatcher` keeps the waiting in the event loop instead:
requests await a future, one writer takes everything pending (up to `max_items`) into
one call of `write` on one thread, and hands each request its own result. An idle
server writes a lone item at once; a busy one writes fewer, larger transactions.

If a batch fails, its items are written one by one, so a bad item fails only its own
request.

Usage::

    reports = AsyncBatcher(store.save_reports)
    await reports.submit((device_id, report, now))   # from the event loop
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from anyio import CapacityLimiter, to_thread

__all__ = ["AsyncBatcher"]

T = TypeVar("T")


class AsyncBatcher(Generic[T]):
    """Calls `write(items)` on one worker thread for whatever is pending; loop-bound."""

    def __init__(self, write: Callable[[Sequence[T]], Any], max_items: int = 500) -> None:
        self.write = write
        self.max_items = max_items
        self.batches = 0  # calls of `write` (a figure for tests and benchmarks)
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter: CapacityLimiter | None = None

    async def submit(self, item: T) -> None:
        """Write `item` (with whatever else is pending); raises what writing it raised."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): start afresh
            self._loop, self._pending, self._task = loop, [], None
            self._limiter = CapacityLimiter(1)
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, done))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_items]
            del self._pending[: len(batch)]
            try:
                await self._call([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, done in [*batch, *self._pending]:
                    if not done.done():
                        done.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                for item, done in batch:  # one by one: a bad item fails only itself
                    try:
                        await self._call([item])
                    except Exception as one:
                        _settle(done, one)
                    else:
                        _settle(done, None)
                continue
            for _, done in batch:
                _settle(done, None)

    async def _call(self, items: list[T]) -> None:
        self.batches += 1
        await to_thread.run_sync(self.write, items, limiter=self._limiter)


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():  # the request went away meanwhile
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
