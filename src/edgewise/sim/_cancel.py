"""Stopping tasks that may not stay stopped.

`task.cancel()` once and `await gather(...)` trusts every task to end on the first
cancel. A task deep inside httpx may not: an anyio cancel scope whose own deadline
expires as the cancellation arrives can report it as its timeout, the device sees a
retryable read timeout, and its retry loop carries on; the gather then waits forever
(a sim test once hung 300 s in `Fleet.stop`). Cancelling again until every task has
ended reaches such a task at its next await (the retry's sleep), where nothing
converts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]], recancel_s: float = 0.5) -> None:
    """Cancel `tasks` and return once every one has ended.

    Args:
        tasks: the tasks to stop.
        recancel_s: how long to wait before cancelling a task that is still running.
    """
    every = list(tasks)
    pending = {t for t in every if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for task in every:  # mark every outcome as seen (no "exception never retrieved")
        if not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()
