"""Follow-ups of the runtime review: remote escalations, accelerator swaps, refused values.

Each test names what had gone wrong before its fix (the comment at its top).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto

from edgewise.examples import DigitsSplit
from edgewise.runtime import (
    AcceleratorUnavailable,
    HttpServer,
    InferenceAPI,
    InferenceFailed,
    LoadedModel,
    ModelRejectedInput,
    Runtime,
)
from edgewise.runtime._backend import OnnxSession, rejected_input
from edgewise.runtime._cascade import MAX_PENDING
from edgewise.runtime._scheduler import Request

from .conftest import SpecFactory, onnx_model, until
from .test_runtime_core_hostile import BAD, GOOD, gather_model, ids_spec

# -- remote escalations do not hold the executor ------------------------------------------


class HeldUpstream:
    """A real upstream server that answers each call only once the test releases it.

    Every call answers its rows with label "7" at confidence 0.9.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                rows = len(json.loads(body)["inputs"])
                with held._lock:
                    held.calls += 1
                held.release.wait(30)
                answer = b'{"labels": %s, "confidences": %s}' % (
                    b"[" + b", ".join([b'"7"'] * rows) + b"]",
                    b"[" + b", ".join([b"0.9"] * rows) + b"]",
                )
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def asked(self) -> int:
        with self._lock:
            return self.calls

    def wait_asked(self, n: int) -> None:
        """Wait until the upstream has been asked `n` times."""
        until(lambda: self.asked() == n)


@pytest.fixture
def held() -> Iterator[HeldUpstream]:
    up = HeldUpstream()
    up.thread.start()
    try:
        yield up
    finally:
        up.release.set()
        up.server.shutdown()
        up.server.server_close()
        up.thread.join(10)


def _remote(runtime: Runtime, make_spec: SpecFactory, logreg_bytes: bytes, url: str) -> None:
    cascade = {"threshold": 0.99, "endpoint": url, "timeout_s": 60}
    runtime.start_pipeline(make_spec("remote", cascade=cascade), runtime.load_model(logreg_bytes))


def test_a_critical_request_is_served_while_an_escalation_waits_on_its_upstream(
    runtime: Runtime,
    logreg_bytes: bytes,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    held: HeldUpstream,
) -> None:
    # The executor's worker waited on the upstream (up to the cascade's 60 s): the
    # critical request queued behind it and was served only once the upstream answered.
    _remote(runtime, make_spec, logreg_bytes, held.url)
    runtime.start_pipeline(make_spec("alarm", priority="critical"), runtime.load_model(mlp_bytes))
    x = split.x_test[:1]
    slow: list[Request] = []
    runtime.submit("remote", x, slow.append)  # (queued: the worker runs it)
    held.wait_asked(1)
    alarm_done = threading.Event()
    alarm: list[Request] = []

    def on_alarm(req: Request) -> None:
        alarm.append(req)
        alarm_done.set()

    runtime.submit("alarm", x, on_alarm)  # queued too: only the worker can serve it

    assert alarm_done.wait(10), "the critical request waited for the upstream"
    assert not held.release.is_set() and slow == []
    assert alarm[0].error is None and alarm[0].result.tier == "primary"
    held.release.set()
    until(lambda: len(slow) == 1)
    assert slow[0].error is None
    assert slow[0].result.labels == ["7"] and slow[0].result.escalated == [True]
    assert slow[0].result.confidences == [0.9]
    stats = runtime.stats("remote")
    assert stats["nv_inference_request_success"] == 1
    assert (stats["nv_inference_escalated"], stats["edgewise_cascade_failures"]) == (1, 0)
    assert stats["tier_count"]["cascade"] == 1


def test_escalations_past_the_bound_keep_their_local_answer_at_once_counted(
    runtime: Runtime,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    held: HeldUpstream,
) -> None:
    # (The bound is new: escalations must not queue up without end behind a slow upstream.)
    light = runtime.load_model(logreg_bytes)
    _remote(runtime, make_spec, logreg_bytes, held.url)
    x = split.x_test[:1]
    got: list[Request] = []
    for k in range(MAX_PENDING):  # one batch each: the next once this one is handed off
        runtime.submit("remote", x, got.append)
        held.wait_asked(k + 1)
    runtime.submit("remote", x, got.append)  # one too many: answered locally, now
    until(lambda: len(got) == 1)
    assert not held.release.is_set() and held.asked() == MAX_PENDING
    local = np.asarray(light.session.run(x)["probabilities"])
    assert got[0].result.labels == [str(local.argmax())]
    assert got[0].result.escalated == [False]
    held.release.set()
    until(lambda: len(got) == MAX_PENDING + 1)
    assert [r.result.escalated for r in got[1:]] == [[True]] * MAX_PENDING
    stats = runtime.stats("remote")
    assert stats["nv_inference_request_success"] == MAX_PENDING + 1
    assert stats["nv_inference_escalated"] == MAX_PENDING
    assert stats["edgewise_cascade_failures"] == 1


def test_a_caller_that_ran_its_batch_itself_gets_the_upstreams_late_answer(
    runtime: Runtime,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    held: HeldUpstream,
) -> None:
    # `infer` runs a request on an idle executor in its own thread: now that the batch
    # is completed by the escalator's thread, the caller must wait for that, not return
    # a result that is not there yet.
    _remote(runtime, make_spec, logreg_bytes, held.url)
    got: dict[str, Any] = {}
    caller = threading.Thread(
        target=lambda: got.update(r=runtime.infer("remote", split.x_test[:2]))
    )
    caller.start()
    held.wait_asked(1)
    assert "r" not in got
    held.release.set()
    caller.join(30)
    assert got["r"].labels == ["7", "7"] and got["r"].escalated == [True, True]


def test_stopping_a_pipeline_answers_its_waiting_escalations_with_the_local_answer(
    runtime: Runtime,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    held: HeldUpstream,
) -> None:
    light = runtime.load_model(logreg_bytes)
    _remote(runtime, make_spec, logreg_bytes, held.url)
    x = split.x_test[:1]
    got: list[Request] = []
    runtime.submit("remote", x, got.append)
    held.wait_asked(1)
    runtime.stop_pipeline("remote")
    assert len(got) == 1 and not held.release.is_set()
    local = np.asarray(light.session.run(x)["probabilities"])
    assert got[0].result.labels == [str(local.argmax())]
    assert got[0].result.escalated == [False]


# -- hot swaps keep `requires_accelerator` ------------------------------------------------


def _on_accelerator(model: LoadedModel, provider: str = "CUDAExecutionProvider") -> LoadedModel:
    """`model`'s real onnxruntime session, as a device that has `provider` reports it.

    This machine has no accelerator: the session runs on the CPU, but the runtime sees
    what it sees on a device where onnxruntime placed the model on `provider`.
    """
    session = model.session
    assert isinstance(session, OnnxSession)
    return LoadedModel(
        info=model.info,
        session=OnnxSession(session._session, provider),
        confidence_output=model.confidence_output,
    )


def test_a_pipeline_requiring_an_accelerator_refuses_a_hot_swap_to_a_cpu_model(
    runtime: Runtime,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    # start_pipeline refused the CPU model; swap_model took it and the pipeline ran on
    # the CPU from then on, silently.
    accelerated = _on_accelerator(runtime.load_model(mlp_bytes))
    cpu = runtime.load_model(logreg_bytes)
    assert cpu.provider == "CPUExecutionProvider"
    spec = make_spec("gpu-only", requires_accelerator=True)
    with pytest.raises(AcceleratorUnavailable):
        runtime.start_pipeline(spec, cpu)
    runtime.start_pipeline(spec, accelerated, fallback=cpu)  # a CPU fallback is allowed

    with pytest.raises(AcceleratorUnavailable, match="requires an accelerator"):
        runtime.swap_model("gpu-only", cpu)
    with pytest.raises(AcceleratorUnavailable, match="requires an accelerator"):
        runtime.swap_models("gpu-only", cpu, _on_accelerator(runtime.load_model(mlp_bytes)))

    summary = runtime.pipelines()[0]
    assert summary["provider"] == "CUDAExecutionProvider"
    assert runtime._pipelines["gpu-only"].primary.model is accelerated
    assert runtime._pipelines["gpu-only"].fallback.model is cpu  # type: ignore[union-attr]
    assert not [e for e in runtime.events() if e.kind == "model_swapped"]
    again = _on_accelerator(runtime.load_model(mlp_bytes))
    runtime.swap_models("gpu-only", again, cpu)  # an accelerated primary is taken
    assert runtime._pipelines["gpu-only"].primary.model is again
    assert runtime.infer("gpu-only", split.x_test[:1]).tier == "primary"


# -- a model refusing the input's values is the caller's bad input ------------------------


def test_onnxruntime_refusing_a_gather_index_is_told_apart_from_a_model_failing() -> None:
    import onnxruntime as ort

    def error_of(model: bytes, x: Any, name: str) -> Exception:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        with pytest.raises(Exception) as raised:
            session.run(None, {name: x})
        return raised.value

    gather = error_of(gather_model(), np.array(BAD), "ids")
    one_row = onnx_model(TensorProto.FLOAT, reshape_to=[1, 4])
    reshape = error_of(one_row, np.zeros((2, 4), np.float32), "x0")
    assert type(gather).__name__ == "InvalidArgument"
    assert rejected_input(gather) == (
        "Gather node: indices element out of data bounds, idx=99 must be within the "
        "inclusive range [-10,9]"
    )
    assert type(reshape).__name__ == "Fail" and rejected_input(reshape) is None
    assert rejected_input(ValueError("INVALID_ARGUMENT")) is None


@pytest.fixture
def api_of() -> Iterator[Any]:
    """Serve a runtime's inference API on 127.0.0.1; returns the pipelines' base URL."""
    servers: list[HttpServer] = []

    def serve(rt: Runtime) -> str:
        http = HttpServer(InferenceAPI(rt))
        servers.append(http)
        return f"http://127.0.0.1:{http.start()}/v1/pipelines"

    yield serve
    for http in servers:
        http.stop()


def test_a_model_refusing_the_inputs_values_answers_422_and_keeps_serving(
    runtime: Runtime, api_of: Any
) -> None:
    # An index past the model's table was a 500 "inference_failed", as if the device
    # were broken; the caller sent it.
    runtime.start_pipeline(ids_spec(), runtime.load_model(gather_model()))
    base = api_of(runtime)

    bad = httpx.post(f"{base}/ids/infer", json={"inputs": BAD}, timeout=10)
    good = httpx.post(f"{base}/ids/infer", json={"inputs": GOOD}, timeout=10)

    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["code"] == "model_rejected_input"
    assert "Gather node: indices element out of data bounds, idx=99" in error["message"]
    assert "ONNXRuntimeError" not in error["message"]
    assert good.status_code == 200 and len(good.json()["outputs"]["scores"]) == 1
    stats = runtime.stats("ids")
    assert stats["nv_inference_request_failure"] == 1
    assert stats["nv_inference_request_success"] == 1
    assert stats["nv_inference_request_bad_input"] == 0  # it fit; the model refused it


def test_a_refused_caller_in_a_batch_gets_its_422_and_its_neighbours_their_results(
    runtime: Runtime,
) -> None:
    runtime.start_pipeline(ids_spec(), runtime.load_model(gather_model()))
    got: list[Request] = []
    runtime.pause()
    for ids in (GOOD, BAD):
        runtime.submit("ids", np.array(ids), got.append)
    runtime.resume()
    until(lambda: len(got) == 2)
    by_row = {int(r.x[0, 0]): r for r in got}
    assert isinstance(by_row[99].error, ModelRejectedInput)
    assert by_row[99].error.status == 422
    assert by_row[1].error is None


def test_a_model_that_fails_otherwise_is_still_an_internal_failure(
    runtime: Runtime, api_of: Any
) -> None:
    # Reshaping to one row of 4: two rows fail it with onnxruntime's Fail, the model's
    # own limit, not a value the caller could have known to avoid.
    one_row = runtime.load_model(onnx_model(TensorProto.FLOAT, reshape_to=[1, 4]))
    runtime.start_pipeline(ids_spec("one"), one_row)
    base = api_of(runtime)
    two_rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    answer = httpx.post(f"{base}/one/infer", json={"inputs": two_rows}, timeout=10)
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "inference_failed"
    with pytest.raises(InferenceFailed) as raised:
        runtime.infer("one", np.zeros((2, 4), np.float32))
    assert not isinstance(raised.value, ModelRejectedInput)
