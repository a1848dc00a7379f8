from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgewise.protocol import (
    BUILTIN_STAGE_PARAMS,
    STRICT_STAGE_PARAMS,
    MqttSourceParams,
    PipelineSpec,
    Priority,
    TopkParams,
    parse_stage_params,
    stage_problems,
    unknown_stage_params,
)
from edgewise.runtime._stages import Post


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
    from edgewise.runtime import POSTPROCESS, PREPROCESS, SINKS, SOURCES

    registered = {
        (registry.kind, name)
        for registry in (SOURCES, PREPROCESS, POSTPROCESS, SINKS)
        for name in registry.names()
        # what edgewise itself registers, not stages a test (or an app) adds
        if registry.get(name).__module__.startswith("edgewise.")
    }
    assert registered == set(BUILTIN_STAGE_PARAMS)
    # ... and each is built from that model, so both sides read a value the same way
    assert all(name in registry._typed for registry, name in _by_registry(registered))


def _by_registry(stages: set[tuple[str, str]]) -> list[tuple[Any, str]]:
    from edgewise.runtime import POSTPROCESS, PREPROCESS, SINKS, SOURCES

    kinds = {r.kind: r for r in (SOURCES, PREPROCESS, POSTPROCESS, SINKS)}
    return [(kinds[kind], name) for kind, name in sorted(stages)]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        pytest.param(
            {"postprocess": [{"type": "topk", "params": {"k": 0}}]},
            "postprocess stage 'topk': k: must be >= 1 (got 0)",
            id="topk-k-0",
        ),
        pytest.param(
            {"postprocess": [{"type": "threshold", "params": {"min_confidence": 90}}]},
            "min_confidence: must be <= 1.0 (got 90)",
            id="threshold-percent",
        ),
        pytest.param(
            {"sinks": [{"type": "mqtt", "params": {"port": 70000}}]},
            "sink stage 'mqtt': port: must be <= 65535 (got 70000)",
            id="mqtt-port",
        ),
        pytest.param(
            {"sinks": [{"type": "http", "params": {"url": "hooks.example"}}]},
            "sink stage 'http': url: must be an http:// or https:// URL",
            id="http-url",
        ),
        pytest.param(
            {"sinks": [{"type": "log", "params": {"level": "loud"}}]},
            "level: must be a logging level",
            id="log-level",
        ),
        pytest.param(
            {"source": {"type": "directory", "params": {"poll_s": 1}}},
            "source stage 'directory': path: is required",
            id="directory-no-path",
        ),
        pytest.param(
            {"source": {"type": "directory", "params": {"path": "/in", "poll_s": 0}}},
            "poll_s: must be > 0.0 (got 0)",
            id="directory-busy-poll",
        ),
        pytest.param(
            {"source": {"type": "synthetic", "params": {"dataset": "mnist"}}},
            "dataset: Input should be 'digits' (got 'mnist')",
            id="synthetic-unknown-dataset",
        ),
        pytest.param(
            {"source": {"type": "synthetic", "params": {"size": 1 << 20, "shape": [1 << 20]}}},
            "size x shape is 1099511627776 values; at most 67108864",
            id="synthetic-terabytes",
        ),
        pytest.param(
            {"source": {"type": "mqtt", "params": {"topic": "t", "shape": "1,x"}}},
            "shape: must be dimensions such as '1,64'",
            id="mqtt-shape",
        ),
        pytest.param(
            {"preprocess": [{"type": "normalize", "params": {"std": [0.5, 0]}}]},
            "preprocess stage 'normalize': std: must not be zero",
            id="normalize-zero-std",
        ),
        pytest.param(
            {"preprocess": [{"type": "reshape", "params": {"shape": [-1, -1]}}]},
            "shape: at most one dimension may be -1",
            id="reshape-two-free",
        ),
        pytest.param(
            {"preprocess": [{"type": "transpose", "params": {"axes": [2, 0, 0]}}]},
            "preprocess stage 'transpose': axes: must be a permutation of 0..2",
            id="transpose-not-a-permutation",
        ),
        pytest.param(
            {"preprocess": [{"type": "transpose", "params": {}}]},
            "preprocess stage 'transpose': axes: is required",
            id="transpose-no-axes",
        ),
        pytest.param(
            {"preprocess": [{"type": "scale", "params": {"factor": [1.0, 1e39]}}]},
            "factor: must be a finite number within float32's range (got [1.0, 1e+39])",
            id="scale-beyond-float32",
        ),
        pytest.param(
            {"preprocess": [{"type": "normalize", "params": {"std": 1e-50}}]},
            "std: must not be zero (got 1e-50)",
            id="normalize-std-rounds-to-zero",
        ),
        pytest.param(
            {"preprocess": [{"type": "scale", "params": {"factor": "x"}}]},
            "factor: must be a number or a list of numbers",
            id="scale-text",
        ),
    ],
)
def test_a_built_in_stage_refuses_values_it_cannot_use_at_deploy_time(
    stage: dict[str, object], message: str
) -> None:
    body = {"name": "p", "model": {"name": "m"}, **stage}
    with pytest.raises(ValidationError) as info:
        PipelineSpec.model_validate(body, context=STRICT_STAGE_PARAMS)  # the control plane
    assert message in str(info.value)
    # The same words come from the device, which builds the stage from the same model.
    (problem,) = stage_problems(PipelineSpec.model_validate(body))
    assert message in problem


def test_values_are_read_alike_on_both_sides() -> None:
    from edgewise.runtime import SOURCES

    params = {"topic": 7, "shape": "1, 64", "qos": "1", "port": 1884.0}
    parsed = parse_stage_params("source", "mqtt", params)
    assert parsed == MqttSourceParams(topic="7", shape=(1, 64), qos=1, port=1884)
    source = SOURCES.build("mqtt", params, None, "p")
    assert (source.topic, source.shape, source.qos, source.port) == ("7", (1, 64), 1, 1884)


def test_a_device_drops_parameters_a_stage_does_not_take_and_uses_the_rest() -> None:
    from edgewise.runtime import POSTPROCESS

    with pytest.raises(ValueError, match="postprocess stage 'topk': K: unknown parameter"):
        parse_stage_params("postprocess", "topk", {"k": 2, "K": 5})
    assert parse_stage_params("postprocess", "topk", {"k": 2, "K": 5}, lenient=True) == (
        TopkParams(k=2)
    )
    topk = POSTPROCESS.build("topk", {"k": 2, "K": 5})  # a device builds it with k=2
    post = Post(outputs={}, scores=np.array([[0.1, 0.7, 0.2]], np.float32), labels=("a", "b", "c"))
    topk(post)
    assert post.topk is not None and [name for name, _ in post.topk[0]] == ["b", "c"]


def test_a_stage_registered_again_without_a_model_takes_the_mapping() -> None:
    from edgewise.runtime import POSTPROCESS

    builtin = POSTPROCESS.get("topk")
    seen: list[object] = []
    try:
        POSTPROCESS.register("topk")(lambda params: seen.append(params) or (lambda post: None))
        POSTPROCESS.build("topk", {"k": 2, "mine": True})
        assert seen == [{"k": 2, "mine": True}]
    finally:
        POSTPROCESS.register("topk", typed=True)(builtin)
    with pytest.raises(ValueError, match="no parameter model for postprocess stage 'mine'"):
        POSTPROCESS.register("mine", typed=True)


_BUILTIN = list(BUILTIN_STAGE_PARAMS)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    stage=st.sampled_from(sorted(_BUILTIN)),
    params=st.dictionaries(
        st.sampled_from(["k", "shape", "factor", "std", "height", "url", "topic", "x"]) | st.text(),
        _JSON,
        max_size=4,
    ),
)
def test_any_json_params_are_a_stage_or_a_value_error_naming_it(
    stage: tuple[str, str], params: dict[str, Any]
) -> None:
    from edgewise.runtime import POSTPROCESS, PREPROCESS

    kind, name = stage
    try:
        parse_stage_params(kind, name, params)
    except ValueError as exc:
        assert str(exc).startswith(f"{kind} stage {name!r}: "), exc
    # Pre- and postprocess stages are pure: a device builds them or says why it cannot.
    registry = {"preprocess": PREPROCESS, "postprocess": POSTPROCESS}.get(kind)
    if registry is not None:
        try:
            registry.build(name, params)
        except ValueError as exc:
            assert str(exc).startswith(f"{kind} stage {name!r}: "), exc
