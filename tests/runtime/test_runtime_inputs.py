"""Models with several inputs: requests name them, and they batch like any request.

Two models built with `onnx.helper`, both real classifiers:
- `gain`: the digits logistic regression behind two inputs, `pixels` [N, 64] and `gain`
  [N, 1] (the pixels are multiplied by the gain before the linear layer), so a gain of 1
  answers exactly as the fitted estimator does;
- `bag`: a bag-of-tokens text classifier, `ids` and `mask` [N, seq] int64 (a
  transformer's inputs), with a free sequence length: masked tokens do not count.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.examples import DigitsSplit, train_logreg
from edgewise.runtime import (
    BadInput,
    HttpServer,
    InferenceAPI,
    ModelInfo,
    ModelLoadError,
    Runtime,
)
from edgewise.runtime._decode import decode_json

from .conftest import SpecFactory, onnx_model, until

Array = np.ndarray[Any, Any]


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def gain_model(estimator: Any) -> bytes:
    """Softmax((pixels * gain) @ coef.T + intercept): the fitted logistic regression."""
    from onnx import TensorProto, helper, numpy_helper

    coef = np.asarray(estimator.coef_, dtype=np.float32)
    classes = coef.shape[0]
    return _model(
        [
            helper.make_node("Mul", ["pixels", "gain"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        [
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 64]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, [None, 1]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
        [
            numpy_helper.from_array(np.ascontiguousarray(coef.T), "W"),
            numpy_helper.from_array(np.asarray(estimator.intercept_, dtype=np.float32), "B"),
        ],
    )


def bag_model(seed: int = 0, batch: int | None = None, classes: int = 4) -> bytes:
    """Softmax(sum over the sequence of embedding[ids] * mask): a bag-of-tokens model."""
    from onnx import TensorProto, helper, numpy_helper

    emb = np.random.default_rng(seed).normal(size=(20, classes)).astype(np.float32)
    return _model(
        [
            helper.make_node("Gather", ["E", "ids"], ["emb"]),
            helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
            helper.make_node("Mul", ["emb", "m3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "seq"], ["summed"], keepdims=0),
            helper.make_node("Softmax", ["summed"], ["probabilities"], axis=-1),
        ],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [batch, "seq"]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes])],
        [
            numpy_helper.from_array(emb, "E"),
            numpy_helper.from_array(np.array([2], np.int64), "last"),
            numpy_helper.from_array(np.array([1], np.int64), "seq"),
        ],
    )


@pytest.fixture(scope="module")
def logreg(split: DigitsSplit) -> Any:
    return train_logreg(split)[1]


@pytest.fixture(scope="module")
def gain_bytes(logreg: Any) -> bytes:
    return gain_model(logreg)


def direct(model: bytes, **feed: Array) -> Array:
    """The model's probabilities from onnxruntime itself."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], feed)[0])


def tokens(rng: np.random.Generator, rows: int, seq: int) -> dict[str, Array]:
    ids = rng.integers(0, 20, size=(rows, seq), dtype=np.int64)
    mask = (rng.random((rows, seq)) < 0.7).astype(np.int64)
    return {"ids": ids, "mask": mask}


def test_a_two_input_model_answers_by_name_as_onnxruntime_and_the_estimator_do(
    runtime: Runtime, gain_bytes: bytes, logreg: Any, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    x = split.x_test.astype(np.float32)
    ones = np.ones((len(x), 1), np.float32)
    runtime.start_pipeline(make_spec("gain"), runtime.load_model(gain_bytes))

    got = runtime.infer("gain", {"pixels": x, "gain": ones})

    assert got.labels == [str(k) for k in logreg.predict(split.x_test)]
    want = direct(gain_bytes, pixels=x, gain=ones)
    assert np.allclose(got.outputs["probabilities"], want, atol=1e-6)
    # One unbatched row each, as JSON decodes it (float64 lists): cast and batched.
    halved = runtime.infer("gain", {"pixels": split.x_test[0].tolist(), "gain": [0.5]})
    want_half = direct(gain_bytes, pixels=x[:1], gain=np.array([[0.5]], np.float32))
    assert np.allclose(halved.outputs["probabilities"], want_half, atol=1e-6)
    listed = runtime.pipelines()[0]
    assert listed["input"] is None
    assert listed["inputs"] == [
        {"name": "pixels", "dtype": "float32", "shape": [None, 64]},
        {"name": "gain", "dtype": "float32", "shape": [None, 1]},
    ]


def test_requests_of_a_two_input_model_are_batched_together(
    runtime: Runtime, gain_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(
        make_spec("gain", batching={"max_batch": 32}), runtime.load_model(gain_bytes)
    )
    x = split.x_test[:16].astype(np.float32)
    gains = np.linspace(0.5, 1.5, 16, dtype=np.float32).reshape(16, 1)
    want = direct(gain_bytes, pixels=x, gain=gains)
    done: list[Any] = [None] * 16
    finished = threading.Event()

    def callback(i: int) -> Callable[[Any], None]:
        def cb(req: Any) -> None:
            done[i] = req
            if all(d is not None for d in done):
                finished.set()

        return cb

    runtime.pause()
    for i in range(16):
        runtime.submit("gain", {"pixels": x[i], "gain": gains[i]}, callback(i))
    runtime.resume()
    assert finished.wait(10)
    for i, req in enumerate(done):
        assert req.error is None
        assert np.allclose(req.result.outputs["probabilities"], want[i : i + 1], atol=1e-6)
    sizes = runtime.stats("gain")["batch_size"]
    assert sizes["sum"] == 16 and sizes["count"] < 16  # rows of several requests per call

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(runtime.infer_async("gain", {"pixels": x[i], "gain": gains[i]}) for i in range(16))
        )

    results = asyncio.run(many())
    got = np.concatenate([r.outputs["probabilities"] for r in results])
    assert np.allclose(got, want, atol=1e-6)
    after = runtime.stats("gain")["batch_size"]
    assert after["count"] - sizes["count"] < 16  # one loop turn's requests: one group


def test_sequences_of_different_lengths_share_a_batch_and_run_per_length(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    model = bag_model()
    runtime.start_pipeline(make_spec("bag"), runtime.load_model(model))
    rng = np.random.default_rng(1)
    requests = [tokens(rng, 1, seq) for seq in (3, 5, 3, 2, 5, 3)]
    wants = [direct(model, **r) for r in requests]
    got: list[Any] = []
    runtime.pause()
    reqs = [runtime.submit("bag", r, got.append) for r in requests]
    runtime.resume()
    until(lambda: len(got) == len(requests))
    for req, want in zip(reqs, wants, strict=True):
        assert req.error is None
        assert np.allclose(req.result.outputs["probabilities"], want, atol=1e-6)

    async def grouped() -> list[Any]:  # one loop turn: one group of mixed lengths
        return await asyncio.gather(*(runtime.infer_async("bag", r) for r in requests))

    for result, want in zip(asyncio.run(grouped()), wants, strict=True):
        assert np.allclose(result.outputs["probabilities"], want, atol=1e-6)
    # Masked tokens do not count: a padded sequence answers as the unpadded one.
    short = {"ids": np.array([[4, 7]]), "mask": np.array([[1, 1]])}
    padded = {"ids": np.array([[4, 7, 0, 0]]), "mask": np.array([[1, 1, 0, 0]])}
    a, b = runtime.infer("bag", short), runtime.infer("bag", padded)
    assert np.allclose(a.outputs["probabilities"], b.outputs["probabilities"], atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"ids": [[1, 2]]}, r"inputs are 'ids', 'mask': missing 'mask'"),
        (
            {"ids": [[1, 2]], "mask": [[1, 1]], "extra": [[1]]},
            r"inputs are 'ids', 'mask': unknown 'extra'",
        ),
        ({"ids": [[1.5, 2]], "mask": [[1, 1]]}, r"input 'ids': dtype float64 does not match"),
        ({"ids": [[1, 2]], "mask": [[1, 1], [1, 0]]}, r"input 'mask' has 2 rows and 'ids' 1"),
        ({"ids": [[[1, 2]]], "mask": [[1, 1]]}, r"input 'ids': shape \[1, 1, 2\] does not match"),
        ({"ids": [[1, 2]], "mask": [[1, 2**40]]}, None),  # fits int64: the model decides
        (np.array([[1, 2]]), r"2 inputs \('ids', 'mask'\): send them by name"),
    ],
)
def test_mistakes_in_named_inputs_are_bad_input_that_say_what(
    runtime: Runtime, make_spec: SpecFactory, request_: Any, message: str | None
) -> None:
    runtime.start_pipeline(make_spec("bag"), runtime.load_model(bag_model()))
    arrays = (
        {k: np.asarray(v) for k, v in request_.items()} if isinstance(request_, dict) else request_
    )
    if message is None:
        assert runtime.infer("bag", arrays).labels
        return
    with pytest.raises(BadInput, match=message):
        runtime.infer("bag", arrays)
    assert runtime.stats("bag")["nv_inference_request_bad_input"] == 1
    ok = runtime.infer("bag", {"ids": np.array([[1, 2]]), "mask": np.array([[1, 1]])})
    assert len(ok.labels) == 1  # the pipeline keeps serving


def test_a_one_input_model_takes_its_input_by_name_too(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    plain = runtime.infer("digits", split.x_test[:3])
    assert runtime.infer("digits", {"input": split.x_test[:3]}).labels == plain.labels
    with pytest.raises(BadInput, match=r"one input, 'input'; got inputs \['pixels'\]"):
        runtime.infer("digits", {"pixels": split.x_test[:3]})
    # Also in front of preprocess stages (they take the array the name holds).
    spec = make_spec("scaled", preprocess=[{"type": "scale", "params": {"factor": 1.0}}])
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    assert runtime.infer("scaled", {"input": split.x_test[:3]}).labels == plain.labels


def test_the_local_api_takes_inputs_by_name_and_refuses_raw_bytes_for_them(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    import httpx

    model = bag_model()
    runtime.start_pipeline(make_spec("bag"), runtime.load_model(model))
    api = InferenceAPI(runtime)
    http = HttpServer(api)
    port = http.start()
    feed = tokens(np.random.default_rng(2), 3, 4)
    url = f"http://127.0.0.1:{port}/v1/pipelines/bag/infer"
    try:
        with httpx.Client(timeout=10) as client:
            ok = client.post(url, json={"inputs": {k: v.tolist() for k, v in feed.items()}})
            raw = client.post(
                url,
                content=feed["ids"].tobytes(),
                headers={
                    "content-type": "application/octet-stream",
                    "x-tensor-dtype": "int64",
                    "x-tensor-shape": "3,4",
                },
            )
            named_raw = client.post(
                url,
                content=feed["ids"].tobytes() + feed["mask"].tobytes(),
                headers={
                    "content-type": "application/octet-stream",
                    "x-tensor-names": "ids,mask",
                    "x-tensor-dtype": "int64,int64",
                    "x-tensor-shape": "3,4;3,4",
                },
            )
            empty = client.post(url, json={"inputs": {}})
            words = client.post(url, json={"inputs": {"ids": [["a"]], "mask": [[1]]}})
            again = client.post(url, json={"inputs": {k: v.tolist() for k, v in feed.items()}})
    finally:
        http.stop()
    assert ok.status_code == 200
    want = direct(model, **feed)
    assert np.allclose(ok.json()["outputs"]["probabilities"], want, atol=1e-6)
    assert ok.json()["labels"] == [str(k) for k in want.argmax(axis=1)]
    assert raw.status_code == 400  # one unnamed tensor
    assert "2 inputs ('ids', 'mask'): send them by name" in raw.json()["error"]["message"]
    assert named_raw.status_code == 200
    assert named_raw.json()["outputs"] == ok.json()["outputs"]
    assert empty.status_code == 400 and "names no input" in empty.json()["error"]["message"]
    assert words.status_code == 400
    assert "input 'ids' must hold only numbers" in words.json()["error"]["message"]
    assert again.status_code == 200


def test_json_with_inputs_by_name_decodes_to_arrays_by_name() -> None:
    got = decode_json(b'{"inputs": {"ids": [[1, 2]], "mask": [[1, 0]]}}')
    assert isinstance(got, dict) and sorted(got) == ["ids", "mask"]
    assert got["ids"].tolist() == [[1, 2]] and got["mask"].dtype == np.int64
    with pytest.raises(BadInput, match="input 'mask' is not a rectangular array"):
        decode_json(b'{"inputs": {"ids": [[1, 2]], "mask": [[1], [1, 0]]}}')


def test_health_samples_name_each_input(runtime: Runtime) -> None:
    model_bytes = bag_model()
    model = runtime.load_model(model_bytes)
    feed = {"ids": np.array([[3, 9, 1]]), "mask": np.array([[1, 1, 0]])}
    want = direct(model_bytes, **feed)

    def manifest(inputs: dict[str, Any], expected: Array) -> dict[str, Any]:
        sample = {"inputs": inputs, "expected": {"probabilities": expected.tolist()}}
        return {"name": "bag", "version": "1", "health": {"samples": [sample]}}

    named = {k: v.tolist() for k, v in feed.items()}
    assert runtime.health_check(model, manifest(named, want)).ok
    # One flat row per input is one unbatched row, as for a one-input model.
    flat = {k: v[0].tolist() for k, v in feed.items()}
    assert runtime.health_check(model, manifest(flat, want)).ok
    wrong = runtime.health_check(model, manifest(named, 1.0 - want))
    assert not wrong.ok and "out of tolerance" in wrong.reason
    missing = runtime.health_check(model, manifest({"ids": named["ids"]}, want))
    assert not missing.ok
    assert "sample 1 does not fit the model: the model's inputs are 'ids', 'mask': missing " in (
        missing.reason
    )
    unknown = runtime.health_check(model, manifest({**named, "extra": [[1]]}, want))
    assert not unknown.ok and "unknown 'extra'" in unknown.reason
    info = ModelInfo.from_manifest(manifest(named, want))
    assert sorted(info.health_samples[0].input) == ["ids", "mask"]  # type: ignore[arg-type]


def test_preprocess_stages_cannot_feed_a_model_with_several_inputs(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    bag = runtime.load_model(bag_model())
    stages = [{"type": "scale", "params": {"factor": 2.0}}]
    with pytest.raises(ValueError, match=r"2 inputs \('ids', 'mask'\) and preprocess stages"):
        runtime.start_pipeline(make_spec("bag", preprocess=stages), bag)
    assert runtime.pipelines() == []
    runtime.start_pipeline(make_spec("scaled", preprocess=stages), runtime.load_model(mlp_bytes))
    with pytest.raises(ValueError, match="preprocess stages take one tensor"):
        runtime.swap_model("scaled", bag)
    assert len(runtime.infer("scaled", split.x_test[:2]).labels) == 2  # still the MLP


def test_a_cascade_over_two_inputs_escalates_rows_by_name_and_checks_the_tier(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory
) -> None:
    light, heavy = bag_model(seed=0), bag_model(seed=5)
    cascade = {"threshold": 0.6, "model": {"name": "heavy", "version": "1"}}
    spec = make_spec("bag", cascade=cascade)
    runtime.start_pipeline(spec, runtime.load_model(light), cascade_model=runtime.load_model(heavy))
    feed = tokens(np.random.default_rng(3), 40, 6)
    got = runtime.infer("bag", feed)
    light_p, heavy_p = direct(light, **feed), direct(heavy, **feed)
    low = light_p.max(axis=1) < 0.6
    assert low.any() and not low.all()
    expected = np.where(low, heavy_p.argmax(axis=1), light_p.argmax(axis=1))
    assert got.labels == [str(k) for k in expected]
    assert got.escalated == low.tolist()
    # A tier exported with a fixed batch takes the same rows (in calls of its batch).
    runtime.start_pipeline(
        make_spec("fixed", cascade=cascade),
        runtime.load_model(light),
        cascade_model=runtime.load_model(bag_model(seed=5, batch=1)),
    )
    assert runtime.infer("fixed", feed).labels == got.labels
    with pytest.raises(ValueError, match=r"cascade model .* takes other inputs"):
        runtime.start_pipeline(
            make_spec("mixed", cascade=cascade),
            runtime.load_model(light),
            cascade_model=runtime.load_model(mlp_bytes),
        )


def test_a_two_input_model_with_a_fixed_batch_serves_any_number_of_rows(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    fixed = bag_model(batch=1)
    model = runtime.load_model(fixed)
    assert model.session.fixed_batch == 1
    runtime.start_pipeline(make_spec("bag"), model)
    feed = tokens(np.random.default_rng(4), 5, 3)
    got = runtime.infer("bag", feed)
    want = np.concatenate(
        [direct(fixed, ids=feed["ids"][i : i + 1], mask=feed["mask"][i : i + 1]) for i in range(5)]
    )
    assert np.allclose(got.outputs["probabilities"], want, atol=1e-6)
    assert runtime.pipelines()[0]["max_batch"] == 1


def test_models_whose_inputs_cannot_share_a_batch_are_load_errors(runtime: Runtime) -> None:
    from onnx import TensorProto, helper

    def two(first: list[Any], second: list[Any]) -> bytes:
        return _model(
            [helper.make_node("Add", ["a", "b"], ["y"])],
            [
                helper.make_tensor_value_info("a", TensorProto.FLOAT, first),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, second),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [],
        )

    with pytest.raises(ModelLoadError, match=r"inputs fix different batch sizes \(\[1, 2\]\)"):
        runtime.load_model(two([1, 4], [2, 4]))
    with pytest.raises(ModelLoadError, match="input 'b' is a scalar"):
        runtime.load_model(two([None, 4], []))
    # The old rule refused any second input: a plain two-input model now loads.
    assert runtime.load_model(onnx_model(TensorProto.FLOAT, n_inputs=2)).several_inputs


def test_the_directory_source_feeds_npz_files_of_inputs_by_name(
    runtime: Runtime, make_spec: SpecFactory, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    for i in range(3):
        np.savez(tmp_path / f"{i:03d}.npz", **tokens(rng, 1, 4))
    np.savez(tmp_path / "004.npz", ids=np.array([[1, 2]]))  # no mask: refused, counted
    spec = make_spec(
        "bag", source={"type": "directory", "params": {"path": str(tmp_path), "poll_s": 0.02}}
    )
    runtime.start_pipeline(spec, runtime.load_model(bag_model()))
    until(lambda: runtime.source("bag").refused == 1)
    until(lambda: runtime.stats("bag")["nv_inference_request_success"] == 3)
    assert runtime.source("bag").submitted == 3


def test_sampled_inputs_of_a_two_input_model_are_rows_of_numbers(
    runtime: Runtime, gain_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec("gain", sample_rate=1.0), runtime.load_model(gain_bytes))
    x = split.x_test[:1].astype(np.float32)
    runtime.infer("gain", {"pixels": x, "gain": np.array([[2.0]], np.float32)})
    (sample, label), *_ = runtime.sampled_inputs("gain")
    assert sample.shape == (1, 65) and sample.dtype.kind == "f"
    assert sample[0, :64].tolist() == x[0].tolist() and sample[0, 64] == 2.0
    assert label is not None


def _declaring(*inputs: tuple[str, str, list[Any]]) -> dict[str, Any]:
    declared = [{"name": n, "dtype": d, "shape": s} for n, d, s in inputs]
    return {"name": "m", "version": "1.0.0", "inputs": declared}


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ((("ids", "int64", ["N", "seq"]), ("mask", "int64", ["N", "seq"])), None),
        ((("mask", "int64", ["N", 8]), ("ids", "int64", [1, "seq"])), None),  # sizes narrow
        (
            (("ids", "int64", ["N", "seq"]), ("tokens", "int64", ["N", "seq"])),
            r"declares inputs 'ids', 'tokens'; the model's are 'ids', 'mask'",
        ),
        ((("ids", "int64", ["N", "seq"]),), r"declares inputs 'ids'; the model's are"),
        (
            (("ids", "int32", ["N", "seq"]), ("mask", "int64", ["N", "seq"])),
            r"input 'ids' is int64 in the model, int32 in the manifest",
        ),
        (
            (("ids", "int64", ["N"]), ("mask", "int64", ["N", "seq"])),
            r"input 'ids' has 2 dimensions in the model, 1 in the manifest",
        ),
    ],
)
def test_a_manifest_that_does_not_describe_its_model_is_refused_at_load(
    runtime: Runtime, declared: tuple[tuple[str, str, list[Any]], ...], message: str | None
) -> None:
    manifest = _declaring(*declared)
    if message is None:
        assert runtime.load_model(bag_model(), manifest).several_inputs
        return
    with pytest.raises(ModelLoadError, match=message) as refused:
        runtime.load_model(bag_model(), manifest)
    assert str(refused.value).startswith("the manifest does not describe the model: ")


def test_a_fixed_size_the_manifest_gets_wrong_is_refused_at_load(
    runtime: Runtime, mlp_bytes: bytes
) -> None:
    with pytest.raises(ModelLoadError, match=r"input 'input' dimension 1 is 64 in the model, 32"):
        runtime.load_model(mlp_bytes, _declaring(("input", "float32", ["N", 32])))
    assert runtime.load_model(mlp_bytes, _declaring(("input", "float32", ["N", 64])))
    assert runtime.load_model(mlp_bytes, {"name": "m", "version": "1"})  # nothing declared


def test_a_cascade_to_an_upstream_server_sends_the_rows_by_input_name(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    light, heavy = bag_model(seed=0), bag_model(seed=5)
    upstream = Runtime(cores=1, monitor_interval_s=None)
    http = HttpServer(InferenceAPI(upstream))
    try:
        upstream.start_pipeline(make_spec("bag"), upstream.load_model(heavy))
        port = http.start()
        cascade = {"threshold": 0.6, "endpoint": f"http://127.0.0.1:{port}", "timeout_s": 5}
        runtime.start_pipeline(make_spec("bag", cascade=cascade), runtime.load_model(light))
        feed = tokens(np.random.default_rng(6), 30, 5)
        got = runtime.infer("bag", feed)
        upstream_rows = upstream.stats("bag")["nv_inference_exec_rows"]
    finally:
        http.stop()
        upstream.close()
    light_p, heavy_p = direct(light, **feed), direct(heavy, **feed)
    low = light_p.max(axis=1) < 0.6
    assert low.any() and not low.all()
    assert got.labels == [
        str(k) for k in np.where(low, heavy_p.argmax(axis=1), light_p.argmax(axis=1))
    ]
    assert got.escalated == low.tolist()
    assert upstream_rows == int(low.sum())


def test_a_manifest_declaring_outputs_the_model_lacks_is_refused_at_load(
    runtime: Runtime, mlp_bytes: bytes
) -> None:
    def outputs(*declared: tuple[str, str, list[Any]]) -> dict[str, Any]:
        return {
            "name": "m",
            "version": "1.0.0",
            "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in declared],
        }

    # The MLP's outputs: label (int64 [N]) and probabilities (float32 [N, 10]).
    assert runtime.load_model(mlp_bytes, outputs(("probabilities", "float32", ["N", 10])))
    wrong = [
        (("probs", "float32", ["N", 10]), r"declares outputs 'probs' the model does not have"),
        (("label", "string", ["N"]), r"output 'label' is int64 in the model, string in"),
        (("probabilities", "float32", ["N", 12]), r"'probabilities' dimension 1 is 10 in the"),
    ]
    for declared, message in wrong:
        with pytest.raises(ModelLoadError, match=message):
            runtime.load_model(mlp_bytes, outputs(declared))


def test_a_health_sample_naming_an_output_the_model_lacks_says_so(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit
) -> None:
    # It said "1/1 outputs out of tolerance".
    model = runtime.load_model(mlp_bytes)
    row = split.x_test[0].tolist()
    missing = {"name": "m", "health": {"samples": [{"input": row, "expected": {"probs": [0.1]}}]}}
    got = runtime.health_check(model, missing)
    assert not got.ok
    assert "sample 1 expects an output 'probs'; the model's outputs are 'label'" in got.reason
    short = {"name": "m", "health": {"samples": [{"input": row, "expected": {"label": [1, 2]}}]}}
    got = runtime.health_check(model, short)
    assert not got.ok and "expects 2 values of 'label'; the model gave 1" in got.reason


def test_a_one_input_models_health_sample_may_name_its_input_freely(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit
) -> None:
    model = runtime.load_model(mlp_bytes)
    row = split.x_test[0]
    want = direct(mlp_bytes, input=row[np.newaxis].astype(np.float32))
    for name in ("input", "pixels"):  # older manifests name it as they like
        sample = {"inputs": {name: row.tolist()}, "expected": {"probabilities": want.tolist()}}
        got = runtime.health_check(model, {"name": "m", "health": {"samples": [sample]}})
        assert got.ok, got.reason


@pytest.mark.parametrize(
    ("names", "dtypes", "shapes", "extra", "message"),
    [
        ("ids,mask", "int64", "1,2;1,2", 0, r"names 2 tensors; X-Tensor-Dtype gives 1 dtypes"),
        ("ids,mask", "int64,int64", "1,2", 0, r"X-Tensor-Shape 1 shapes \(separated by ';'\)"),
        ("ids,ids", "int64,int64", "1,2;1,2", 0, r"must name each tensor once"),
        ("ids,mask", "int64,int128", "1,2;1,2", 0, r"X-Tensor-Dtype must be one of"),
        ("ids,mask", "int64,int64", "1,2;1,0", 0, r"dimensions must be positive"),
        ("ids,mask", "int64,int64", "1,2;1,2", 8, r"body has 40 bytes, dtype and shape need 32"),
        ("ids,mask", "int64,int64", "1,2;1,3", 0, r"body has 32 bytes, dtype and shape need 40"),
        ("ids,mask", "int64,int32", "1,2;1,2", -8, r"input 'mask': dtype int32 does not match"),
    ],
)
def test_raw_tensors_by_name_that_do_not_add_up_are_400s(
    runtime: Runtime,
    make_spec: SpecFactory,
    names: str,
    dtypes: str,
    shapes: str,
    extra: int,
    message: str,
) -> None:
    from edgewise._httpd import Deferred

    runtime.start_pipeline(make_spec("bag"), runtime.load_model(bag_model()))
    api = InferenceAPI(runtime)
    body = np.array([[1, 2], [1, 1]], np.int64).tobytes()
    body = body + bytes(extra) if extra >= 0 else body[:extra]
    headers = {
        b"content-type": b"application/octet-stream",
        b"x-tensor-names": names.encode(),
        b"x-tensor-dtype": dtypes.encode(),
        b"x-tensor-shape": shapes.encode(),
    }

    async def call(headers: dict[bytes, bytes], body: bytes) -> tuple[int, bytes]:
        got = api("POST", "/v1/pipelines/bag/infer", headers, body)  # as HttpServer does
        if isinstance(got, Deferred):
            await asyncio.wait([got.fut])
            got = got.finish()
        return got[0], got[1]

    status, answer = asyncio.run(call(headers, body))
    assert status == 400
    assert re.search(message, json.loads(answer)["error"]["message"])
    good = {
        **headers,
        b"x-tensor-names": b"ids,mask",
        b"x-tensor-dtype": b"int64,int64",
        b"x-tensor-shape": b"1,2;1,2",
    }
    status, answer = asyncio.run(call(good, np.array([[1, 2], [1, 1]], np.int64).tobytes()))
    assert status == 200, answer  # the pipeline keeps serving
