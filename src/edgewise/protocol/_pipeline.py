"""The pipeline spec: what a device runs, as it travels inside a deployment.

A pipeline is `source -> preprocess -> model -> postprocess -> sinks`, with an SLO, a
priority class, an optional fallback model (graceful degradation) and an optional cascade
(escalate low-confidence results to a heavier model, local or upstream over HTTP).
Stages are referred to by registered name plus parameters; the runtime checks that each
name is registered when it starts the pipeline. The parameters of the built-in stages are
typed (`edgewise.protocol._stages`): the control plane checks them at deploy time.

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from edgewise.protocol._stages import (
    BUILTIN_STAGE_PARAMS,
    parse_stage_params,
    unknown_param_names,
)

__all__ = [
    "STRICT_STAGE_PARAMS",
    "BatchingSpec",
    "CascadeSpec",
    "DegradationSpec",
    "ModelRef",
    "PipelineSpec",
    "Priority",
    "SloSpec",
    "StageSpec",
    "stage_problems",
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
    """Dynamic batching: take what is queued up to `max_batch`; the queue's policy.

    A lone request never waits; `max_queue_delay_ms` > 0 lets the executor wait that long
    for company only when at least one other request is already queued behind it.

    The queue holds up to `queue_capacity` requests. When it is full, `overflow` says what
    happens to a new one: `reject` turns it away at once (`queue_full`), `drop_oldest`
    fails the pipeline's oldest queued request instead (`superseded`) and takes the new
    one, which suits a live source (a camera) whose newest input is the one that matters.
    `max_queue_ms` bounds how long a request may wait in the queue: one that waited longer
    is not run but fails as `expired`, so an overloaded device spends no time on answers
    their callers stopped waiting for (Triton's queue policy timeout).
    """

    max_batch: int = Field(default=32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000)
    queue_capacity: int = Field(default=256, ge=1, le=1_000_000)
    overflow: Literal["reject", "drop_oldest"] = "reject"
    max_queue_ms: float | None = Field(default=None, gt=0, le=600_000)

    @model_validator(mode="after")
    def _wait_within_bound(self) -> BatchingSpec:
        if self.max_queue_ms is not None and self.max_queue_ms <= self.max_queue_delay_ms:
            raise ValueError(
                f"max_queue_ms ({self.max_queue_ms:g}) must be longer than "
                f"max_queue_delay_ms ({self.max_queue_delay_ms:g}): a request waiting for "
                "company would expire"
            )
        return self


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


#: Validation context under which the control plane checks built-in stages' parameters:
#: names and values (see `edgewise.protocol._stages`).
STRICT_STAGE_PARAMS = {"strict_stage_params": True}


def _unknown_params(kind: str, stage: StageSpec) -> str | None:
    extra = unknown_param_names(kind, stage.type, stage.params)
    if not extra:
        return None
    known = BUILTIN_STAGE_PARAMS[(kind, stage.type)].model_fields
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
    def _usable_stage_params(self, info: ValidationInfo) -> PipelineSpec:
        if info.context and info.context.get("strict_stage_params"):
            problems = stage_problems(self)
            if problems:
                raise ValueError(problems[0])
        return self

    def stages(self) -> list[tuple[str, StageSpec]]:
        """Every stage with its kind, in order: source, preprocess, postprocess, sinks."""
        out = [("source", self.source)]
        out += [("preprocess", s) for s in self.preprocess]
        out += [("postprocess", s) for s in self.postprocess]
        out += [("sink", s) for s in self.sinks]
        return out


def unknown_stage_params(spec: PipelineSpec) -> list[str]:
    """What `spec` gives its built-in stages that they do not take, one line each."""
    return [p for kind, stage in spec.stages() if (p := _unknown_params(kind, stage)) is not None]


def stage_problems(spec: PipelineSpec) -> list[str]:
    """Every built-in stage's unknown parameter names, else its first unusable value."""
    problems = []
    for kind, stage in spec.stages():
        problem = _unknown_params(kind, stage)
        if problem is None:
            try:
                parse_stage_params(kind, stage.type, stage.params)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            problems.append(problem)
    return problems
