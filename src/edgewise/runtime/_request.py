"""What travels through an executor: requests, and what they belong to as it sees them.

A `Request` carries one caller's rows from admission to completion; its `Owner` is the
pipeline (queue capacity, priority rank, counters) and its `Lane` the pipeline bound to
one model, the unit of batching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Lane", "Owner", "Request", "Stacked", "callers", "complete_all"]

log = logging.getLogger(__name__)


class Owner(Protocol):
    """The pipeline a request belongs to, as the executor sees it."""

    name: str
    rank: int
    slo_s: float
    capacity: int
    drop_oldest: bool  # a full queue drops its oldest request rather than refuse a new one
    max_wait_s: float  # longest wait in the queue before a request expires (inf: none)
    queued: int
    inflight: int
    accepting: bool

    def on_shed(self, n: int) -> None:
        """Count requests shed."""

    def on_rejected(self, n: int = 1) -> None:
        """Count requests rejected at admission."""

    def on_expired(self, n: int, now: float) -> None:
        """Count requests found in the queue past their deadline at `now`."""

    def on_superseded(self, n: int) -> None:
        """Count queued requests dropped for newer ones."""

    def on_failed(self, n: int) -> None:
        """Count requests failed by an error out of their lane (a stage that raised)."""


class Lane(Protocol):
    """A pipeline bound to one model: the unit of batching."""

    max_batch: int
    max_queue_delay_s: float

    def execute(self, batch: list[Request]) -> None:
        """Run a batch and complete every request in it (result or error).

        It may leave requests to be completed later by another thread (a batch waiting
        on an upstream server); a caller waiting for one then waits on its `_waiter`.
        """


class Request:
    """One inference request travelling through the executor."""

    __slots__ = (
        "_waiter",
        "callback",
        "ctx",
        "deadline",
        "enqueued",
        "error",
        "lane",
        "n",
        "owner",
        "result",
        "rows",
        "x",
    )

    def __init__(
        self,
        x: npt.NDArray[np.generic],
        lane: Lane,
        owner: Owner,
        enqueued: float,
        callback: Callable[[Request], None] | None = None,
        ctx: Any = None,
        n: int = 1,
    ) -> None:
        self.x = x
        self.rows = int(x.shape[0]) if x.ndim else 1
        self.lane = lane
        self.owner = owner
        self.enqueued = enqueued
        # Not run once the executor's clock is past this (the pipeline's max_queue_ms, or
        # the caller's timeout: see `Runtime.infer`).
        self.deadline = enqueued + owner.max_wait_s
        self.callback = callback
        self.ctx = ctx  # the caller's handle (e.g. an asyncio future), for its callback
        # How many callers' requests this one carries: an asyncio group stacks the rows
        # of many callers into one request (counted as `n` for capacity and metrics).
        self.n = n
        self.result: Any = None
        self.error: BaseException | None = None
        self._waiter: threading.Lock | None = None

    def bound_wait(self, seconds: float) -> None:
        """Not run if still queued `seconds` after it was enqueued.

        A caller's own bound: the pipeline's `max_queue_ms`, if shorter, still holds.
        """
        self.deadline = min(self.deadline, self.enqueued + seconds)

    def _finish(self) -> None:
        if self._waiter is not None:
            self._waiter.release()
        callback = self.callback
        if callback is not None:
            try:  # one that raises must not take the worker or a batch neighbour with it
                callback(self)
            except Exception:
                log.exception("the completion callback of a request raised")

    def complete(self, result: Any) -> None:
        """Deliver the result to whoever waits."""
        self.result = result
        self._finish()

    def fail(self, error: BaseException) -> None:
        """Deliver an error to whoever waits."""
        self.error = error
        self._finish()


class Stacked(Request):
    """A request carrying the rows of several callers, some of them more than one row.

    `ends[i]` is where caller `i`'s rows end. (Callers of one row each need no such
    list: see `callers`.)
    """

    __slots__ = ("ends",)

    ends: list[int]


def callers(r: Request) -> list[tuple[int, int]]:
    """The rows (start, end) of each caller whose request `r` carries."""
    if r.n == 1:
        return [(0, r.rows)]
    if r.n == r.rows:  # one row each (no caller sends an empty batch)
        return [(i, i + 1) for i in range(r.rows)]
    ends = r.ends if isinstance(r, Stacked) else [r.rows]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def complete_all(batch: list[Request], results: list[Any]) -> None:
    """`complete` each request with its result: the batch path, one call per batch."""
    for r, result in zip(batch, results, strict=True):
        r.result = result
        waiter = r._waiter
        if waiter is not None:
            waiter.release()
        callback = r.callback
        if callback is not None:
            # Let through, its exception would leave the requests after it in the batch
            # without their results. (A try costs nothing until something raises.)
            try:
                callback(r)
            except Exception:
                log.exception("the completion callback of a request raised")
