"""The inference runtime: pipelines over onnxruntime (and TFLite), scheduled and batched.

The device agent hosts one `Runtime`; everything else here is its vocabulary.

Example:
    >>> from edgewise.protocol import PipelineSpec
    >>> from edgewise.runtime import Runtime, make_inference_app
    >>> rt = Runtime(cores=2, on_event=print)                # doctest: +SKIP
    >>> mlp = rt.load_model(bundle_dir, manifest)            # or ONNX/TFLite bytes, a path
    >>> gate = rt.health_check(mlp, manifest)                # HealthResult(ok, reason, ...)
    >>> spec = PipelineSpec.model_validate({
    ...     "name": "digits", "model": {"name": "digits-mlp", "version": "1.0.0"},
    ...     "priority": "critical", "slo": {"p95_ms": 20},
    ...     "fallback": {"name": "digits-logreg", "version": "1.0.0"},
    ...     "postprocess": [{"type": "topk", "params": {"k": 3}}],
    ...     "sinks": [{"type": "summary"}],
    ... })
    >>> rt.start_pipeline(spec, mlp, fallback=rt.load_model(logreg_dir))
    >>> rt.infer("digits", x_row).label                      # '7' (InferenceResult)
    >>> rt.infer("bert", {"ids": ids, "mask": mask})         # a model with several inputs
    >>> rt.swap_model("digits", rt.load_model(new_dir, new_manifest))   # hot swap
    >>> rt.stats("digits")["nv_inference_request_success"]   # counters, histograms
    >>> rt.prometheus()                                      # text for /metrics
    >>> rt.summaries("digits")                               # windowed counts for telemetry
    >>> server = HttpServer(InferenceAPI(rt))   # POST /v1/pipelines/{name}/infer on loopback
    >>> port = server.start()
    >>> app = make_inference_app(rt)   # the same routes as an ASGI app, for other servers
    >>> rt.close()

Errors (`RuntimeFailure` subclasses) carry an HTTP `status` and a `code`: `BadInput` 400,
`UnknownPipeline` 404, `PayloadTooLarge` 413, `Rejected` 429 (queue full), `Shed`,
`Expired` (waited past `max_queue_ms`), `Superseded` (dropped for a newer request) and
`PipelineStopped` 503; `ModelRejectedInput` 422 (the model refused the input's values),
`InferenceFailed` 500; `ModelLoadError`/`AcceleratorUnavailable` from `load_model`.

Degradation runs on a monitor thread every `monitor_interval_s` seconds (pass None and
call `rt.tick()` yourself, e.g. in tests); the thermal and CPU readers and the clock are
constructor arguments. Switches, swaps, starts and stops are `RuntimeEvent`s delivered to
`on_event` and kept in `rt.events()`; forward them to an `edgewise.events` bus.
"""

from edgewise._httpd import Answer, Deferred, HttpServer, error_answer
from edgewise.runtime._backend import DEFAULT_PROVIDERS, ModelSession, TensorInfo, choose_providers
from edgewise.runtime._degrade import (
    DegradeState,
    Mode,
    Observation,
    read_cpu_percent,
    read_thermal_c,
)
from edgewise.runtime._errors import (
    AcceleratorUnavailable,
    BadInput,
    Expired,
    InferenceFailed,
    ModelLoadError,
    ModelRejectedInput,
    PayloadTooLarge,
    PipelineStopped,
    Rejected,
    RuntimeFailure,
    Shed,
    Superseded,
    UnknownPipeline,
)
from edgewise.runtime._http import InferenceAPI, make_inference_app
from edgewise.runtime._model import HealthResult, HealthSample, LoadedModel, ModelInfo
from edgewise.runtime._pipeline import InferenceResult
from edgewise.runtime._runtime import Runtime, RuntimeEvent
from edgewise.runtime._stages import POSTPROCESS, PREPROCESS, SINKS, SOURCES

__all__ = [
    "DEFAULT_PROVIDERS",
    "POSTPROCESS",
    "PREPROCESS",
    "SINKS",
    "SOURCES",
    "AcceleratorUnavailable",
    "Answer",
    "BadInput",
    "Deferred",
    "DegradeState",
    "Expired",
    "HealthResult",
    "HealthSample",
    "HttpServer",
    "InferenceAPI",
    "InferenceFailed",
    "InferenceResult",
    "LoadedModel",
    "Mode",
    "ModelInfo",
    "ModelLoadError",
    "ModelRejectedInput",
    "ModelSession",
    "Observation",
    "PayloadTooLarge",
    "PipelineStopped",
    "Rejected",
    "Runtime",
    "RuntimeEvent",
    "RuntimeFailure",
    "Shed",
    "Superseded",
    "TensorInfo",
    "UnknownPipeline",
    "choose_providers",
    "error_answer",
    "make_inference_app",
    "read_cpu_percent",
    "read_thermal_c",
]
