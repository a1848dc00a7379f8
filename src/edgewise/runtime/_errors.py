"""Runtime errors; each maps to one HTTP status in the local inference API.

```
RuntimeFailure
├── BadInput            400  wrong shape, dtype, size, or an undecodable body
├── PayloadTooLarge     413  body over the configured limit
├── UnknownPipeline     404
├── Rejected            429  admission control: the class's queue is full
├── Shed                503  best-effort work dropped to keep critical work on time
├── Expired             503  waited in the queue past its deadline; not run
├── Superseded          503  a newer request took its place in a full queue
├── PipelineStopped     503  the pipeline stopped while the request waited
├── ModelLoadError          a model file or manifest the backend cannot use
│   └── AcceleratorUnavailable  the spec requires an accelerator, the session got CPU
└── InferenceFailed     500  the backend raised on a well-formed input
    └── ModelRejectedInput  422  the model refused the input's values (an index out
                                 of range, say): the caller's to fix, not ours
```
"""

from __future__ import annotations

__all__ = [
    "AcceleratorUnavailable",
    "BadInput",
    "Expired",
    "InferenceFailed",
    "ModelLoadError",
    "ModelRejectedInput",
    "PayloadTooLarge",
    "PipelineStopped",
    "Rejected",
    "RuntimeFailure",
    "Shed",
    "Superseded",
    "UnknownPipeline",
]


class RuntimeFailure(Exception):
    """Base of every runtime error; `code` and `status` feed the HTTP error body."""

    code = "runtime_error"
    status = 500


class BadInput(RuntimeFailure):
    """The input does not match what the model takes."""

    code = "bad_input"
    status = 400


class PayloadTooLarge(RuntimeFailure):
    """The request body is over the limit."""

    code = "payload_too_large"
    status = 413


class UnknownPipeline(RuntimeFailure):
    """No pipeline by that name runs here."""

    code = "unknown_pipeline"
    status = 404


class Rejected(RuntimeFailure):
    """Admission control turned the request away at once (queue full)."""

    code = "queue_full"
    status = 429


class Shed(RuntimeFailure):
    """Best-effort work dropped so that critical work meets its SLO."""

    code = "shed"
    status = 503


class Expired(RuntimeFailure):
    """The request was still queued at its deadline and was not run.

    The deadline is the pipeline's `batching.max_queue_ms`, or the caller's own bound when
    that comes first (`X-Max-Queue-Ms`, `max_queue_s=`). `Runtime.infer(timeout=...)`
    raises it too when it stops waiting; a request still queued then is not run.
    """

    code = "expired"
    status = 503


class Superseded(RuntimeFailure):
    """A newer request took this one's place in a full queue (`overflow: drop_oldest`)."""

    code = "superseded"
    status = 503


class PipelineStopped(RuntimeFailure):
    """The pipeline stopped before the request was served."""

    code = "pipeline_stopped"
    status = 503


class ModelLoadError(RuntimeFailure):
    """A model could not be loaded."""

    code = "model_load_error"


class AcceleratorUnavailable(ModelLoadError):
    """An accelerator was required but the session runs on CPU."""

    code = "accelerator_unavailable"


class InferenceFailed(RuntimeFailure):
    """The backend failed on an input that passed validation."""

    code = "inference_failed"


class ModelRejectedInput(InferenceFailed):
    """The model refused the values of a well-formed input (the backend said so).

    An ONNX Gather given an index past its table, say: the shape and dtype fit, the
    values do not. The caller sent it; the pipeline is fine and keeps serving.
    """

    code = "model_rejected_input"
    status = 422
