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

from edgewise.runtime._model import LoadedModel
from edgewise.runtime._stages import Post

__all__ = ["local_escalator", "upstream_escalator"]

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


def upstream_escalator(endpoint: str, pipeline: str, timeout_s: float) -> Any:
    """Escalate over HTTP to an upstream server speaking the local inference API.

    `endpoint` is the base URL; rows are POSTed as JSON to
    `{endpoint}/v1/pipelines/{pipeline}/infer`.
    """
    import httpx

    client = httpx.Client(timeout=timeout_s)
    url = f"{endpoint.rstrip('/')}/v1/pipelines/{pipeline}/infer"

    def escalate(x: Array) -> Answer:
        try:
            resp = client.post(url, json={"inputs": x.tolist()})
            resp.raise_for_status()
            body = resp.json()
            conf = np.asarray(body["confidences"], dtype=np.float32)
            names = [None if n is None else str(n) for n in body["labels"]]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            log.warning("cascade upstream %s failed: %s", url, exc)
            return None
        if len(names) != x.shape[0]:
            return None
        return conf, names

    return escalate
