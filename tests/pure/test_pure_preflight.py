from __future__ import annotations

from typing import Any

from edgewise.control._preflight import DeviceView, preflight

SCHEMA = {"id": "digits-10", "version": "1"}


def manifest(**requires: Any) -> dict[str, Any]:
    return {
        "requires": {"runtime": "onnxruntime", **requires},
        "label_schema": SCHEMA,
        "labels": ["0", "1"],
    }


MODELS: dict[str, dict[str, Any]] = {
    "digits@1.0.0": manifest(memory_mb=100, min_opset=17),
    "digits@2.0.0": manifest(memory_mb=100, accelerators=["cuda"]),
    "small@1.0.0": manifest(memory_mb=50),
    "other@1.0.0": {**manifest(), "label_schema": {"id": "letters", "version": "1"}},
    "newer@1.0.0": manifest(runtime="onnxruntime>=1.18"),
}


def caps(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "arch": "x86_64",
        "cores": 4,
        "memory_mb": 2048,
        "disk_free_mb": 10_000,
        "runtimes": {"onnxruntime": "1.20.1"},
        "execution_providers": ["CPUExecutionProvider"],
        "accelerators": [],
    }
    return {**base, **over}


def pipe(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, **extra}


def test_matching_lists_the_devices_the_selector_selects() -> None:
    devices = [
        DeviceView("d2", {"site": "a"}, caps()),
        DeviceView("d1", {"site": "a"}, caps()),
        DeviceView("d3", {"site": "b"}, caps()),
    ]
    res = preflight("site=a", {"p": pipe("digits@1.0.0")}, MODELS, devices)
    assert res.matching == ["d1", "d2"]
    assert res.incompatible == {}
    assert res.conflicts == []
    assert res.ok
    assert res.compatible == ["d1", "d2"]


def test_missing_runtime_makes_a_device_incompatible() -> None:
    dev = DeviceView("d1", {}, caps(runtimes={"tflite": "2.14"}))
    res = preflight("", {"p": pipe("digits@1.0.0")}, MODELS, [dev])
    assert res.incompatible == {"d1": ["runtime onnxruntime missing"]}
    assert res.compatible == []
    assert res.ok  # incompatible devices are not a hard conflict


def test_an_agent_that_does_not_know_a_spec_term_is_incompatible_per_pipeline() -> None:
    known = frozenset({"name", "model", "model.name", "batching", "batching.max_batch"})
    old = DeviceView("old", {}, caps(), vocabulary=known)
    new = DeviceView("new", {}, caps(), vocabulary=known | {"batching.overflow"})
    silent = DeviceView("silent", {}, caps())  # reported nothing: not held against it
    pipelines = {
        "a": pipe("digits@1.0.0", terms=["batching", "batching.overflow", "model"]),
        "b": pipe("digits@1.0.0", terms=["batching.max_batch", "model"]),
    }
    res = preflight("", pipelines, MODELS, [old, new, silent])
    assert res.incompatible == {
        "old": ["pipeline 'a': the agent does not know batching.overflow (upgrade the agent)"]
    }
    assert res.compatible == ["new", "silent"] and res.ok


def test_old_runtime_version_is_reported() -> None:
    dev = DeviceView("d1", {}, caps(runtimes={"onnxruntime": "1.17.0"}))
    res = preflight("", {"p": pipe("newer@1.0.0")}, MODELS, [dev])
    assert res.incompatible["d1"] == ["runtime onnxruntime 1.17.0 older than required 1.18"]


def test_memory_below_requirement_is_reported() -> None:
    dev = DeviceView("d1", {}, caps(memory_mb=120))
    res = preflight("", {"p": pipe("digits@1.0.0", fallback="small@1.0.0")}, MODELS, [dev])
    assert res.incompatible["d1"] == ["memory 150 MB required, device has 120 MB"]


def test_missing_accelerator_is_reported_and_execution_providers_count() -> None:
    plain = DeviceView("plain", {}, caps())
    gpu = DeviceView("gpu", {}, caps(execution_providers=["CUDAExecutionProvider"]))
    res = preflight("", {"p": pipe("digits@2.0.0")}, MODELS, [plain, gpu])
    assert res.incompatible == {"plain": ["accelerator cuda missing"]}


def test_opset_is_checked_against_reported_max_opset() -> None:
    dev = DeviceView("d1", {}, caps(max_opset=15))
    res = preflight("", {"p": pipe("digits@1.0.0")}, MODELS, [dev])
    assert res.incompatible["d1"] == ["opset 17 required, device supports up to 15"]


def test_opset_is_derived_from_a_known_onnxruntime_version() -> None:
    dev = DeviceView("d1", {}, caps(runtimes={"onnxruntime": "1.11.1"}))
    res = preflight("", {"p": pipe("digits@1.0.0")}, MODELS, [dev])
    assert res.incompatible["d1"] == ["opset 17 required, device supports up to 16"]


def test_unreported_capabilities_are_not_held_against_a_device() -> None:
    dev = DeviceView("d1", {}, {})
    res = preflight("", {"p": pipe("digits@2.0.0")}, MODELS, [dev])
    assert res.incompatible == {"d1": ["accelerator cuda missing"]}
    res = preflight("", {"p": pipe("digits@1.0.0")}, MODELS, [dev])
    assert res.incompatible == {}


def test_disk_need_comes_from_manifest_file_sizes() -> None:
    big = {**manifest(), "files": [{"path": "m.onnx", "size": 300 * 1024 * 1024}]}
    dev = DeviceView("d1", {}, caps(disk_free_mb=100))
    res = preflight("", {"p": pipe("big@1")}, {"big@1": big}, [dev])
    assert res.incompatible["d1"] == ["disk 300.0 MB required, device has 100 MB free"]


def test_unknown_model_is_a_conflict() -> None:
    res = preflight("", {"p": pipe("ghost@9.9.9")}, MODELS, [])
    assert res.conflicts == ["pipeline 'p': model 'ghost@9.9.9' is not in the registry"]
    assert not res.ok


def test_unknown_fallback_and_cascade_models_are_conflicts() -> None:
    spec = pipe("digits@1.0.0", fallback="nope@1", cascade={"model": "gone@2", "threshold": 0.5})
    res = preflight("", {"p": spec}, MODELS, [])
    assert res.conflicts == [
        "pipeline 'p': fallback 'nope@1' is not in the registry",
        "pipeline 'p': cascade 'gone@2' is not in the registry",
    ]


def test_postprocess_label_schema_mismatch_is_a_conflict() -> None:
    spec = pipe("other@1.0.0", postprocess=[{"name": "top1", "label_schema": SCHEMA}])
    res = preflight("", {"p": spec}, MODELS, [])
    assert res.conflicts == [
        "pipeline 'p': postprocess 'top1' expects label schema digits-10@1, "
        "model 'other@1.0.0' has letters@1"
    ]


def test_postprocess_label_schema_version_mismatch_is_a_conflict() -> None:
    wanted = {"id": "digits-10", "version": "2"}
    spec = pipe("digits@1.0.0", postprocess=[{"name": "top1", "label_schema": wanted}])
    assert preflight("", {"p": spec}, MODELS, []).conflicts != []


def test_matching_postprocess_label_schema_passes() -> None:
    spec = pipe("digits@1.0.0", postprocess=[{"name": "top1", "label_schema": SCHEMA}, "junk"])
    assert preflight("", {"p": spec}, MODELS, []).conflicts == []


def test_label_schema_inside_labels_is_read() -> None:
    nested = {"requires": {}, "labels": {"label_schema": {"id": "letters", "version": "1"}}}
    spec = pipe("n@1", postprocess=[{"name": "top1", "label_schema": SCHEMA}])
    assert len(preflight("", {"p": spec}, {"n@1": nested}, []).conflicts) == 1


def test_fallback_with_other_label_schema_is_a_conflict() -> None:
    res = preflight("", {"p": pipe("digits@1.0.0", fallback="other@1.0.0")}, MODELS, [])
    assert res.conflicts == [
        "pipeline 'p': fallback 'other@1.0.0' has label schema letters@1, "
        "model 'digits@1.0.0' has digits-10@1"
    ]


def test_cascade_with_other_label_schema_is_a_conflict() -> None:
    spec = pipe("digits@1.0.0", cascade={"model": "other@1.0.0"})
    assert "cascade 'other@1.0.0'" in preflight("", {"p": spec}, MODELS, []).conflicts[0]


def test_invalid_selector_is_a_conflict_naming_the_position() -> None:
    res = preflight("site in (a", {"p": pipe("digits@1.0.0")}, MODELS, [])
    assert res.conflicts == [
        "selector: position 11: expected ',' or ')' in the value set of 'site', "
        "found end of selector"
    ]


def test_malformed_pipelines_are_conflicts_not_exceptions() -> None:
    bad: dict[str, Any] = {
        "a": "not-an-object",
        "b": {},
        "c": {"model": 42},
        "d": {"model": "digits@1.0.0", "postprocess": "x", "cascade": 3, "requires": None},
    }
    res = preflight("", bad, MODELS, [DeviceView("d1", {}, {"memory_mb": "lots"})])
    assert res.conflicts == [
        "pipeline 'a': spec must be an object",
        "pipeline 'b': no model",
        "pipeline 'c': model 42 is not 'name@version'",
    ]
    assert res.matching == ["d1"]


def test_no_pipelines_is_a_conflict() -> None:
    assert preflight("", {}, MODELS, []).conflicts == ["deployment has no pipelines"]


def test_to_dict_is_json_ready() -> None:
    dev = DeviceView("d1", {}, caps(memory_mb=10))
    out = preflight("", {"p": pipe("digits@1.0.0")}, MODELS, [dev]).to_dict()
    assert out["matching"] == ["d1"]
    assert out["compatible"] == []
    assert out["incompatible"]["d1"][0].startswith("memory")
