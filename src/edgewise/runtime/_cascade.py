"""Cascade tiers: where low-confidence rows go for a second opinion.

An escalator takes the rows to escalate and returns their confidences and labels, or
None when the upper tier could not answer (the local answer then stands, and the rows are
not counted as escalated but as cascade failures).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime._model import LoadedModel
from edgewise.runtime._stages import Post

__all__ = [
    "MAX_ANSWER_BYTES",
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

    Rows are POSTed as JSON to `{endpoint}/v1/pipelines/{pipeline}/infer`. The call
    blocks the executor for at most `timeout_s` in all, whatever the upstream does
    (connects slowly, drips its answer byte by byte, sends gigabytes): it runs in a
    thread of its own, which the executor stops waiting for then. On any failure the
    local answer stands and `failures` counts it. While a call that ran out of time is
    still going, the next batch does not call again (and does not wait): one call to a
    stuck upstream at a time, not one per batch.
    """

    def __init__(
        self,
        endpoint: str,
        pipeline: str,
        timeout_s: float,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        import httpx

        self._client = httpx.Client(timeout=timeout_s)
        self.url = f"{endpoint.rstrip('/')}/v1/pipelines/{pipeline}/infer"
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.failures = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"edgewise-cascade-{pipeline}"
        )
        self._call: concurrent.futures.Future[Answer] | None = None
        self._lock = threading.Lock()

    def __call__(self, x: Array) -> Answer:
        with self._lock:
            call = self._call
            if call is not None and not call.done():
                return self._failed("its previous call is still running, past its timeout")
            deadline = time.monotonic() + self.timeout_s
            try:
                call = self._call = self._pool.submit(self._ask, x, deadline)
            except RuntimeError:  # closed
                return self._failed("closed")
        try:
            return call.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            return self._failed(f"no answer within {self.timeout_s:g} s")
        except Exception as exc:  # unreachable, an HTTP error, any answer but rows
            return self._failed(str(exc) or type(exc).__name__)

    def _failed(self, why: str) -> Answer:
        self.failures += 1
        log.warning("cascade upstream %s failed: %s", self.url, why)
        return None

    def _ask(self, x: Array, deadline: float) -> Answer:
        """The upstream's answer for rows `x` (in the call's thread), or raises."""
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
        """Close the HTTP client once a call still running is done; stop the thread."""
        try:
            self._pool.submit(self._client.close)
        except RuntimeError:  # closed already
            return
        self._pool.shutdown(wait=False)


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
