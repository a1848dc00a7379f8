"""The pipeline spec: what a device runs, as it travels inside a deployment.

A pipeline is `source -> preprocess -> model -> postprocess -> sinks`, with an SLO, a
priority class, an optional fallback model (graceful degradation) and an optional cascade
(escalate low-confidence results to a heavier model, local or upstream over HTTP).
Stages are referred to by registered name plus free-form parameters; the runtime checks
that each name is registered when it starts the pipeline, the control plane only checks
the shape of the document.

Example:
    >>> spec = PipelineSpec.model_validate({
    ...     "name": "digits",
    ...     "model": {"name": "digits-mlp", "version": "1.0.0"},
    ...     "source": {"type": "http"},
    ...     "preprocess": [{"type": "scale", "params": {"factor": 0.0625}}],
    ...     "postprocess": [{"type": "softmax"}, {"type": "argmax"}],
    ...     "sinks": [{"type": "summary"}],
    ...     "slo": {"p95_ms": 20},
    ...     "priority": "critical",
    ... })
    >>> spec.priority
    <Priority.CRITICAL: 'critical'>
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

__all__ = [
    "BUILTIN_STAGE_PARAMS",
    "STRICT_STAGE_PARAMS",
    "BatchingSpec",
    "CascadeSpec",
    "DegradationSpec",
    "ModelRef",
    "PipelineSpec",
    "Priority",
    "SloSpec",
    "StageSpec",
    "unknown_stage_params",
]

_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Priority(enum.StrEnum):
    """Scheduling class; the scheduler serves strictly in this order."""

    CRITICAL = "critical"
    NORMAL = "normal"
    BEST_EFFORT = "best_effort"

    @property
    def rank(self) -> int:
        """0 for the most urgent class."""
        return _RANK[self]


_RANK = {Priority.CRITICAL: 0, Priority.NORMAL: 1, Priority.BEST_EFFORT: 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model pinned by name, and for deployments by version and digest."""

    name: str = Field(pattern=_NAME)
    version: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @property
    def key(self) -> str:
        """`name@version` (or just the name when unpinned)."""
        return f"{self.name}@{self.version}" if self.version else self.name


class StageSpec(_Strict):
    """One stage by registered name (`type`) with its parameters."""

    type: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    params: dict[str, Any] = Field(default_factory=dict)


class SloSpec(_Strict):
    """Latency objective: the rolling p95 over `window_s` must stay under `p95_ms`."""

    p95_ms: float = Field(gt=0, le=600_000)
    window_s: float = Field(default=10.0, gt=0, le=3600)


class BatchingSpec(_Strict):
    """Dynamic batching: take what is queued up to `max_batch`.

    A lone request never waits; `max_queue_delay_ms` > 0 lets the executor wait that long
    for company only when at least one other request is already queued behind it.
    """

    max_batch: int = Field(default=32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000)
    queue_capacity: int = Field(default=256, ge=1, le=1_000_000)


class DegradationSpec(_Strict):
    """When to switch to the fallback model, and when to switch back (hysteresis)."""

    cpu_percent: float | None = Field(default=90.0, gt=0, le=100)
    thermal_c: float | None = Field(default=80.0, gt=0, le=150)
    slo_breach_windows: int = Field(default=1, ge=1, le=100)
    recover_margin: float = Field(default=0.1, ge=0, lt=1)
    recover_windows: int = Field(default=2, ge=1, le=100)


class CascadeSpec(_Strict):
    """Escalate results whose top-1 confidence is below `threshold`.

    Exactly one of `model` (a heavier local model) and `endpoint` (an upstream HTTP URL
    that accepts the same `/v1/pipelines/{name}/infer` request) is given.
    """

    threshold: float = Field(gt=0, le=1)
    model: ModelRef | None = None
    endpoint: str | None = Field(default=None, pattern=r"^https?://")
    timeout_s: float = Field(default=2.0, gt=0, le=60)

    @model_validator(mode="after")
    def _one_target(self) -> CascadeSpec:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("cascade needs exactly one of 'model' or 'endpoint'")
        return self


#: The parameters each built-in stage takes, by (kind, type). The control plane refuses
#: a deployment that gives a built-in stage any other parameter (validation with
#: `STRICT_STAGE_PARAMS` as context): a typo such as `min_conf` for `min_confidence`
#: would otherwise leave the default in force without a word. A device only logs them
#: (`unknown_stage_params`), so a pipeline deployed before this check keeps running
#: after an agent upgrade. Each stage checks its values when the device starts it.
#: Stages registered under other names take any parameters.
BUILTIN_STAGE_PARAMS: dict[tuple[str, str], frozenset[str]] = {
    ("source", "http"): frozenset(),
    ("source", "synthetic"): frozenset(
        {"rate_hz", "count", "npy", "dataset", "shape", "seed", "size"}
    ),
    ("source", "directory"): frozenset({"path", "poll_s"}),
    ("source", "mqtt"): frozenset({"topic", "host", "port", "qos", "dtype", "shape"}),
    ("preprocess", "scale"): frozenset({"factor", "offset"}),
    ("preprocess", "normalize"): frozenset({"mean", "std"}),
    ("preprocess", "reshape"): frozenset({"shape"}),
    ("preprocess", "resize"): frozenset({"height", "width", "layout"}),
    ("postprocess", "softmax"): frozenset(),
    ("postprocess", "argmax"): frozenset(),
    ("postprocess", "topk"): frozenset({"k"}),
    ("postprocess", "threshold"): frozenset({"min_confidence", "label"}),
    ("sink", "log"): frozenset({"level"}),
    ("sink", "mqtt"): frozenset({"topic", "qos", "host", "port"}),
    ("sink", "http"): frozenset({"url", "queue", "timeout_s"}),
    ("sink", "summary"): frozenset(),
}


#: Validation context under which unknown parameters of built-in stages are refused.
STRICT_STAGE_PARAMS = {"strict_stage_params": True}


def _unknown_params(kind: str, stage: StageSpec) -> str | None:
    known = BUILTIN_STAGE_PARAMS.get((kind, stage.type))
    if known is None:
        return None
    extra = sorted(set(stage.params) - known)
    if not extra:
        return None
    takes = ", ".join(sorted(known)) or "no parameters"
    unknown = ", ".join(map(repr, extra))
    return f"{kind} stage {stage.type!r}: unknown parameter {unknown} (it takes {takes})"


class PipelineSpec(_Strict):
    """One pipeline as deployed to a device."""

    name: str = Field(pattern=_NAME)
    model: ModelRef
    source: StageSpec = Field(default_factory=lambda: StageSpec(type="http"))
    preprocess: list[StageSpec] = Field(default_factory=list)
    postprocess: list[StageSpec] = Field(default_factory=list)
    sinks: list[StageSpec] = Field(default_factory=list)
    slo: SloSpec = Field(default_factory=lambda: SloSpec(p95_ms=100.0))
    priority: Priority = Priority.NORMAL
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    fallback: ModelRef | None = None
    degradation: DegradationSpec = Field(default_factory=DegradationSpec)
    cascade: CascadeSpec | None = None
    sample_rate: float = Field(default=0.0, ge=0, le=1)
    requires_accelerator: bool = False

    @model_validator(mode="after")
    def _distinct_models(self) -> PipelineSpec:
        if self.fallback is not None and self.fallback.key == self.model.key:
            raise ValueError("fallback must differ from the primary model")
        return self

    @model_validator(mode="after")
    def _known_stage_params(self, info: ValidationInfo) -> PipelineSpec:
        if info.context and info.context.get("strict_stage_params"):
            problems = unknown_stage_params(self)
            if problems:
                raise ValueError(problems[0])
        return self


def unknown_stage_params(spec: PipelineSpec) -> list[str]:
    """What `spec` gives its built-in stages that they do not take, one line each."""
    stages = [("source", spec.source)]
    stages += [("preprocess", s) for s in spec.preprocess]
    stages += [("postprocess", s) for s in spec.postprocess]
    stages += [("sink", s) for s in spec.sinks]
    return [p for kind, stage in stages if (p := _unknown_params(kind, stage)) is not None]
