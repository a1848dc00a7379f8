"""`AsyncBatcher`: concurrent submissions share writes; a bad item fails only itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from edgewise.control._batch import AsyncBatcher


def test_concurrent_items_share_a_batch_and_each_gets_its_own_answer() -> None:
    calls: list[list[int]] = []
    release = threading.Event()

    def write(items: Sequence[int]) -> None:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # the first write is slow: the others queue meanwhile

    batcher: AsyncBatcher[int] = AsyncBatcher(write, max_items=3)

    async def main() -> None:
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert calls == [[0], [1, 2, 3], [4, 5]]
    assert batcher.batches == 3


def test_a_bad_item_fails_only_its_own_submission() -> None:
    written: list[int] = []

    def write(items: Sequence[int]) -> None:
        if 13 in items:
            raise ValueError("unlucky")
        written.extend(items)

    batcher: AsyncBatcher[int] = AsyncBatcher(write)

    async def main() -> list[BaseException | None]:
        results = await asyncio.gather(
            *(batcher.submit(i) for i in (11, 12, 13, 14)), return_exceptions=True
        )
        return list(results)

    results = asyncio.run(main())
    assert [type(r).__name__ if r is not None else None for r in results] == [
        None, None, "ValueError", None
    ]  # fmt: skip
    assert sorted(written) == [11, 12, 14]


def test_a_new_event_loop_starts_afresh() -> None:
    seen: list[int] = []
    batcher: AsyncBatcher[int] = AsyncBatcher(seen.extend)
    asyncio.run(batcher.submit(1))
    asyncio.run(batcher.submit(2))  # a second loop: no task of the first one is awaited
    assert seen == [1, 2]


def test_lone_error_propagates() -> None:
    def write(items: Sequence[int]) -> None:
        raise RuntimeError("database is gone")

    batcher: AsyncBatcher[int] = AsyncBatcher(write)
    with pytest.raises(RuntimeError, match="database is gone"):
        asyncio.run(batcher.submit(1))
