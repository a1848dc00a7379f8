"""Cascade tiers: where low-confidence rows go for a second opinion.

An escalator takes the rows to escalate and returns their confidences and labels, or
None when the upper tier could not answer (the local answer then stands, and the rows are
not counted as escalated but as cascade failures). A local one answers in the executor's
thread (it is the device's own work); an upstream server's (`UpstreamEscalator.begin`)
answers later, from a thread of its own, so that no executor waits on a network.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime._model import LoadedModel
from edgewise.runtime._stages import Post

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_PENDING",
    "UpstreamEscalator",
    "local_escalator",
    "make_escalator",
    "read_answer",
    "upstream_escalator",
]

Array = npt.NDArray[Any]
Answer = tuple[Array, list[str | None]] | None
log = logging.getLogger(__name__)

#: The longest answer read from an upstream tier: per row it holds a label and a
#: confidence (its outputs too, when the upstream sends them), so a few megabytes is
#: plenty; past that the upstream is not answering the question.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

#: Escalations of one pipeline that wait for its upstream at once. Past that the upstream
#: is not keeping up: more batches' rows keep their local answers (cascade failures)
#: rather than queue up behind it, each holding its callers.
MAX_PENDING = 4


def local_escalator(model: LoadedModel) -> Any:
    """Escalate to a heavier model on this device (same executor, same batch).

    A model that fails on the rows answers None: the local answer stands.
    """
    run, conf_name, labels = model.session.run, model.confidence_output, model.info.labels

    def escalate(x: Array) -> Answer:
        try:
            out = run(x)
        except Exception as exc:  # rows it cannot take: ours stand, counted
            log.warning("cascade model %s failed: %s", model.key, exc)
            return None
        post = Post(out, out.get(conf_name) if conf_name else None, labels)
        post.finish()
        if post.top is None or post.confidence is None:
            return None
        names: list[str | None] = [labels[i] if i < len(labels) else str(i) for i in post.top]
        return post.confidence, names

    return escalate


def read_answer(body: bytes, rows: int) -> tuple[Array, list[str | None]]:
    """An upstream's answer for `rows` rows: their confidences and labels.

    The answer is the local inference API's: an object with `confidences`, a finite
    number per row, and `labels`, a label (text, a class number, or null) per row.

    Raises:
        ValueError: anything else.
    """
    data = orjson.loads(body)  # (JSONDecodeError is a ValueError; NaN is no JSON)
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    conf, labels = data.get("confidences"), data.get("labels")
    if not isinstance(conf, list) or not isinstance(labels, list):
        raise ValueError("the answer needs 'confidences' and 'labels' arrays")
    if len(conf) != rows or len(labels) != rows:
        raise ValueError(f"{len(labels)} labels and {len(conf)} confidences for {rows} rows")
    if not all(type(c) in (int, float) and math.isfinite(c) for c in conf):
        raise ValueError("a confidence that is no finite number")
    if not all(v is None or type(v) in (str, int) for v in labels):
        raise ValueError("a label that is no text, class number or null")
    names = [None if v is None else str(v) for v in labels]
    return np.asarray(conf, dtype=np.float64), names


class UpstreamEscalator:
    """Escalate over HTTP to an upstream server speaking the local inference API.

    Rows are POSTed as JSON to `{endpoint}/v1/pipelines/{pipeline}/infer`. The executor
    never waits for the answer: `begin` hands the rows to a waiter thread of this
    escalator and returns at once, and the waiter calls `done` with the upstream's answer
    when it comes within `timeout_s`, with None otherwise (the local answer then stands,
    and `failures` counts it), whatever the upstream does (connects slowly, drips its
    answer byte by byte, sends gigabytes).

    At most `max_pending` escalations wait at once: past that, `begin` refuses at once
    (the local answer stands, counted as a failure) rather than queue batches without
    bound behind a slow upstream. While a call that ran out of time is still going, no
    new call is made either: one call to a stuck upstream at a time, not one per batch.
    """

    def __init__(
        self,
        endpoint: str,
        pipeline: str,
        timeout_s: float,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_pending: int = MAX_PENDING,
    ) -> None:
        import httpx

        self._client = httpx.Client(timeout=timeout_s)
        self.url = f"{endpoint.rstrip('/')}/v1/pipelines/{pipeline}/infer"
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.max_pending = max_pending
        self.failures = 0
        # Waiters wait (bounded) for calls; calls talk to the upstream (unbounded: a
        # stuck one goes on after its waiter gave up). Threads start as they are needed.
        self._waiters = concurrent.futures.ThreadPoolExecutor(
            max_pending, thread_name_prefix=f"edgewise-cascade-wait-{pipeline}"
        )
        self._calls = concurrent.futures.ThreadPoolExecutor(
            max_pending, thread_name_prefix=f"edgewise-cascade-{pipeline}"
        )
        # Done when the escalator closes: waiters stop waiting, their rows keep the
        # local answer.
        self._closing: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._pending = 0  # escalations handed to a waiter and not answered yet
        self._stuck = 0  # calls still running after their waiter stopped waiting
        self._closed = False

    def begin(self, x: Array, done: Callable[[Answer], None]) -> bool:
        """Ask the upstream about rows `x`; `done(answer)` runs in a waiter thread.

        Returns False, and `done` is never called, when the escalator refuses the rows
        at once: closed, `max_pending` escalations already wait, or a call is stuck
        (counted in `failures`; the local answer stands).
        """
        with self._lock:
            if self._closed:
                why = "closed"
            elif self._stuck:
                why = "its previous call is still running, past its timeout"
            elif self._pending >= self.max_pending:
                why = f"{self._pending} escalations already wait for it"
            else:
                why = ""
                self._pending += 1
        if why:
            self._failed(why)
            return False
        deadline = time.monotonic() + self.timeout_s
        try:
            self._waiters.submit(self._wait, x, deadline, done)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._pending -= 1
            self._failed("closed")
            return False
        return True

    def __call__(self, x: Array) -> Answer:
        """The upstream's answer for rows `x`, or None; blocks until `begin`'s is known."""
        got: list[Answer] = []
        ready = threading.Event()

        def done(answer: Answer) -> None:
            got.append(answer)
            ready.set()

        if not self.begin(x, done):
            return None
        ready.wait()
        return got[0]

    def _wait(self, x: Array, deadline: float, done: Callable[[Answer], None]) -> None:
        """Wait (in a waiter thread) for the call about `x` until `deadline`; `done`."""
        answer: Answer = None
        try:
            answer = self._answer(x, deadline)
        finally:
            with self._lock:
                self._pending -= 1
            try:
                done(answer)
            except Exception:  # the escalator must outlive any one batch
                log.exception("completing an escalated batch raised")

    def _answer(self, x: Array, deadline: float) -> Answer:
        try:
            call = self._calls.submit(self._ask, x, deadline)
        except RuntimeError:  # closed
            return self._failed("closed")
        left = max(0.0, deadline - time.monotonic())
        waited: list[concurrent.futures.Future[Any]] = [call, self._closing]
        concurrent.futures.wait(waited, left, concurrent.futures.FIRST_COMPLETED)
        if not call.done():
            with self._lock:
                self._stuck += 1
            call.add_done_callback(self._unstuck)
            if self._closing.done():
                return self._failed("closed while waiting")
            return self._failed(f"no answer within {self.timeout_s:g} s")
        try:
            return call.result()
        except Exception as exc:  # unreachable, an HTTP error, any answer but rows
            return self._failed(str(exc) or type(exc).__name__)

    def _unstuck(self, _call: concurrent.futures.Future[Answer]) -> None:
        with self._lock:
            self._stuck -= 1

    def _failed(self, why: str) -> Answer:
        with self._lock:
            self.failures += 1
        log.warning("cascade upstream %s failed: %s", self.url, why)
        return None

    def _ask(self, x: Array, deadline: float) -> Answer:
        """The upstream's answer for rows `x` (in a call thread), or raises."""
        if time.monotonic() > deadline:  # (every call thread was busy: nobody waits)
            raise TimeoutError("no call thread was free in time")
        fields = x.dtype.names  # a model with several inputs: sent by name
        inputs = x.tolist() if fields is None else {n: x[n].tolist() for n in fields}
        body = orjson.dumps({"inputs": inputs})
        # Uncompressed: the size read is the size of the answer (no gzip bomb).
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        with self._client.stream("POST", self.url, content=body, headers=headers) as resp:
            resp.raise_for_status()  # (a redirect too: the answer is not here)
            chunks, size = [], 0
            for chunk in resp.iter_raw():
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise ValueError(f"an answer over {self.max_answer_bytes} bytes")
                if time.monotonic() > deadline:  # nobody waits for it any more
                    raise TimeoutError("the answer came too slowly")
                chunks.append(chunk)
        return read_answer(b"".join(chunks), len(x))

    def close(self) -> None:
        """Answer waiting escalations with the local answer now, and stop.

        The HTTP client is closed once calls still running are done (in the background:
        a stuck upstream does not hold a pipeline's stop).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set_result(None)
        self._waiters.shutdown(wait=True)  # each finishes its batch at once now

        def close_client() -> None:
            self._calls.shutdown(wait=True)
            self._client.close()

        threading.Thread(target=close_client, daemon=True).start()


def upstream_escalator(endpoint: str, pipeline: str, timeout_s: float) -> UpstreamEscalator:
    """See `UpstreamEscalator`."""
    return UpstreamEscalator(endpoint, pipeline, timeout_s)


def make_escalator(spec: PipelineSpec, cascade_model: LoadedModel | None) -> Any:
    """The escalator a spec's cascade asks for.

    Raises:
        ValueError: a local cascade without its model.
    """
    assert spec.cascade is not None
    if spec.cascade.model is not None:
        if cascade_model is None:
            raise ValueError(f"pipeline {spec.name!r} has a local cascade but no cascade_model")
        return local_escalator(cascade_model)
    assert spec.cascade.endpoint is not None
    return upstream_escalator(spec.cascade.endpoint, spec.name, spec.cascade.timeout_s)
