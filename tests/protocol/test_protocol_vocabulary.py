"""Spec vocabularies: the terms a spec uses, and which of them a side does not know."""

from __future__ import annotations

from typing import Any

from edgewise.protocol import (
    PipelineSpec,
    spec_terms,
    spec_vocabulary,
    unknown_terms,
    vocabulary_digest,
)

FULL: dict[str, Any] = {
    "name": "cam",
    "model": {"name": "m", "version": "1", "sha256": "0" * 64},
    "source": {"type": "mqtt", "params": {"topic": "t", "qos": 1}},
    "preprocess": [{"type": "resize", "params": {"height": 8, "width": 8, "layout": "hwc"}}],
    "postprocess": [{"type": "topk", "params": {"k": 2}}],
    "sinks": [{"type": "summary"}],
    "slo": {"p95_ms": 50},
    "priority": "critical",
    "batching": {"overflow": "drop_oldest", "max_queue_ms": 200},
    "fallback": {"name": "f", "version": "1"},
    "cascade": {"threshold": 0.5, "endpoint": "http://127.0.0.1:1/x"},
    "sample_rate": 0.1,
}


def test_every_term_of_a_valid_spec_is_in_this_sides_vocabulary() -> None:
    PipelineSpec.model_validate(FULL)  # a spec this side accepts...
    terms = spec_terms(FULL)
    assert unknown_terms(terms, frozenset(spec_vocabulary())) == []  # ...it knows all of
    for term in (
        "batching.overflow=drop_oldest",
        "priority=critical",
        "cascade.endpoint",
        "fallback.version",
        "source:mqtt.qos",
        "preprocess:resize.layout=hwc",
        "postprocess:topk.k",
        "sink:summary",
    ):
        assert term in terms


def test_an_older_vocabulary_misses_exactly_the_newer_terms() -> None:
    # An agent built before `overflow` existed, and before `topk` took `k`.
    old = frozenset(
        t
        for t in spec_vocabulary()
        if not t.startswith("batching.overflow") and t != "postprocess:topk.k"
    )
    assert unknown_terms(spec_terms(FULL), old) == [
        "batching.overflow",
        "batching.overflow=drop_oldest",
        "postprocess:topk.k",
    ]
    plain = {"name": "cam", "model": {"name": "m"}, "batching": {"max_batch": 4}}
    assert unknown_terms(spec_terms(plain), old) == []
    # a new choice of a known field is unknown too
    assert unknown_terms(["batching.overflow=newest"], frozenset(spec_vocabulary())) == [
        "batching.overflow=newest"
    ]


def test_a_stage_registered_by_another_package_takes_any_parameters() -> None:
    spec = {"name": "x", "preprocess": [{"type": "crop", "params": {"box": [0, 0, 1, 1]}}]}
    terms = spec_terms(spec)
    assert unknown_terms(terms, frozenset(spec_vocabulary())) == [
        "preprocess:crop",
        "preprocess:crop.box",
    ]
    with_crop = frozenset(spec_vocabulary({"preprocess": ["crop", "scale"]}))
    assert unknown_terms(terms, with_crop) == []
    # a built-in stage's parameters stay checked by name
    assert "preprocess:scale.*" not in with_crop


def test_terms_of_what_is_not_a_spec_are_none_or_partial_never_an_error() -> None:
    assert spec_terms([1, 2]) == []  # type: ignore[arg-type]
    odd = {"sinks": ["log", {"type": 3}, {"type": "log", "params": [1]}], "slo": 5}
    assert spec_terms(odd) == ["sink:log", "sinks", "slo"]


def test_the_digest_follows_the_set_of_terms() -> None:
    a = vocabulary_digest(["b", "a"])
    assert a == vocabulary_digest(["a", "b", "a"]) and a != vocabulary_digest(["a"])
    assert len(a) == 16
