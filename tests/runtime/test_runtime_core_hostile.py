"""The runtime's core under hostile input and faults: batches, cascades, readers, swaps.

Each test names what had gone wrong before its fix (the comment at its top).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgewise.examples import DigitsSplit
from edgewise.protocol import PipelineSpec
from edgewise.runtime import (
    POSTPROCESS,
    PREPROCESS,
    AcceleratorUnavailable,
    BadInput,
    InferenceFailed,
    Mode,
    PipelineStopped,
    Runtime,
    RuntimeFailure,
    read_thermal_c,
)
from edgewise.runtime._decode import decode_json
from edgewise.runtime._scheduler import Request

from .conftest import FakeClock, SpecFactory, onnx_model, until

TABLE = np.arange(30, dtype=np.float32).reshape(10, 3) / 30.0


def gather_model() -> bytes:
    """Ids [N, 4] (int64) -> the mean of their rows of a 10 x 3 table: [N, 3] scores.

    An id outside -10..9 makes onnxruntime fail the whole call, as an embedding lookup
    fails on a token id past its vocabulary.
    """
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 3], TABLE.ravel().tolist())
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("ReduceMean", ["rows"], ["scores"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [ids], [out], initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


SUCCESS = "nv_inference_request_success"
GOOD = [[1, 2, 3, 4]]
BAD = [[99, 0, 0, 0]]


def _stats(rt: Runtime, name: str) -> dict[str, Any]:
    return rt.stats(name)


def ids_spec(name: str = "ids", **extra: Any) -> PipelineSpec:
    """A pipeline of the gather model."""
    return PipelineSpec.model_validate({"name": name, "model": {"name": "gather"}, **extra})


@contextlib.contextmanager
def app_stage(registry: Any, name: str, factory: Any) -> Iterator[None]:
    """`factory` registered as an app's stage `name` while the block runs."""
    registry.register(name)(factory)
    try:
        yield
    finally:
        registry._factories.pop(name, None)


@pytest.fixture
def ids_rt() -> Iterator[Runtime]:
    """A runtime serving `ids`: the gather model, batches of up to 32."""
    rt = Runtime(cores=1, monitor_interval_s=None)
    try:
        rt.start_pipeline(ids_spec(), rt.load_model(gather_model()))
        yield rt
    finally:
        rt.close()


# -- one bad request in a batch ---------------------------------------------------------


def test_one_request_the_model_fails_on_does_not_fail_its_batch_neighbours(
    ids_rt: Runtime,
) -> None:
    # The whole batch had failed with the bad request (3 failures counted, 0 served).
    got: list[Request] = []
    ids_rt.pause()
    for ids in (GOOD, BAD, [[5, 6, 7, 8]]):
        ids_rt.submit("ids", np.array(ids), got.append)
    ids_rt.resume()
    until(lambda: len(got) == 3)
    by_row = {int(r.x[0, 0]): r for r in got}
    assert isinstance(by_row[99].error, InferenceFailed)
    assert by_row[1].error is None and by_row[5].error is None
    assert by_row[1].result.outputs["scores"][0] == pytest.approx(TABLE[[1, 2, 3, 4]].mean(0))
    assert by_row[5].result.outputs["scores"][0] == pytest.approx(TABLE[[5, 6, 7, 8]].mean(0))
    stats = _stats(ids_rt, "ids")
    assert stats["nv_inference_request_failure"] == 1
    assert stats["nv_inference_request_success"] == 2


def test_one_bad_caller_of_an_asyncio_group_fails_alone(ids_rt: Runtime) -> None:
    # The group of one loop turn runs as one stacked request: every caller had failed.
    # Callers of one row each, and with one of two rows (their rows stacked unevenly).
    async def main(inputs: list[list[list[int]]]) -> list[Any]:
        calls = [ids_rt.infer_async("ids", np.array(x)) for x in inputs]
        return await asyncio.gather(*calls, return_exceptions=True)

    one_row = asyncio.run(main([GOOD, BAD, [[5, 6, 7, 8]]]))
    uneven = asyncio.run(main([[[1, 1, 1, 1], [2, 2, 2, 2]], BAD, [[3, 3, 3, 3]]]))

    assert isinstance(one_row[1], InferenceFailed) and isinstance(uneven[1], InferenceFailed)
    assert one_row[0].outputs["scores"][0] == pytest.approx(TABLE[[1, 2, 3, 4]].mean(0))
    assert one_row[2].outputs["scores"][0] == pytest.approx(TABLE[[5, 6, 7, 8]].mean(0))
    assert uneven[0].outputs["scores"] == pytest.approx(TABLE[[1, 2]])
    assert uneven[2].outputs["scores"] == pytest.approx(TABLE[[3]])
    stats = _stats(ids_rt, "ids")
    assert stats["nv_inference_request_failure"] == 2
    assert stats["nv_inference_request_success"] == 4


def test_an_asyncio_caller_that_gives_up_leaves_the_others_of_its_loop_turn_answered(
    ids_rt: Runtime,
) -> None:
    # A caller's wait_for running out cancelled the future its whole group shares: every
    # other caller of that loop turn got CancelledError, though served.
    async def main() -> list[Any]:
        ids_rt.pause()
        impatient = asyncio.ensure_future(
            asyncio.wait_for(ids_rt.infer_async("ids", np.array(GOOD)), 0.05)
        )
        patient = [
            asyncio.ensure_future(ids_rt.infer_async("ids", np.array([[k] * 4]))) for k in (5, 6)
        ]
        with pytest.raises(TimeoutError):
            await impatient
        ids_rt.resume()
        return await asyncio.gather(*patient, return_exceptions=True)

    got = asyncio.run(main())
    assert got[0].outputs["scores"][0] == pytest.approx(TABLE[[5] * 4].mean(0))
    assert got[1].outputs["scores"][0] == pytest.approx(TABLE[[6] * 4].mean(0))


def test_an_app_stage_that_raises_on_one_caller_of_a_loop_turn_fails_that_caller_alone(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    # The stage's error came out of the group's drain: every caller of that loop turn
    # failed with it.
    def no_negatives(params: Any) -> Any:
        def run(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            if (x < 0).any():
                raise RuntimeError("negative ids")  # not a BadInput
            return x

        return run

    spec = ids_spec(preprocess=[{"type": "test_core_hostile_no_negatives"}])
    with app_stage(PREPROCESS, "test_core_hostile_no_negatives", no_negatives):
        runtime.start_pipeline(spec, runtime.load_model(gather_model()))

    async def main() -> list[Any]:
        calls = [runtime.infer_async("ids", np.array(x)) for x in (GOOD, [[-1] * 4], GOOD)]
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    assert isinstance(got[1], RuntimeFailure) and "negative ids" in str(got[1])
    assert got[0].outputs["scores"].shape == got[2].outputs["scores"].shape == (1, 3)
    stats = _stats(runtime, "ids")
    assert (stats[SUCCESS], stats["nv_inference_request_failure"]) == (2, 1)


def test_a_completion_callback_that_raises_harms_no_batch_neighbour(
    ids_rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    # The callback's exception had left the requests after it without their results:
    # they were failed with it instead, though the model had served them.
    got: list[Request] = []

    def explode(req: Request) -> None:
        raise RuntimeError("an app's callback is broken")

    ids_rt.pause()
    ids_rt.submit("ids", np.array(GOOD), explode)
    ids_rt.submit("ids", np.array([[5, 6, 7, 8]]), got.append)
    with caplog.at_level(logging.ERROR, "edgewise.runtime._request"):
        ids_rt.resume()
        until(lambda: len(got) == 1)
    assert got[0].error is None
    assert got[0].result.outputs["scores"][0] == pytest.approx(TABLE[[5, 6, 7, 8]].mean(0))
    assert "callback" in caplog.text
    assert ids_rt.infer("ids", np.array(GOOD)).outputs["scores"].shape == (1, 3)


def test_a_postprocess_stage_that_raises_fails_its_requests_counted(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    # An app's stage that raised failed the batch without a trace in the failure count.
    def explodes(params: Any) -> Any:
        def run(post: Any) -> None:
            raise ZeroDivisionError("the stage divided by zero")

        return run

    spec = make_spec("ids", postprocess=[{"type": "test_core_hostile_explodes"}])
    with app_stage(POSTPROCESS, "test_core_hostile_explodes", explodes):
        runtime.start_pipeline(spec, runtime.load_model(gather_model()))
    with pytest.raises(RuntimeFailure, match="divided by zero"):
        runtime.infer("ids", np.array(GOOD))
    assert _stats(runtime, "ids")["nv_inference_request_failure"] == 1


def test_topk_on_scores_that_are_not_one_row_per_input_answers_without_them(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    # Scores of shape [N, 1, 4] (a swapped-in export with an extra axis): every request
    # had failed with numpy's "truth value of an array is ambiguous" (a 500).
    model = runtime.load_model(onnx_model(TensorProto.FLOAT, reshape_to=[-1, 1, 4]))
    runtime.start_pipeline(make_spec("odd", postprocess=[{"type": "topk"}]), model)
    result = runtime.infer("odd", np.ones((2, 4), np.float32))
    assert result.labels == [None, None] and result.topk is None
    assert result.outputs["y"].shape == (2, 1, 4)


# -- cascade upstreams that misbehave --------------------------------------------------


class _Upstream(BaseHTTPRequestHandler):
    """An upstream tier; `mode` says how it answers."""

    mode: ClassVar[str] = "ok"
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        good = b'{"labels": ["1", "2"], "confidences": [0.9, 0.9]}'
        mode = type(self).mode
        if mode == "drip":  # the answer a byte at a time, for half a minute
            self.send_response(200)
            self.send_header("content-length", str(len(good) + 300))
            self.end_headers()
            for b in (good + b" " * 300)[:150]:
                try:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if mode == "redirect":
            self.send_response(307)
            self.send_header("location", "/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        answers = {
            "ok": (200, good),
            "500": (500, good),
            "nan": (200, b'{"labels": ["1", "2"], "confidences": [NaN, 0.9]}'),
            "text-labels": (200, b'{"labels": "12", "confidences": [0.9, 0.9]}'),
            "text-confidences": (200, b'{"labels": ["1", "2"], "confidences": ["0.9", "1"]}'),
            "bool-confidences": (200, b'{"labels": ["1", "2"], "confidences": [true, true]}'),
            "object-labels": (200, b'{"labels": [{}, []], "confidences": [0.9, 0.9]}'),
            "huge": (200, good[:-1] + b', "pad": "' + b"x" * (17 << 20) + b'"}'),
        }
        status, body = answers[mode]
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Upstream.mode = "ok"
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    "mode",
    [
        "500",
        "redirect",
        "nan",
        "text-labels",
        "text-confidences",
        "bool-confidences",
        "object-labels",
        "huge",
    ],
)
def test_an_upstream_answer_that_is_no_answer_leaves_the_local_one_counted(
    runtime: Runtime,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    upstream: str,
    mode: str,
) -> None:
    # A NaN had replaced the local confidence; "12" had been read as two labels, "0.9"
    # and true as numbers; 17 MB had been read and taken; and no failure was counted.
    _Upstream.mode = mode
    light = runtime.load_model(logreg_bytes)
    spec = make_spec(cascade={"threshold": 0.99, "endpoint": upstream, "timeout_s": 5})
    runtime.start_pipeline(spec, light)
    x = split.x_test[:2]
    result = runtime.infer("digits", x)
    local = np.asarray(light.session.run(x)["probabilities"])
    assert result.labels == [str(k) for k in local.argmax(axis=1)]
    assert result.confidences == pytest.approx(local.max(axis=1).tolist())
    assert result.escalated == [False, False]
    stats = _stats(runtime, "digits")
    assert stats["nv_inference_escalated"] == 0
    assert stats["edgewise_cascade_failures"] == 2
    assert 'edgewise_cascade_failures{pipeline="digits"} 2' in runtime.prometheus()


def test_an_upstream_that_answers_rows_is_still_taken(
    runtime: Runtime, logreg_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, upstream: str
) -> None:
    spec = make_spec(cascade={"threshold": 0.99, "endpoint": upstream, "timeout_s": 5})
    runtime.start_pipeline(spec, runtime.load_model(logreg_bytes))
    result = runtime.infer("digits", split.x_test[:2])
    assert result.labels == ["1", "2"] and result.escalated == [True, True]
    assert _stats(runtime, "digits")["edgewise_cascade_failures"] == 0


def test_an_upstream_that_drips_its_answer_holds_the_executor_no_longer_than_its_timeout(
    runtime: Runtime, logreg_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, upstream: str
) -> None:
    # httpx's timeout bounds each read, not the call: a byte every 0.2 s had held the
    # executor (every pipeline on it, critical ones too) for the whole 30 s answer.
    _Upstream.mode = "drip"
    light = runtime.load_model(logreg_bytes)
    spec = make_spec(cascade={"threshold": 0.99, "endpoint": upstream, "timeout_s": 0.5})
    runtime.start_pipeline(spec, light)
    x = split.x_test[:2]
    got: list[Request] = []
    runtime.submit("digits", x, got.append)
    until(lambda: len(got) == 1, timeout=15)  # the answer is 30 s long
    assert got[0].error is None and got[0].result.escalated == [False, False]
    runtime.submit("digits", x, got.append)  # and the next batch alike
    until(lambda: len(got) == 2, timeout=15)
    assert got[1].result.escalated == [False, False]
    assert _stats(runtime, "digits")["edgewise_cascade_failures"] == 4


def test_an_upstream_that_holds_its_answer_never_holds_the_local_apis_event_loop(
    runtime: Runtime,
    logreg_bytes: bytes,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    # A fast model's request ran in the API's event loop, its escalation with it: while
    # the upstream thought, no client of the device was heard, critical ones included.
    import httpx

    from edgewise.runtime import HttpServer, InferenceAPI

    asked, release = threading.Event(), threading.Event()

    class Thinking(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            asked.set()
            release.wait(30)
            body = b'{"labels": ["7"], "confidences": [0.9]}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Thinking)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{upstream.server_address[1]}"
    cascade = {"threshold": 0.99, "endpoint": endpoint, "timeout_s": 60}
    runtime.start_pipeline(make_spec("remote", cascade=cascade), runtime.load_model(logreg_bytes))
    runtime.start_pipeline(make_spec("alarm", priority="critical"), runtime.load_model(mlp_bytes))
    http = HttpServer(InferenceAPI(runtime))
    base = f"http://127.0.0.1:{http.start()}/v1/pipelines"
    row = {"inputs": split.x_test[:1].tolist()}
    slow: dict[str, httpx.Response] = {}
    asker = threading.Thread(
        target=lambda: slow.update(r=httpx.post(f"{base}/remote/infer", json=row, timeout=60))
    )
    try:
        asker.start()
        assert asked.wait(10)
        alarm = httpx.post(f"{base}/alarm/infer", json=row, timeout=10)
        assert alarm.status_code == 200 and not release.is_set()
        release.set()
        asker.join(30)
        assert slow["r"].status_code == 200 and slow["r"].json()["labels"] == ["7"]
    finally:
        release.set()
        http.stop()
        upstream.shutdown()
        upstream.server_close()


def test_a_slow_upstream_does_not_make_the_apis_critical_requests_queue_behind_it(
    runtime: Runtime,
    logreg_bytes: bytes,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    # Batches that waited 20 ms on their upstream made the executor's typical batch
    # 20 ms long: the API then ran no request in its event loop, a critical one beside
    # a busy worker included, and critical requests queued behind the next escalation.
    import httpx

    from edgewise.runtime import HttpServer, InferenceAPI

    held, release = threading.Event(), threading.Event()
    calls: list[int] = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            calls.append(1)
            if len(calls) <= 10:
                time.sleep(0.02)
            else:
                held.set()
                release.wait(30)
            body = b'{"labels": ["7"], "confidences": [0.9]}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{upstream.server_address[1]}"
    cascade = {"threshold": 0.99, "endpoint": endpoint, "timeout_s": 60}
    runtime.start_pipeline(make_spec("remote", cascade=cascade), runtime.load_model(logreg_bytes))
    runtime.start_pipeline(make_spec("alarm", priority="critical"), runtime.load_model(mlp_bytes))
    http = HttpServer(InferenceAPI(runtime))
    base = f"http://127.0.0.1:{http.start()}/v1/pipelines"
    row = {"inputs": split.x_test[:1].tolist()}
    slow: dict[str, httpx.Response] = {}
    asker = threading.Thread(
        target=lambda: slow.update(r=httpx.post(f"{base}/remote/infer", json=row, timeout=60))
    )
    try:
        for _ in range(10):  # escalations the upstream answers in 20 ms
            assert httpx.post(f"{base}/remote/infer", json=row).json()["labels"] == ["7"]
        asker.start()
        assert held.wait(10)  # the next one is held: the executor's worker waits on it
        alarm = httpx.post(f"{base}/alarm/infer", json=row, timeout=10)
        assert alarm.status_code == 200 and not release.is_set()
        release.set()
        asker.join(30)
        assert slow["r"].status_code == 200
    finally:
        release.set()
        http.stop()
        upstream.shutdown()
        upstream.server_close()


# -- local cascades --------------------------------------------------------------------


def test_a_local_cascade_model_that_fails_on_the_rows_leaves_the_local_answer_counted(
    runtime: Runtime, make_spec: SpecFactory
) -> None:
    # The cascade model's error had failed the whole batch (a 500, not counted).
    primary = runtime.load_model(onnx_model(TensorProto.INT64))  # scores: the ids as floats
    spec = make_spec("ids", cascade={"threshold": 0.5, "model": {"name": "gather"}})
    runtime.start_pipeline(spec, primary, cascade_model=runtime.load_model(gather_model()))
    result = runtime.infer("ids", np.array([[-50, 0, 0, 0], [0, 0, 0, 0]]))
    assert result.escalated == [False, False]  # -50 is past the table: ours stand
    assert result.labels == ["1", "0"] and result.confidences == [0.0, 0.0]
    assert runtime.infer("ids", np.array([[0, 0, 0, 0]])).escalated == [True]
    stats = _stats(runtime, "ids")
    assert stats["nv_inference_request_success"] == 2
    assert (stats["nv_inference_escalated"], stats["edgewise_cascade_failures"]) == (1, 2)


def test_a_swap_to_a_model_the_local_cascade_cannot_follow_is_refused(
    runtime: Runtime, mlp_bytes: bytes, logreg_bytes: bytes, make_spec: SpecFactory
) -> None:
    # The swap had gone through: every low-confidence batch then failed in the cascade.
    light, heavy = runtime.load_model(logreg_bytes), runtime.load_model(mlp_bytes)
    four = runtime.load_model(onnx_model(TensorProto.FLOAT))  # takes [N, 4], not [N, 64]
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    runtime.start_pipeline(spec, light, cascade_model=heavy)
    with pytest.raises(ValueError, match="cascade model"):
        runtime.swap_model("digits", four)
    with pytest.raises(ValueError, match="cascade model"):
        runtime.swap_model("digits", four, tier="fallback")
    assert runtime.pipelines()[0]["model"] == light.key
    runtime.stop_pipeline("digits")
    with pytest.raises(ValueError, match="cascade model"):  # a fallback it cannot follow
        runtime.start_pipeline(spec, light, fallback=four, cascade_model=heavy)


def test_a_model_that_fails_on_a_health_sample_fails_the_gate(runtime: Runtime) -> None:
    # The backend's error had come out of health_check: the agent's install got an
    # onnxruntime exception where it expects a verdict.
    model = runtime.load_model(gather_model())
    sample = {"input": [[99, 0, 0, 0]], "expected": {"scores": [[0.0, 0.0, 0.0]]}}
    result = runtime.health_check(model, {"name": "gather", "health": {"samples": [sample]}})
    assert not result.ok and result.passed == 0
    assert "fails on sample 1" in result.reason and "Gather" in result.reason


def test_a_health_sample_may_expect_a_classifiers_text_labels(runtime: Runtime) -> None:
    # Text against the output's Python strings had gone to np.allclose: the gate raised
    # numpy's DTypePromotionError instead of passing or failing the sample.
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x[:300], np.array([f"d{v}" for v in y[:300]]))
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}})
    model = runtime.load_model(onx.SerializeToString())

    def gate(label: str) -> Any:
        sample = {"input": x[0].tolist(), "expected": {"label": [label]}}
        return runtime.health_check(model, {"name": "s", "health": {"samples": [sample]}})

    assert gate(str(clf.predict(x[:1])[0])).ok
    wrong = gate("d9" if clf.predict(x[:1])[0] != "d9" else "d8")
    assert not wrong.ok and "out of tolerance" in wrong.reason


# -- providers ---------------------------------------------------------------------------


def test_a_provider_that_runs_no_model_is_taken_for_no_accelerator(
    mlp_bytes: bytes, make_spec: SpecFactory
) -> None:
    # The preference `ort.get_available_providers()` puts Azure's first: the session
    # reported it as the provider it got, and a pipeline that requires an accelerator
    # started on a device without one (and on an executor of its own, "azure").
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "AzureExecutionProvider" not in available:
        pytest.skip("this onnxruntime build has no Azure provider")
    rt = Runtime(cores=1, monitor_interval_s=None, providers_preference=available)
    try:
        model = rt.load_model(mlp_bytes)
        assert model.provider == "CPUExecutionProvider"
        with pytest.raises(AcceleratorUnavailable):
            rt.load_model(mlp_bytes, require_accelerator=True)
        with pytest.raises(AcceleratorUnavailable):
            rt.start_pipeline(make_spec(requires_accelerator=True), model)
    finally:
        rt.close()


def test_a_fallback_that_takes_other_inputs_is_refused_at_start(
    mlp_bytes: bytes, make_spec: SpecFactory, clock: FakeClock
) -> None:
    # It had started: the first hot window then switched to it, and every request the
    # clients sent for the primary's [N, 64] came back a 400 until the device cooled.
    rt = Runtime(cores=1, clock=clock, monitor_interval_s=None, thermal_reader=lambda: 95.0)
    try:
        four = rt.load_model(onnx_model(TensorProto.FLOAT))  # takes [N, 4]
        spec = make_spec(fallback={"name": "four", "version": "1"})
        with pytest.raises(ValueError, match="fallback model"):
            rt.start_pipeline(spec, rt.load_model(mlp_bytes), fallback=four)
        assert rt.pipelines() == []
    finally:
        rt.close()


# -- degradation readers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cpu",
    [
        pytest.param("raises", id="raises"),
        pytest.param("busy", id="text"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(True, id="bool"),
    ],
)
def test_a_broken_cpu_reader_leaves_thermal_pressure_in_force(
    mlp_bytes: bytes, logreg_bytes: bytes, make_spec: SpecFactory, clock: FakeClock, cpu: Any
) -> None:
    # psutil raising had made every tick raise: the monitor skipped each window, and a
    # hot device never degraded (nor did one breaching its SLO).
    def cpu_reader() -> Any:
        if cpu == "raises":
            raise OSError("psutil cannot read /proc/stat")
        return cpu

    rt = Runtime(
        cores=1,
        clock=clock,
        monitor_interval_s=None,
        cpu_reader=cpu_reader,
        thermal_reader=lambda: 95.0,
    )
    try:
        fallback = rt.load_model(logreg_bytes)
        spec = make_spec(fallback={"name": "digits-logreg", "version": "1"})
        rt.start_pipeline(spec, rt.load_model(mlp_bytes), fallback=fallback)
        events = rt.tick()
        assert [e.kind for e in events] == ["degraded"]
        assert "temperature 95.0 C" in events[0].reason and "CPU" not in events[0].reason
        assert rt.stats("digits")["mode"] == str(Mode.FALLBACK)
    finally:
        rt.close()


def test_thermal_zones_that_read_no_temperature_are_left_out(tmp_path: Path) -> None:
    # A zone reading INT_MAX had made the device 2147483.6 C hot: fallback for good.
    readings = {
        "0": "2147483647\n",  # a broken driver
        "1": "-274000\n",  # the kernel's "invalid"
        "2": "garbage\n",
        "3": "",
        "4": "9" * 5000,  # past int()'s digit limit
        "5": "\xff\xfe",
        "6": "45000\n",
        "7": "-5000\n",
    }
    for zone, text in readings.items():
        (tmp_path / f"thermal_zone{zone}").mkdir()
        (tmp_path / f"thermal_zone{zone}" / "temp").write_bytes(text.encode("latin-1"))
    (tmp_path / "thermal_zone8").mkdir()  # no temp file at all
    (tmp_path / "thermal_zone9" / "temp").mkdir(parents=True)  # a directory
    assert read_thermal_c(tmp_path) == 45.0
    assert read_thermal_c(tmp_path / "absent") is None


# -- stopping ----------------------------------------------------------------------------


def test_requests_still_queued_when_a_stop_gives_up_draining_are_answered_stopped(
    ids_rt: Runtime,
) -> None:
    # They had stayed queued, their callers waiting, and then ran on the stopped
    # pipeline's closed sinks once the executor moved on.
    ids_rt.start_pipeline(ids_spec("other"), ids_rt.load_model(gather_model()))
    got: list[Request] = []
    ids_rt.pause()
    for _ in range(3):
        ids_rt.submit("ids", np.array(GOOD), got.append)
    ids_rt.stop_pipeline("ids", drain_timeout=0.05)
    assert len(got) == 3
    assert all(isinstance(r.error, PipelineStopped) for r in got)
    ids_rt.resume()
    # The executor serves its queue in order: what had stayed queued would run first.
    assert ids_rt.infer("other", np.array(GOOD)).outputs["scores"].shape == (1, 3)
    assert len(got) == 3 and all(r.result is None for r in got)


@pytest.mark.parametrize("timeout", [-1.0, -0.5, float("nan")])
def test_an_infer_timeout_that_is_no_wait_is_refused(ids_rt: Runtime, timeout: float) -> None:
    # -1 made a queued request's caller wait for good (the lock's "no timeout"); -0.5
    # and NaN raised from the lock after the request had been queued.
    with pytest.raises(ValueError, match="timeout"):
        ids_rt.infer("ids", np.array(GOOD), timeout=timeout)
    assert ids_rt.infer("ids", np.array(GOOD), timeout=0).outputs["scores"].shape == (1, 3)


# -- input decoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[[true, 0.5]]",
        b"[[0.5, false]]",
        b'{"inputs": [[1, 2], [3, true]]}',
        b'{"inputs": {"x": [[0.5]], "mask": [[1, false]]}}',
        b"[[[[0.5]], [[true]]]]",
    ],
)
def test_booleans_among_json_numbers_are_bad_input(body: bytes) -> None:
    # numpy had read them as 1 and 0: the model got numbers the caller never sent.
    with pytest.raises(BadInput, match="true or false"):
        decode_json(body)


def test_the_words_true_and_false_elsewhere_in_a_body_are_no_booleans() -> None:
    got = decode_json(b'{"inputs": [[0.5, 1e-3]], "note": "true or false"}')
    assert isinstance(got, np.ndarray) and got.tolist() == [[0.5, 0.001]]


def test_an_npz_that_unpacks_past_the_limit_is_skipped_unread(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A few kilobytes of zip had been inflated in full, however large (a zip bomb).
    from edgewise.runtime import _sources

    monkeypatch.setattr(_sources, "MAX_NPZ_BYTES", 1 << 20)
    inbox = tmp_path / "in"
    inbox.mkdir()
    np.savez_compressed(inbox / "000_bomb.npz", input=np.zeros((4 << 20,), np.uint8))
    assert os.path.getsize(inbox / "000_bomb.npz") < 64 << 10
    np.savez_compressed(inbox / "001_fine.npz", input=split.x_test[:1])
    with zipfile.ZipFile(inbox / "000_bomb.npz") as z:
        assert sum(i.file_size for i in z.infolist()) > 4 << 20
    spec = make_spec(source={"type": "directory", "params": {"path": str(inbox), "poll_s": 0.05}})
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    source = runtime.source("digits")
    until(lambda: len(source.seen) == 2 and _stats(runtime, "digits")[SUCCESS] == 1)
    assert (source.unreadable, source.failed) == (1, 0)
    assert _stats(runtime, "digits")["nv_inference_request_bad_input"] == 1


def test_an_update_of_primary_and_fallback_is_refused_whole_or_taken_whole(
    runtime: Runtime, mlp_bytes: bytes, logreg_bytes: bytes, make_spec: SpecFactory
) -> None:
    # The agent swapped the fallback first: a primary refused after it left the pipeline
    # on its old primary with the update's fallback.
    light, heavy = runtime.load_model(logreg_bytes), runtime.load_model(mlp_bytes)
    other = runtime.load_model(logreg_bytes)
    four = runtime.load_model(onnx_model(TensorProto.FLOAT))  # the cascade cannot follow
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    runtime.start_pipeline(spec, light, fallback=light, cascade_model=heavy)
    p = runtime._get("digits")
    with pytest.raises(ValueError, match="cascade model"):
        runtime.swap_models("digits", four, fallback=other)
    assert p.primary.model is light and p.fallback is not None and p.fallback.model is light
    runtime.swap_models("digits", other, fallback=other)
    assert p.primary.model is other and p.fallback.model is other


def test_a_pipeline_started_on_a_closed_runtime_is_refused(
    mlp_bytes: bytes, make_spec: SpecFactory
) -> None:
    # Its executors were closed: the pipeline started and every request it admitted
    # waited in a queue nothing would ever run.
    rt = Runtime()
    model = rt.load_model(mlp_bytes)
    rt.close()
    with pytest.raises(RuntimeError, match="closed"):
        rt.start_pipeline(make_spec(), model)
