"""One retry policy for every uplink: exponential backoff, full jitter, `Retry-After` honoured.

The policy is an object, not a loop pattern, so the reconcile loop, the report sender,
the telemetry drain and the artifact fetcher all back off the same way and tests drive it
in virtual time through the injected clock and sleep.

Example:
    >>> policy = Backoff(base_s=1.0, max_delay_s=8.0, rng=random.Random(0))
    >>> 0.0 <= policy.delay(3) <= 8.0
    True
    >>> policy.delay(0, retry_after=30.0) >= 30.0
    True
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Backoff", "GiveUp", "RetryableError"]

T = TypeVar("T")


class RetryableError(Exception):
    """A transient uplink failure; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GiveUp(Exception):
    """Raised when max tries or max time ran out; the last error is the `__cause__`."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter.

    Attributes:
        base_s: the cap of the first delay.
        factor: growth of the cap per attempt.
        max_delay_s: the cap never grows past this.
        max_tries: give up after this many calls (None: never).
        max_time_s: give up when this much time passed since the first call (None: never).
        recoverable: exceptions that are retried; anything else propagates at once.
        clock: monotonic seconds.
        sleep: blocking sleep, for `call`.
        rng: jitter source.
    """

    base_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 60.0
    max_tries: int | None = None
    max_time_s: float | None = None
    recoverable: tuple[type[BaseException], ...] = (RetryableError, OSError)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before retry number `attempt` (0-based).

        Full jitter (uniform in [0, cap]) spreads a fleet that lost its server at the same
        instant; a server's `Retry-After` is a floor because the server knows its load.
        """
        cap = min(self.max_delay_s, self.base_s * self.factor ** min(attempt, 64))
        wait = self.rng.uniform(0.0, cap)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(retry_after, self.max_delay_s * 10))
        return wait

    def _next_wait(self, attempt: int, started: float, exc: BaseException) -> float:
        if self.max_tries is not None and attempt + 1 >= self.max_tries:
            raise GiveUp(f"gave up after {attempt + 1} tries: {exc}") from exc
        wait = self.delay(attempt, getattr(exc, "retry_after", None))
        if self.max_time_s is not None and self.clock() + wait - started > self.max_time_s:
            raise GiveUp(f"gave up after {self.clock() - started:.1f} s: {exc}") from exc
        return wait

    def call(self, fn: Callable[[], T]) -> T:
        """Call `fn` until it returns, retrying recoverable exceptions.

        Raises:
            GiveUp: max tries or max time exhausted.
        """
        started = self.clock()
        attempt = 0
        while True:
            try:
                return fn()
            except self.recoverable as exc:
                self.sleep(self._next_wait(attempt, started, exc))
                attempt += 1

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        """The asyncio twin of `call` (sleeps with `asyncio.sleep`)."""
        started = self.clock()
        attempt = 0
        while True:
            try:
                return await fn()
            except self.recoverable as exc:
                await asyncio.sleep(self._next_wait(attempt, started, exc))
                attempt += 1
