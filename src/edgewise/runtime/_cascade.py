"""Cascade tiers: where low-confidence rows go for a second opinion.

An escalator takes the rows to escalate and returns their confidences and labels, or
None when the upper tier could not answer (the local answer then stands, and the rows are
not counted as escalated).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._pipeline import PipelineSpec
from edgewise.runtime._model import LoadedModel
from edgewise.runtime._stages import Post

__all__ = ["UpstreamEscalator", "local_escalator", "make_escalator", "upstream_escalator"]

Array = npt.NDArray[Any]
Answer = tuple[Array, list[str | None]] | None
log = logging.getLogger(__name__)


def local_escalator(model: LoadedModel) -> Any:
    """Escalate to a heavier model on this device (same executor, same batch)."""
    run, conf_name, labels = model.session.run, model.confidence_output, model.info.labels

    def escalate(x: Array) -> Answer:
        out = run(x)
        post = Post(out, out.get(conf_name) if conf_name else None, labels)
        post.finish()
        if post.top is None or post.confidence is None:
            return None
        names: list[str | None] = [labels[i] if i < len(labels) else str(i) for i in post.top]
        return post.confidence, names

    return escalate


class UpstreamEscalator:
    """Escalate over HTTP to an upstream server speaking the local inference API.

    Rows are POSTed as JSON to `{endpoint}/v1/pipelines/{pipeline}/infer`. The call
    blocks the executor for at most `timeout_s`; on any failure the local answer stands.
    """

    def __init__(self, endpoint: str, pipeline: str, timeout_s: float) -> None:
        import httpx

        self._client = httpx.Client(timeout=timeout_s)
        self.url = f"{endpoint.rstrip('/')}/v1/pipelines/{pipeline}/infer"
        self.failures = 0

    def __call__(self, x: Array) -> Answer:
        try:
            fields = x.dtype.names  # a model with several inputs: sent by name
            inputs = x.tolist() if fields is None else {n: x[n].tolist() for n in fields}
            resp = self._client.post(self.url, json={"inputs": inputs})
            resp.raise_for_status()
            body = resp.json()
            conf = np.asarray(body["confidences"], dtype=np.float32)
            names = [None if n is None else str(n) for n in body["labels"]]
            if conf.shape != (x.shape[0],) or len(names) != x.shape[0]:
                raise ValueError(f"{len(names)} labels, confidences {list(conf.shape)}")
        except Exception as exc:  # unreachable, an HTTP error, any answer but rows: ours stands
            self.failures += 1
            log.warning("cascade upstream %s failed: %s", self.url, exc)
            return None
        return conf, names

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()


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
