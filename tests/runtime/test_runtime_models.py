from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.protocol import PipelineSpec
from edgewise.runtime import (
    AcceleratorUnavailable,
    BadInput,
    ModelInfo,
    ModelLoadError,
    Runtime,
    choose_providers,
)
from edgewise.runtime._model import cast_fitting, castable, health_check

from .conftest import SpecFactory, log_model, onnx_model, until


def test_providers_follow_preference_and_always_end_with_cpu() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider"]
    chosen = choose_providers(
        ["TensorrtExecutionProvider", "OpenVINOExecutionProvider", "CUDAExecutionProvider"],
        available,
    )
    assert chosen == ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers([], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_model_from_bytes_reports_cpu_provider_and_io(runtime: Runtime, mlp_bytes: bytes) -> None:
    model = runtime.load_model(mlp_bytes)
    assert model.provider == "CPUExecutionProvider"
    assert model.session.input.name == "input"
    assert model.session.input.shape == (None, 64)
    assert model.confidence_output == "probabilities"


def test_required_accelerator_refuses_silent_cpu_fallback(
    runtime: Runtime, mlp_bytes: bytes
) -> None:
    with pytest.raises(AcceleratorUnavailable, match="accelerator is required"):
        runtime.load_model(mlp_bytes, require_accelerator=True)


def test_pipeline_requiring_accelerator_refuses_a_cpu_model(
    runtime: Runtime, mlp_bytes: bytes
) -> None:
    spec = PipelineSpec.model_validate(
        {"name": "gpu-only", "model": {"name": "m"}, "requires_accelerator": True}
    )
    with pytest.raises(AcceleratorUnavailable):
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))


def test_garbage_bytes_are_a_model_load_error(runtime: Runtime) -> None:
    with pytest.raises(ModelLoadError, match="cannot load"):
        runtime.load_model(b"not an onnx model")


def test_missing_model_file_is_a_model_load_error(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        runtime.load_model(tmp_path / "absent.onnx")


def test_bundle_directory_loads_with_manifest_labels_and_version(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    directory, manifest = bundle_dirs["digits-mlp@1.0.0"]
    model = runtime.load_model(directory, manifest)
    assert model.key == "digits-mlp@1.0.0"
    assert model.info.labels == tuple(str(i) for i in range(10))
    # Without the manifest object, manifest.json in the directory is read.
    assert runtime.load_model(directory).key == "digits-mlp@1.0.0"


def test_health_check_passes_on_the_bundled_model(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    directory, manifest = bundle_dirs["digits-mlp@1.0.0"]
    result = runtime.health_check(runtime.load_model(directory, manifest), manifest)
    assert result.ok, result.reason
    assert result.passed == result.total == 10
    assert result.max_latency_ms >= 0


def test_health_check_fails_against_another_models_expectations(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    # The corrupted-label model (2.0.0) must not pass 1.0.0's install gate.
    _, good_manifest = bundle_dirs["digits-mlp@1.0.0"]
    bad_dir, bad_manifest = bundle_dirs["digits-logreg@1.0.0"]
    result = runtime.health_check(runtime.load_model(bad_dir, bad_manifest), good_manifest)
    assert not result.ok
    assert result.reason.startswith("health check failed: ")
    assert f"/{result.total} outputs out of tolerance" in result.reason


def test_health_check_latency_bound_fails_the_gate(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    directory, manifest = bundle_dirs["digits-mlp@1.0.0"]
    doc = json.loads((directory / "manifest.json").read_text())
    doc["health"]["max_latency_ms"] = 1e-9
    result = runtime.health_check(runtime.load_model(directory, manifest), doc)
    assert not result.ok
    assert "latency" in result.reason


def _clock(durations_ms: list[float]) -> Callable[[], float]:
    """A clock whose consecutive start/stop readings are `durations_ms` apart."""
    readings: list[float] = []
    now = 0.0
    for d in durations_ms:
        readings += [now, now + d / 1000.0]
        now += d / 1000.0 + 1.0
    it = iter(readings)
    return lambda: next(it)


def test_one_preempted_health_run_does_not_fail_the_gate(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    directory, manifest = bundle_dirs["digits-mlp@1.0.0"]
    model = runtime.load_model(directory, manifest)
    # Sample 1 first takes 69 ms against the 50 ms bound, then 2 ms; the rest 1 ms.
    clock = _clock([69.0, 2.0] + [1.0] * 9)
    result = health_check(model, ModelInfo.from_manifest(manifest), clock=clock)
    assert result.ok, result.reason
    assert result.max_latency_ms == pytest.approx(2.0)


def test_a_model_slow_on_every_try_fails_the_gate(
    runtime: Runtime, bundle_dirs: dict[str, tuple[Path, Any]]
) -> None:
    directory, manifest = bundle_dirs["digits-mlp@1.0.0"]
    model = runtime.load_model(directory, manifest)
    clock = _clock([1.0] * 4 + [80.0, 70.0, 75.0] + [1.0] * 5)
    result = health_check(model, ModelInfo.from_manifest(manifest), clock=clock)
    assert not result.ok
    assert "latency 70.0 ms over the 50 ms bound" in result.reason
    assert result.max_latency_ms == pytest.approx(70.0)


def test_manifest_info_reads_plain_dicts() -> None:
    info = ModelInfo.from_manifest(
        {"name": "m", "version": "2.0.0", "format": "onnx", "model": "m.onnx", "labels": ["a"]}
    )
    assert (info.key, info.model_file, info.labels) == ("m@2.0.0", "m.onnx", ("a",))


def test_validate_rejects_wrong_shape_and_dtype(runtime: Runtime, mlp_bytes: bytes) -> None:
    model = runtime.load_model(mlp_bytes)
    assert model.validate(np.zeros(64, np.float32)).shape == (1, 64)
    assert model.validate(np.zeros((3, 64), np.float64)).dtype == np.float32
    with pytest.raises(BadInput, match="shape"):
        model.validate(np.zeros((1, 63), np.float32))
    with pytest.raises(BadInput, match="dtype"):
        model.validate(np.zeros((1, 64), np.float64), exact_dtype=True)
    with pytest.raises(BadInput, match="dtype"):
        model.validate(np.array([["a"] * 64]))
    # A cast that would change a value is refused (float64 beyond float32 becomes inf).
    with pytest.raises(BadInput, match="range of the model's float32 input"):
        model.validate(np.array([[1e300] + [0.0] * 63]))
    assert model.validate(np.array([[3.0e38] * 64])).max() == np.float32(3.0e38)


@pytest.mark.parametrize(
    ("values", "want", "fits"),
    [
        ([0, 255], "uint8", True),  # JSON pixels for a uint8 image model
        ([-1, 7], "uint8", False),
        ([256], "uint8", False),
        ([-128, 127], "int8", True),
        ([300], "int8", False),
        ([2**40], "int32", False),
        ([65504.0], "float16", True),
        ([70000.0], "float16", False),
        ([70000], "float16", False),  # an integer that float16 cannot hold either
        ([3.0e38, 0.1], "float32", True),  # rounded to the nearest float32, not refused
        ([float("inf"), 1.0], "float32", True),  # infinity was sent, not made by the cast
    ],
)
def test_casts_of_decoded_numbers_keep_every_value_or_refuse(
    values: list[float], want: str, fits: bool
) -> None:
    x = np.array([values])
    assert castable(x.dtype, np.dtype(want))
    if fits:
        y = cast_fitting(x, np.dtype(want))
        assert y.dtype == np.dtype(want)
        assert np.allclose(y.astype(np.float64), x.astype(np.float64), rtol=1e-6)
    else:
        with pytest.raises(BadInput, match=f"range of the model's {want} input"):
            cast_fitting(x, np.dtype(want))


def test_only_numbers_of_compatible_kinds_are_cast() -> None:
    assert not castable(np.dtype(np.float64), np.dtype(np.int64))  # would drop fractions
    assert not castable(np.dtype(np.float64), np.dtype(np.uint8))
    assert not castable(np.dtype("U3"), np.dtype(np.float32))
    assert castable(np.dtype(np.int64), np.dtype(np.uint8))  # range-checked on cast


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint32", "uint64", "int8", "bool"])
def test_models_with_any_numeric_input_type_load_and_serve(runtime: Runtime, dtype: str) -> None:
    # A depth camera's frames are uint16: such a model was read as taking float32 and
    # failed its warm-up with onnxruntime's own error.
    from onnx import helper

    want = np.dtype(dtype)
    model = runtime.load_model(onnx_model(helper.np_dtype_to_tensor_dtype(want)))
    assert model.session.input.dtype == want
    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": dtype, "model": {"name": "m"}}), model
    )
    raw = np.array([[1, 0, 1, 1]], dtype=want)
    got = runtime.infer(dtype, raw, exact_dtype=True).outputs["y"]
    assert got.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    if dtype != "bool":  # decoded JSON integers are cast, each value kept or refused
        assert runtime.infer(dtype, np.array([[1, 0, 1, 1]])).outputs["y"].tolist() == got.tolist()
        with pytest.raises(BadInput, match=f"range of the model's {dtype} input"):
            runtime.infer(dtype, np.array([[-1, 2**40, 0, 0]]))


def test_models_a_pipeline_cannot_feed_are_load_errors_that_say_why(runtime: Runtime) -> None:
    from onnx import TensorProto

    with pytest.raises(
        ModelLoadError, match=r"input 'x0' is a tensor\(string\).*it feeds .*uint16"
    ):
        runtime.load_model(onnx_model(TensorProto.STRING, out_type=TensorProto.STRING))
    # Loads, but cannot run on an input of its own shape: refused at load, not per request.
    with pytest.raises(
        ModelLoadError, match=r"fails on an input of zeros of its own shape \[1, 4\]"
    ):
        runtime.load_model(onnx_model(TensorProto.FLOAT, reshape_to=[3]))


def test_a_string_output_is_kept_and_never_taken_for_the_scores(runtime: Runtime) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x[:300], np.array([f"d{v}" for v in y[:300]]))
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}})
    model = runtime.load_model(onx.SerializeToString())
    kinds = {o.name: o.dtype.kind for o in model.session.outputs}
    assert kinds == {"label": "O", "probabilities": "f"}
    assert model.confidence_output == "probabilities"
    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": "s", "model": {"name": "m"}}), model
    )
    result = runtime.infer("s", x[:2])
    assert result.outputs["label"].tolist() == ["d0", "d1"]
    assert result.to_json()["confidences"][0] > 0.5


def test_every_input_dtype_a_pipeline_feeds_is_declarable_and_sendable() -> None:
    from edgewise.bundle import DType
    from edgewise.runtime._backend import _ORT_DTYPES
    from edgewise.runtime._http import _DTYPES

    fed = {d.name for d in _ORT_DTYPES.values()}
    assert fed <= {d.value for d in DType}  # a bundle's manifest can say so
    assert fed == _DTYPES  # the local API takes raw tensors of each


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_exported_with_a_fixed_batch_serves_any_number_of_rows(
    runtime: Runtime, batch: int
) -> None:
    # Exports without dynamic axes fix the batch (at 1, mostly): batching requests
    # together, or a request of several rows, failed every request of that batch.
    import asyncio

    from onnx import TensorProto

    model = runtime.load_model(onnx_model(TensorProto.INT32, batch=batch))
    assert model.session.fixed_batch == batch
    spec = {"name": "fixed", "model": {"name": "m"}, "batching": {"max_batch": 32}}
    runtime.start_pipeline(PipelineSpec.model_validate(spec), model)
    rows = np.arange(4 * 7, dtype=np.int32).reshape(7, 4)
    assert runtime.infer("fixed", rows, exact_dtype=True).outputs["y"].tolist() == rows.tolist()

    async def concurrent() -> list[list[list[float]]]:
        results = await asyncio.gather(
            *(runtime.infer_async("fixed", rows[i : i + 1]) for i in range(7))
        )
        return [r.outputs["y"].tolist() for r in results]

    assert asyncio.run(concurrent()) == [[row] for row in rows.tolist()]
    listed = {p["name"]: p for p in runtime.pipelines()}["fixed"]
    assert listed["max_batch"] == batch and listed["input"]["shape"] == [batch, 4]
    sizes = runtime.stats("fixed")["batch_size"]
    assert sizes["count"] >= 2
    # Batches of more rows than the model's batch: only the one 7-row request.
    assert sum(sizes["counts"][sizes["bounds"].index(batch) + 1 :]) == 1


def test_health_samples_of_an_integer_input_model_run_and_a_misfit_one_fails_the_gate(
    runtime: Runtime,
) -> None:
    # Samples were read as float32, which a uint8 model (image pixels) refuses: every
    # such model failed its install gate with an exception instead of running samples.
    from onnx import TensorProto

    model = runtime.load_model(onnx_model(TensorProto.UINT8))

    def manifest(row: list[int]) -> dict[str, Any]:
        sample = {"input": [row], "expected": {"y": [[float(v) for v in row]]}}
        return {"name": "m", "health": {"samples": [sample, sample]}}

    good = runtime.health_check(model, manifest([0, 255, 3, 4]))
    assert good.ok and good.passed == good.total == 2, good.reason
    bad = runtime.health_check(model, manifest([0, 300, 3, 4]))
    assert not bad.ok and bad.passed == 0
    assert bad.reason == (
        "health check failed: sample 1 does not fit the model: a value is out of the range "
        "of the model's uint8 input (0 to 255)"
    )


def test_a_batch_1_model_that_drops_the_batch_axis_still_gives_a_row_per_input_row(
    runtime: Runtime,
) -> None:
    from onnx import TensorProto

    model = runtime.load_model(onnx_model(TensorProto.FLOAT, reshape_to=[4], batch=1))
    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": "sq", "model": {"name": "m"}}), model
    )
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert runtime.infer("sq", rows).outputs["y"].tolist() == rows.tolist()
    assert runtime.infer("sq", rows[:1]).outputs["y"].tolist() == rows[0].tolist()


def _reduce_model(op: str, shape: list[int | None], axes: list[int]) -> bytes:
    """Float input of `shape` (None: free), reduced by `op` over `axes` (keepdims=0)."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    const = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)
    graph = helper.make_graph([node], "g", [inp], [out], initializer=[const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_requests_of_different_shapes_for_a_free_inner_dimension_are_batched_by_shape(
    runtime: Runtime,
) -> None:
    # Two requests of other lengths in one batch failed every request of the batch
    # (numpy's concatenate); a detector taking images of any size would fail under load.
    import asyncio
    import threading

    spec = {"name": "seq", "model": {"name": "m"}, "batching": {"max_batch": 16}}
    runtime.start_pipeline(
        PipelineSpec.model_validate(spec),
        runtime.load_model(_reduce_model("ReduceSum", [None, None], [1])),
    )
    xs = [np.full((1, 3 + i % 3), float(i), np.float32) for i in range(12)]
    want = [[float(i * (3 + i % 3))] for i in range(12)]

    async def concurrent() -> list[list[float]]:
        got = await asyncio.gather(*(runtime.infer_async("seq", x) for x in xs))
        return [r.outputs["y"].tolist() for r in got]

    assert asyncio.run(concurrent()) == want
    # Queued behind a paused executor, then taken as one batch by its worker.
    done: dict[int, list[float]] = {}
    finished = threading.Event()

    def callback(i: int) -> Callable[[Any], None]:
        def on_done(req: Any) -> None:
            done[i] = req.error or req.result.outputs["y"].tolist()
            if len(done) == len(xs):
                finished.set()

        return on_done

    runtime.pause()
    for i, x in enumerate(xs):
        runtime.submit("seq", x, callback(i))
    runtime.resume()
    assert finished.wait(10)
    assert [done[i] for i in range(len(xs))] == want
    sizes = runtime.stats("seq")["batch_size"]
    assert sizes["sum"] == 2 * len(xs)  # every row ran once
    assert sizes["count"] < 2 * len(xs)  # and requests of one shape still ran together


def test_a_transpose_stage_feeds_channels_last_images_to_a_channels_first_model(
    runtime: Runtime,
) -> None:
    spec = {
        "name": "cam",
        "model": {"name": "m"},
        "preprocess": [
            {"type": "resize", "params": {"height": 8, "width": 16}},
            {"type": "transpose", "params": {"axes": [2, 0, 1]}},
        ],
    }
    runtime.start_pipeline(
        PipelineSpec.model_validate(spec),
        runtime.load_model(_reduce_model("ReduceMean", [None, 3, None, None], [2, 3])),
    )
    frame = np.empty((30, 40, 3), np.float32)  # a PNG's H x W x (R, G, B)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10.0, 20.0, 30.0
    assert runtime.infer("cam", frame).outputs["y"].tolist() == [[10.0, 20.0, 30.0]]
    with pytest.raises(BadInput, match=r"transpose \[2, 0, 1\] needs 3 dimensions, got shape"):
        runtime.infer("cam", frame[..., 0])
    assert runtime.infer("cam", frame).outputs["y"].tolist() == [[10.0, 20.0, 30.0]]


def test_a_scikit_learn_classifier_exported_with_skl2onnx_defaults_serves_its_scores(
    runtime: Runtime,
) -> None:
    # skl2onnx's default ZipMap output (a {class: probability} per row) gave no labels or
    # confidences, and the local API answered 500 (a dict with integer keys as JSON).
    import httpx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from edgewise.runtime import HttpServer, InferenceAPI

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x[:300], y[:300])
    model = runtime.load_model(to_onnx(clf, x[:1]).SerializeToString())
    assert model.confidence_output == "output_probability"
    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": "zip", "model": {"name": "m"}}), model
    )
    result = runtime.infer("zip", x[300:310])
    probs = result.outputs["output_probability"]
    assert probs.shape == (10, 10)
    np.testing.assert_allclose(probs, clf.predict_proba(x[300:310]), atol=1e-4)
    assert result.to_json()["labels"] == [str(v) for v in result.outputs["output_label"]]
    server = HttpServer(InferenceAPI(runtime))
    port = server.start()
    try:
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/pipelines/zip/infer",
            json={"inputs": x[300:302].tolist()},
            timeout=10,
        )
    finally:
        server.stop()
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["outputs"]["output_probability"][1]) == 10


def test_rows_with_nan_scores_are_counted_and_kept_out_of_the_confidence_histogram(
    runtime: Runtime,
) -> None:
    # One NaN score had made the histogram's sum NaN for the pipeline's lifetime.
    spec = {"name": "log", "model": {"name": "m"}, "postprocess": [{"type": "softmax"}]}
    runtime.start_pipeline(PipelineSpec.model_validate(spec), runtime.load_model(log_model()))
    x = np.array([[1.0, 2, 3, 4], [-1.0, 1, 1, 1], [-1.0, -1, -1, -1]], np.float32)
    result = runtime.infer("log", x)
    assert result.to_json()["confidences"][0] > 0.3
    stats = runtime.stats("log")
    assert stats["edgewise_nonfinite_scores"] == 2
    assert stats["confidence"]["count"] == 1 and np.isfinite(stats["confidence"]["sum"])
    assert 'edgewise_nonfinite_scores{pipeline="log"} 2' in runtime.prometheus()
    assert "nan" not in runtime.prometheus().lower()


def _hits_model(scores: bool = False) -> bytes:
    """A detector's output shape: one [row, column] per input value over 0.5, for the
    whole call (as boxes after NMS), not one entry per input row. With `scores`, the hits
    are floats and a softmax of the input follows them as a second output (under a name
    that does not say it holds scores)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Greater", ["x", "half"], ["hit"]),
        helper.make_node("NonZero", ["hit"], ["nz"]),
        helper.make_node("Transpose", ["nz"], ["hits" if scores else "detections"], perm=[1, 0]),
    ]
    kind = TensorProto.FLOAT if scores else TensorProto.INT64
    outputs = [helper.make_tensor_value_info("detections", kind, [None, 2])]
    if scores:
        nodes.append(helper.make_node("Cast", ["hits"], ["detections"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Softmax", ["x"], ["class_scores"], axis=-1))
        outputs.append(helper.make_tensor_value_info("class_scores", TensorProto.FLOAT, [None, 4]))
    graph = helper.make_graph(
        nodes,
        "hits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        outputs,
        initializer=[numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_outputs_not_one_per_row_are_never_split_among_requests(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    model = runtime.load_model(_hits_model())
    assert not model.rows_aligned and model.unaligned == {"detections"}
    assert model.confidence_output is None
    runtime.start_pipeline(make_spec("hits", batching={"max_batch": 32}), model)
    assert runtime.pipelines()[0]["max_batch"] == 1
    a = np.array([[0.9, 0, 0, 0.8]], np.float32)  # hits at columns 0 and 3
    c = np.array([[0, 0.7, 0, 0]], np.float32)  # a hit at column 1

    async def both() -> list[Any]:
        return list(await asyncio.gather(*(runtime.infer_async("hits", v) for v in (a, c, a))))

    # Batched together, a's detections had gone partly to c: the call's list was cut by
    # request rows.
    ra, rc, ra2 = asyncio.run(both())
    assert (
        ra.outputs["detections"].tolist() == [[0, 0], [0, 3]] == ra2.outputs["detections"].tolist()
    )
    assert rc.outputs["detections"].tolist() == [[0, 1]]
    got: list[Any] = []
    runtime.pause()
    reqs = [runtime.submit("hits", v, got.append) for v in (c, a)]
    runtime.resume()
    until(lambda: len(got) == 2)
    assert [r.result.outputs["detections"].tolist() for r in reqs] == [[[0, 1]], [[0, 0], [0, 3]]]
    # One request of two rows owns its call's whole output.
    both_rows = runtime.infer("hits", np.concatenate([c, a]))
    assert both_rows.outputs["detections"].tolist() == [[0, 1], [1, 0], [1, 3]]


def test_a_model_that_runs_on_one_row_only_serves_one_request_per_call(
    runtime: Runtime, make_spec: SpecFactory, mlp_bytes: bytes
) -> None:
    from onnx import TensorProto

    one_row = runtime.load_model(onnx_model(TensorProto.FLOAT, reshape_to=[1, 4]))
    assert not one_row.rows_aligned
    runtime.start_pipeline(make_spec("one", batching={"max_batch": 8}), one_row)
    rows = [np.full((1, 4), i, np.float32) for i in range(6)]

    async def many() -> list[Any]:
        return list(await asyncio.gather(*(runtime.infer_async("one", r) for r in rows)))

    results = asyncio.run(many())  # batched, every one of them had failed
    assert [r.outputs["y"].tolist() for r in results] == [r.tolist() for r in rows]
    assert runtime.load_model(mlp_bytes).rows_aligned


@pytest.mark.parametrize("classes", ["names", "some_digits"])
def test_a_scikit_learn_classifier_without_a_manifest_answers_with_its_own_classes(
    runtime: Runtime, classes: str
) -> None:
    # Labels came from the score column's index: '0', '1'... whatever the classes were.
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if classes == "names":
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        target = np.array(words)[y]
    else:  # three digits only: score columns 0, 1, 2 are the classes 3, 5 and 8
        keep = np.isin(y, [3, 5, 8])
        x, target = x[keep], y[keep]
    clf = LogisticRegression(max_iter=500).fit(x[:300], target[:300])
    model = runtime.load_model(to_onnx(clf, x[:1]).SerializeToString())
    assert list(model.info.labels) == [str(c) for c in clf.classes_]
    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": "c", "model": {"name": "m"}}), model
    )
    result = runtime.infer("c", x[300:340])
    assert result.labels == [str(c) for c in clf.predict(x[300:340])]
    # A bundle's own labels still win.
    named = runtime.load_model(
        to_onnx(clf, x[:1]).SerializeToString(),
        {"name": "m", "version": "1", "labels": [f"c{i}" for i in range(len(clf.classes_))]},
    )
    assert named.info.labels[0] == "c0"


def test_an_output_not_one_per_row_is_never_taken_for_the_scores(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    # The float detections came first, and labels were the argmax of each detection's
    # coordinates, one per detection rather than one per input row.
    model = runtime.load_model(_hits_model(scores=True))
    assert model.unaligned == {"detections"}
    assert model.confidence_output == "class_scores"
    runtime.start_pipeline(make_spec("hits"), model)
    result = runtime.infer("hits", np.array([[0.9, 0, 0, 0.8], [0, 0.7, 0, 0]], np.float32))
    assert result.labels == ["0", "1"]
    assert result.outputs["detections"].tolist() == [[0.0, 0.0], [0.0, 3.0], [1.0, 1.0]]
