"""A token bucket that shapes the telemetry backlog drain after a reconnect.

A fleet that comes back online together must not flood the control plane with hours of
buffered records; each device drains at `rate` records per second with bursts up to
`burst`. The clock is passed in so tests run in virtual time.

Example:
    >>> t = [0.0]
    >>> bucket = TokenBucket(rate=10.0, burst=10.0, clock=lambda: t[0])
    >>> bucket.take(10)
    0.0
    >>> round(bucket.take(5), 2)  # 5 tokens at 10/s
    0.5
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Tokens refill at `rate` per second up to `burst`."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def available(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def take(self, n: float) -> float:
        """Take `n` tokens (going into debt if needed); returns how long to wait first.

        Taking more than `burst` at once is allowed: the debt is the wait.
        """
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
