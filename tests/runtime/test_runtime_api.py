from __future__ import annotations

import edgewise.events
import edgewise.protocol._pipeline
import edgewise.runtime


def test_public_names_are_sorted_and_exist() -> None:
    for module in (edgewise.runtime, edgewise.events, edgewise.protocol._pipeline):
        names = module.__all__
        # ruff's RUF022 order: CONSTANTS, then Classes, then functions.
        assert names == sorted(
            names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)
        )
        assert all(hasattr(module, n) for n in names)


def test_pipeline_spec_is_reexported_by_protocol() -> None:
    import edgewise.protocol

    assert edgewise.protocol.PipelineSpec is edgewise.protocol._pipeline.PipelineSpec


def test_builtin_stages_are_registered() -> None:
    from edgewise.runtime import POSTPROCESS, PREPROCESS, SINKS, SOURCES

    assert PREPROCESS.names() == ["normalize", "reshape", "resize", "scale", "transpose"]
    assert POSTPROCESS.names() == ["argmax", "softmax", "threshold", "topk"]
    assert SOURCES.names() == ["directory", "http", "mqtt", "synthetic"]
    assert SINKS.names() == ["http", "log", "mqtt", "summary"]
