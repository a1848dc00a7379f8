"""Ingest admission: a control plane takes telemetry at no more than its configured budget.

After an outage the whole fleet reconnects with a backlog. Each device shapes its own
drain (`edgewise.agent.TokenBucket`), but ten thousand shaped drains still add up; this
budget is the control plane's side: a batch that would exceed it is answered 429 with a
`Retry-After`, which the devices' backoff honours.

The bucket refills at `(1 - burst_fraction) * budget` records per second and holds at
most `burst_fraction * budget`, so over *any* one-second interval at most `budget`
records are admitted (refill plus a full bucket), not only on average.

Example:
    >>> t = [0.0]
    >>> b = IngestBudget(1000, clock=lambda: t[0])
    >>> b.admit(100), b.admit(1)
    (0.0, 0.1)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["IngestBudget"]


class IngestBudget:
    """Admits record counts up to `budget` per second; thread-safe."""

    def __init__(
        self,
        budget: float,
        burst_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """A budget of `budget` records per second.

        Raises:
            ValueError: a budget or fraction out of range.
        """
        if budget <= 0 or not 0 < burst_fraction < 1:
            raise ValueError("budget must be > 0 and burst_fraction within (0, 1)")
        self.budget = budget
        self.rate = budget * (1 - burst_fraction)
        self.burst = budget * burst_fraction
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def admit(self, n: int) -> float:
        """Take `n` records if the budget allows; else the seconds to wait (Retry-After).

        A batch larger than the bucket is admitted once the bucket is full, as debt, so
        it is delayed rather than refused forever.
        """
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            need = min(float(n), self.burst)
            if self._tokens >= need:
                self._tokens -= n
                return 0.0
            wait = (need - self._tokens) / self.rate
            return math.ceil(wait * 10) / 10  # Retry-After in tenths: never zero
