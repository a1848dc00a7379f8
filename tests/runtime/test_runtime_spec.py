from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgewise.protocol import STRICT_STAGE_PARAMS, PipelineSpec, Priority, unknown_stage_params


def _spec(**extra: object) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "p", "model": {"name": "m"}, **extra})


def test_defaults_are_an_http_source_normal_priority_and_no_delay_batching() -> None:
    spec = _spec()
    assert spec.source.type == "http"
    assert spec.priority is Priority.NORMAL
    assert spec.batching.max_queue_delay_ms == 0


def test_priority_ranks_are_strict() -> None:
    assert [p.rank for p in (Priority.CRITICAL, Priority.NORMAL, Priority.BEST_EFFORT)] == [0, 1, 2]


def test_cascade_needs_exactly_one_target() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        _spec(cascade={"threshold": 0.5})
    with pytest.raises(ValidationError, match="exactly one"):
        _spec(cascade={"threshold": 0.5, "model": {"name": "big"}, "endpoint": "http://x"})
    assert _spec(cascade={"threshold": 0.5, "endpoint": "http://up:8080"}).cascade is not None


def test_fallback_must_differ_from_primary() -> None:
    with pytest.raises(ValidationError, match="differ"):
        _spec(fallback={"name": "m"})


@pytest.mark.parametrize(
    "bad",
    [
        {"priority": "urgent"},
        {"slo": {"p95_ms": 0}},
        {"sample_rate": 1.5},
        {"batching": {"max_batch": 0}},
        {"unknown_field": 1},
        {"name": "Bad Name"},
    ],
)
def test_invalid_specs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(**bad)


def test_spec_round_trips_through_json() -> None:
    spec = _spec(
        priority="critical",
        preprocess=[{"type": "scale", "params": {"factor": 0.0625}}],
        cascade={"threshold": 0.6, "model": {"name": "big", "version": "1.0.0"}},
    )
    assert PipelineSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"postprocess": [{"type": "threshold", "params": {"min_conf": 0.9}}]},
            "postprocess stage 'threshold': unknown parameter 'min_conf' "
            "(it takes label, min_confidence)",
        ),
        ({"postprocess": [{"type": "topk", "params": {"K": 5}}]}, "unknown parameter 'K'"),
        ({"preprocess": [{"type": "resize", "params": {"hieght": 8}}]}, "'hieght'"),
        ({"source": {"type": "mqtt", "params": {"topic": "t", "tpoic": "u"}}}, "'tpoic'"),
        ({"sinks": [{"type": "summary", "params": {"window": 5}}]}, "takes no parameters"),
    ],
)
def test_a_built_in_stage_refuses_parameters_it_does_not_take(
    stage: dict[str, object], message: str
) -> None:
    body = {"name": "p", "model": {"name": "m"}, **stage}
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineSpec.model_validate(body, context=STRICT_STAGE_PARAMS)  # the control plane
    # A device keeps a pipeline deployed before the check running, and says why.
    (problem,) = unknown_stage_params(PipelineSpec.model_validate(body))
    assert message in problem


def test_stages_registered_under_other_names_take_any_parameters() -> None:
    body = {"postprocess": [{"type": "my_decoder", "params": {"anything": [1, 2]}}]}
    spec = PipelineSpec.model_validate(
        {"name": "p", "model": {"name": "m"}, **body}, context=STRICT_STAGE_PARAMS
    )
    assert spec.postprocess[0].params == {"anything": [1, 2]}
    assert unknown_stage_params(spec) == []


def test_every_built_in_stage_lists_its_parameters_and_nothing_else_is_listed() -> None:
    from edgewise.protocol import BUILTIN_STAGE_PARAMS
    from edgewise.runtime import POSTPROCESS, PREPROCESS, SINKS, SOURCES

    registered = {
        (registry.kind, name)
        for registry in (SOURCES, PREPROCESS, POSTPROCESS, SINKS)
        for name in registry.names()
        # what edgewise itself registers, not stages a test (or an app) adds
        if registry.get(name).__module__.startswith("edgewise.")
    }
    assert registered == set(BUILTIN_STAGE_PARAMS)
