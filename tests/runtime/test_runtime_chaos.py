"""Every request completes exactly once, whatever happens around it.

Threads and an event loop submit to three pipelines of different priorities (some
inputs bad, queues small enough to overflow) while another thread swaps models, pauses
the executor and restarts pipelines. Afterwards every request has completed once, with
a result or an error, and no pipeline counts anything queued or running.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from edgewise.examples import DigitsSplit
from edgewise.runtime import Runtime, RuntimeFailure
from edgewise.runtime._scheduler import Request

from .conftest import SpecFactory

PRIORITIES = {"crit": "critical", "norm": "normal", "be": "best_effort"}


@pytest.mark.parametrize("seed", [1, 2])
def test_every_request_completes_once_under_swaps_pauses_restarts_and_overload(
    mlp_bytes: bytes, logreg_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, seed: int
) -> None:
    rng = random.Random(seed)
    rt = Runtime(cores=1, monitor_interval_s=None)
    models = [rt.load_model(mlp_bytes), rt.load_model(logreg_bytes)]

    def start(name: str) -> None:
        batching = {"max_batch": rng.choice([1, 4, 32]), "queue_capacity": rng.choice([4, 64])}
        spec = make_spec(name, priority=PRIORITIES[name], batching=batching, slo={"p95_ms": 5})
        rt.start_pipeline(spec, models[0], fallback=models[1])

    for name in PRIORITIES:
        start(name)
    lock = threading.Lock()
    completions: Counter[int] = Counter()
    outcomes: Counter[str] = Counter()
    count = [0]

    def ticket() -> int:
        with lock:
            count[0] += 1
            return count[0]

    def finished(i: int, outcome: str) -> None:
        with lock:
            completions[i] += 1
            outcomes[outcome] += 1

    def callback(i: int) -> Any:
        def done(req: Request) -> None:
            finished(i, "ok" if req.error is None else type(req.error).__name__)

        return done

    x = split.x_test
    end = time.monotonic() + 1.0

    def submitter(k: int) -> None:
        r = random.Random(seed * 100 + k)
        first = True  # is refused: a starved thread (a busy machine) still sends a bad one
        while time.monotonic() < end:
            rows = x[r.randrange(300) :][: r.choice([1, 1, 2, 3])]
            if r.random() < 0.1:
                rows = rows.astype(np.float64)  # cast for the model
            if r.random() < 0.03 or first:
                rows = np.zeros((1, 63), np.float32)  # refused
                first = False
            i = ticket()
            try:
                rt.submit(r.choice(list(PRIORITIES)), rows, callback(i), inline=r.random() < 0.5)
            except RuntimeFailure as exc:  # refused at admission: that is its completion
                finished(i, type(exc).__name__)

    async def client(k: int) -> None:
        r = random.Random(seed * 1000 + k)
        while time.monotonic() < end:
            i = ticket()
            try:
                await rt.infer_async(r.choice(list(PRIORITIES)), x[r.randrange(300)])
                finished(i, "ok")
            except RuntimeFailure as exc:
                finished(i, type(exc).__name__)

    def chaos() -> None:
        r = random.Random(seed + 7)
        while time.monotonic() < end:
            op, name = r.random(), r.choice(list(PRIORITIES))
            if op < 0.1:
                rt.pause()
                time.sleep(r.random() * 0.002)
                rt.resume()
            elif op < 0.6:
                rt.swap_model(name, r.choice(models))
            elif op < 0.7:
                rt.stop_pipeline(name, drain_timeout=5)
                start(name)
            time.sleep(r.random() * 0.003)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(2)]
    threads.append(threading.Thread(target=lambda: asyncio.run(_gather(client, 8))))
    threads.append(threading.Thread(target=chaos))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not [t.name for t in threads if t.is_alive()]
        deadline = time.monotonic() + 30
        while len(completions) < count[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(completions) == count[0], ("requests never completed", outcomes)
        twice = [i for i, n in completions.items() if n != 1]
        assert not twice, ("requests completed more than once", twice[:5], outcomes)
        assert outcomes["ok"] > 0 and outcomes["BadInput"] > 0, outcomes
        # A batch's callbacks run before its worker counts it done: let the counters
        # settle (a count that never returns to zero still fails, after the timeout).
        for n in PRIORITIES:
            rt._pipelines[n].executor.drain(rt._pipelines[n], timeout=10)
        left = {n: (rt._pipelines[n].queued, rt._pipelines[n].inflight) for n in PRIORITIES}
        assert left == dict.fromkeys(PRIORITIES, (0, 0)), left
    finally:
        rt.close()


async def _gather(client: Any, n: int) -> None:
    await asyncio.gather(*(client(k) for k in range(n)))
