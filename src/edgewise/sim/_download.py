"""Download one artifact the way the agent does: signed, streamed, resumed with `Range`.

A cut download (injected) keeps the first half of the bytes and resumes from there with
`Range: bytes=N-` through `AsyncDeviceClient.open`, so the control plane's 206 path is
exercised; a 200 answer to a ranged request restarts from zero. The whole file is
fetched and its sha256 checked, as the wire contract promises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import httpx

from edgewise.agent import AsyncDeviceClient, RetryableError
from edgewise.protocol import DesiredModelRef
from edgewise.sim._env import FleetStats

__all__ = ["FetchFailed", "fetch_artifact"]

_MAX_ATTEMPTS = 10


class FetchFailed(Exception):
    """A download that cannot succeed (refused, digest mismatch, gave up)."""


async def fetch_artifact(
    client: AsyncDeviceClient,
    ref: DesiredModelRef,
    stats: FleetStats,
    cut: bool,
    retry_wait: Callable[[int, Exception | None], Awaitable[None]],
) -> bytes:
    """The artifact's bytes, checked against `ref.sha256`.

    Args:
        client: the device's client (signs each request).
        ref: what to fetch.
        stats: fleet counters.
        cut: cut this download once, half way.
        retry_wait: sleeps before retry `attempt` (backoff, honouring Retry-After).

    Raises:
        FetchFailed: refused (4xx), digest mismatch, or too many failed attempts.
    """
    data = bytearray()
    attempt = 0
    while True:
        try:
            stats.requests["artifact"] += 1
            async with client.open(ref.url, len(data)) as resp:
                if resp.status_code not in (200, 206):
                    await resp.aread()
                    raise FetchFailed(f"artifact download refused: HTTP {resp.status_code}")
                if resp.status_code == 200:
                    data.clear()  # the whole file, whatever was asked
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    stats.bytes_downloaded += len(chunk)
                    if cut and len(data) >= ref.size // 2 and ref.size > 1:
                        cut = False
                        stats.cut_downloads += 1
                        del data[ref.size // 2 :]
                        raise RetryableError("simulated download cut")
            break
        except (RetryableError, httpx.HTTPError, httpx.StreamError) as exc:
            stats.errors["artifact"] += 1
            attempt += 1
            if attempt > _MAX_ATTEMPTS:
                raise FetchFailed(f"download gave up: {exc}") from None
            await retry_wait(attempt, exc if isinstance(exc, RetryableError) else None)
    stats.downloads += 1
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise FetchFailed("artifact digest mismatch")
    return bytes(data)
