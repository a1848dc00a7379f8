"""Faults a simulated fleet suffers, and the httpx transport that injects network faults.

Network faults are injected below the agent's own `AsyncDeviceClient`, in the transport,
so the client's real error handling (transport error -> `RetryableError` -> backoff) is
what the simulation exercises. A flaky request fails in one of two ways, chosen at
random: before it reaches the control plane (connect error) or after the control plane
handled it (the answer is lost), which is what makes idempotent reports and
exactly-once telemetry matter.

Enrollment is never faulted: a lost enrollment answer leaves a device whose key the
control plane knows but whose id it never learned, which a real device handles by
re-enrolling with a new token; the simulator keeps its fleet size exact instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

__all__ = ["Faults", "FaultyTransport"]


@dataclass(frozen=True)
class Faults:
    """Fault rates and sizes (probabilities in 0-1, times in simulated seconds).

    Attributes:
        offline_fraction: devices that enroll, then go dark.
        offline_for_s: how long they stay dark (None: the whole run).
        flaky: probability that any one request fails in the network.
        slow_download: probability that one download is slow.
        slow_download_s: extra time a slow download takes.
        cut_download: probability that one download is cut half way (resumed by Range).
        crash_during_install: probability that one install attempt crashes the agent.
        restart_s: downtime after a crash before the agent is back.
        clock_skew_s: each device's clock is off by a uniform draw in [-S, S].
        old_agents: devices running an older agent (exactly round(fraction * n), picked
            by the seed): it does not know the spec terms `old_agent_lacks` names (each
            with what is under it), and refuses specs that use them, as a real one does.
        old_agent_lacks: the terms those agents were built before.
    """

    offline_fraction: float = 0.0
    offline_for_s: float | None = None
    flaky: float = 0.0
    slow_download: float = 0.0
    slow_download_s: float = 20.0
    cut_download: float = 0.0
    crash_during_install: float = 0.0
    restart_s: float = 10.0
    clock_skew_s: float = 0.0
    old_agents: float = 0.0
    old_agent_lacks: tuple[str, ...] = ("batching.overflow",)

    def __post_init__(self) -> None:
        for name in (
            "offline_fraction",
            "old_agents",
            "flaky",
            "slow_download",
            "cut_download",
            "crash_during_install",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability within 0-1, not {value}")
        if self.flaky >= 1.0:
            raise ValueError("flaky must be below 1 (no request would ever pass)")
        if self.slow_download_s < 0 or self.restart_s < 0 or self.clock_skew_s < 0:
            raise ValueError("slow_download_s, restart_s and clock_skew_s must be >= 0")
        if self.offline_for_s is not None and self.offline_for_s < 0:
            raise ValueError("offline_for_s must be >= 0")


FaultPicker = Callable[[httpx.Request], random.Random | None]


class FaultyTransport(httpx.AsyncBaseTransport):
    """Wrap a real transport; fail requests with probability `rate`.

    Args:
        inner: the transport that really sends.
        rate: probability of a fault per request.
        pick_rng: the random stream to draw from for a request (the sending device's,
            so each device's faults follow its seed); None: leave the request alone.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, rate: float, pick_rng: FaultPicker) -> None:
        self.inner = inner
        self.rate = rate
        self.pick_rng = pick_rng
        self.injected = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send, or fail before or after sending."""
        rng = self.pick_rng(request) if self.rate > 0 else None
        if rng is None or rng.random() >= self.rate:
            return await self.inner.handle_async_request(request)
        self.injected += 1
        if rng.random() < 0.5:
            raise httpx.ConnectError("simulated network fault: connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        await response.aread()
        await response.aclose()
        raise httpx.ReadError("simulated network fault: answer lost", request=request)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()
