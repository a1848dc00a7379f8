"""The TFLite backend runs the same pipeline spec as onnxruntime, with the same answers.

The TFLite digits models are converted from the same fitted estimators by the built-in
converter (`edgewise.runtime._tflite_build`); skipped when the `tflite` extra is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgewise.examples import DigitsSplit, train_logreg, train_mlp
from edgewise.runtime import BadInput, ModelLoadError, Runtime
from edgewise.runtime._tflite import tflite_available

from .conftest import SpecFactory

pytestmark = pytest.mark.skipif(not tflite_available(), reason="tflite extra not installed")


@pytest.fixture(scope="module")
def models(split: DigitsSplit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from edgewise.runtime._tflite_build import sklearn_to_tflite

    onnx_bytes, estimator = train_mlp(split)
    tfl = sklearn_to_tflite(estimator)
    path = tmp_path_factory.mktemp("tflite") / "digits-mlp.tflite"
    path.write_bytes(tfl)
    return {"onnx": onnx_bytes, "tflite": tfl, "path": path}


def test_same_spec_same_answers_on_both_backends(
    runtime: Runtime, models: dict[str, object], split: DigitsSplit, make_spec: SpecFactory
) -> None:
    onnx_model = runtime.load_model(models["onnx"])  # type: ignore[arg-type]
    tfl_model = runtime.load_model(models["path"])  # type: ignore[arg-type]
    assert tfl_model.session.backend == "tflite"
    assert tfl_model.session.input.shape == (None, 64)
    runtime.start_pipeline(make_spec("onnx"), onnx_model)
    runtime.start_pipeline(make_spec("tflite"), tfl_model)

    a = runtime.infer("onnx", split.x_test)
    b = runtime.infer("tflite", split.x_test)

    assert a.labels == b.labels
    assert np.allclose(a.outputs["probabilities"], b.outputs["probabilities"], atol=1e-5)
    single = [runtime.infer("tflite", row).labels[0] for row in split.x_test[:20]]
    assert single == a.labels[:20]


def test_tflite_bytes_are_recognised_and_batched(
    runtime: Runtime, models: dict[str, object], split: DigitsSplit, make_spec: SpecFactory
) -> None:
    model = runtime.load_model(models["tflite"])  # type: ignore[arg-type]
    assert model.session.backend == "tflite"
    runtime.start_pipeline(make_spec(batching={"max_batch": 8}), model)
    rt_reqs = []
    runtime.pause()
    for i in range(20):
        rt_reqs.append(runtime.submit("digits", split.x_test[i], lambda r: None))
    runtime.resume()
    runtime.stop_pipeline("digits")
    assert all(r.error is None and r.result is not None for r in rt_reqs)


def test_logistic_regression_converts_too(split: DigitsSplit, runtime: Runtime) -> None:
    from edgewise.runtime._tflite_build import sklearn_to_tflite

    _, estimator = train_logreg(split)
    model = runtime.load_model(sklearn_to_tflite(estimator))
    probs = np.asarray(model.session.run(split.x_test)["probabilities"])
    assert np.allclose(probs, estimator.predict_proba(split.x_test), atol=1e-5)  # type: ignore[attr-defined]


def test_tflite_cannot_promise_an_accelerator(runtime: Runtime, models: dict[str, object]) -> None:
    with pytest.raises(ModelLoadError, match="CPU only"):
        runtime.load_model(models["path"], require_accelerator=True)  # type: ignore[arg-type]


def test_corrupt_tflite_file_is_a_model_load_error(runtime: Runtime, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00\x00\x00\x00TFL3 not really")
    with pytest.raises(ModelLoadError):
        runtime.load_model(bad)


def test_a_two_input_model_runs_on_tflite_as_on_onnxruntime(
    runtime: Runtime, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    from edgewise.runtime._tflite_build import sklearn_to_tflite

    from .test_runtime_inputs import gain_model

    estimator = train_logreg(split)[1]
    tfl = runtime.load_model(sklearn_to_tflite(estimator, gain_input=True))
    assert [(i.name, i.shape) for i in tfl.session.inputs] == [
        ("input", (None, 64)),
        ("gain", (None, 1)),
    ]
    runtime.start_pipeline(make_spec("tflite", batching={"max_batch": 8}), tfl)
    runtime.start_pipeline(make_spec("onnx"), runtime.load_model(gain_model(estimator)))
    x = split.x_test[:40].astype(np.float32)
    gains = np.linspace(0.5, 1.5, 40, dtype=np.float32).reshape(40, 1)

    on_tflite = runtime.infer("tflite", {"input": x, "gain": gains})
    on_onnx = runtime.infer("onnx", {"pixels": x, "gain": gains})

    assert on_tflite.labels == on_onnx.labels
    assert np.allclose(
        on_tflite.outputs["probabilities"], on_onnx.outputs["probabilities"], atol=1e-5
    )
    ones = runtime.infer("tflite", {"input": x, "gain": np.ones((40, 1), np.float32)})
    assert ones.labels == [str(k) for k in estimator.predict(split.x_test[:40])]
    # Row by row (the input resized to each call's rows), then a batch again.
    rows = [runtime.infer("tflite", {"input": x[i], "gain": gains[i]}).labels[0] for i in range(5)]
    assert rows == on_onnx.labels[:5]
    with pytest.raises(BadInput, match=r"inputs are 'input', 'gain': missing 'gain'"):
        runtime.infer("tflite", {"input": x})


def test_a_quantized_classifier_answers_with_dequantized_scores(
    runtime: Runtime, models: dict[str, object], split: DigitsSplit, make_spec: SpecFactory
) -> None:
    # Its uint8 scores were no float output at all: no labels, no confidences.
    from edgewise.runtime._tflite_build import sklearn_to_tflite

    _, estimator = train_mlp(split)
    quantized = runtime.load_model(sklearn_to_tflite(estimator, quantized_output=True))
    assert quantized.confidence_output == "probabilities"
    runtime.start_pipeline(make_spec("q"), quantized)
    runtime.start_pipeline(make_spec("onnx"), runtime.load_model(models["onnx"]))  # type: ignore[arg-type]

    got = runtime.infer("q", split.x_test)
    want = runtime.infer("onnx", split.x_test)

    probs = got.outputs["probabilities"]
    assert probs.dtype == np.float32
    assert np.abs(probs - want.outputs["probabilities"]).max() <= 1 / 256 + 1e-6
    top2 = np.sort(want.outputs["probabilities"], axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 / 256  # rows quantization cannot flip
    assert clear.sum() > 0.9 * len(clear)
    assert [g for g, c in zip(got.labels, clear, strict=True) if c] == [
        w for w, c in zip(want.labels, clear, strict=True) if c
    ]
    assert all(0.0 <= c <= 1.0 for c in got.confidences if c is not None)
