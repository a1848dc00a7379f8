"""The queue's policy: requests that wait too long expire, a full queue may drop its oldest."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from edgewise.agent.telemetry import stats_delta
from edgewise.control.rollout import GateOutcome, GateSpec, evaluate_gates
from edgewise.control.telemetry import WindowFigures, cohort_figures
from edgewise.control.telemetry._figures import requests_and_errors
from edgewise.examples import DigitsSplit
from edgewise.protocol import PipelineSpec
from edgewise.runtime import (
    Expired,
    HttpServer,
    InferenceAPI,
    Rejected,
    Runtime,
)
from edgewise.runtime._scheduler import Request

from .conftest import FakeClock, SpecFactory, log_model, until


class Outcomes:
    """Each completed request's input index and outcome, in completion order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> None:
        with self.lock:
            outcome = "ok" if req.error is None else type(req.error).__name__
            self.seen.append((req.ctx, outcome))

    def wait(self, n: int) -> list[tuple[int, str]]:
        until(lambda: len(self.seen) >= n)
        return self.seen


def test_a_request_queued_past_max_queue_ms_is_not_run_and_fails_expired(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"max_queue_ms": 50}), rt.load_model(mlp_bytes))
    seen = Outcomes()
    rt.pause()
    for i in range(3):
        rt.submit("digits", split.x_test[i], seen, ctx=i)
    clock.now += 0.030
    rt.submit("digits", split.x_test[3], seen, ctx=3)  # will have waited 30 ms: runs
    clock.now += 0.030  # the first three have waited 60 ms
    rt.resume()

    assert sorted(seen.wait(4)) == [(0, "Expired"), (1, "Expired"), (2, "Expired"), (3, "ok")]
    stats = rt.stats("digits")
    assert stats["nv_inference_request_expired"] == 3
    assert stats["nv_inference_request_success"] == 1
    assert stats["batch_size"]["sum"] == 1  # the expired rows never reached the model
    assert 'nv_inference_request_expired{pipeline="digits"} 3' in rt.prometheus()
    # The pipeline serves on.
    assert rt.infer("digits", split.x_test[0]).label is not None


def test_the_expired_error_says_how_long_the_request_waited(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"max_queue_ms": 50}), rt.load_model(mlp_bytes))
    rt.pause()
    req = rt.submit("digits", split.x_test[0], lambda r: None)
    clock.now += 0.120
    rt.resume()
    until(lambda: req.error is not None)
    assert isinstance(req.error, Expired)
    assert "waited 120 ms" in str(req.error) and "'digits'" in str(req.error)
    assert req.result is None


def test_without_max_queue_ms_a_request_waits_as_long_as_it_takes(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))
    seen = Outcomes()
    rt.pause()
    rt.submit("digits", split.x_test[0], seen, ctx=0)
    clock.now += 3600.0
    rt.resume()
    assert seen.wait(1) == [(0, "ok")]


def test_an_asyncio_group_that_waited_too_long_expires_for_every_member(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"max_queue_ms": 50}), rt.load_model(mlp_bytes))

    async def main() -> list[Any]:
        rt.pause()
        calls = [asyncio.ensure_future(rt.infer_async("digits", split.x_test[i])) for i in range(3)]
        while rt.pipelines()[0]["queue"]["queued"] < 3:  # until the group is queued
            await asyncio.sleep(0.001)
        clock.now += 0.060
        rt.resume()
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    assert [type(g) for g in got] == [Expired] * 3
    assert rt.stats("digits")["nv_inference_request_expired"] == 3


def test_an_asyncio_caller_may_bound_its_own_requests_wait(
    rt: Runtime, clock: FakeClock, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))  # no max_queue_ms

    async def main() -> list[Any]:
        rt.pause()
        calls = [
            asyncio.ensure_future(rt.infer_async("digits", split.x_test[0], max_queue_s=0.02)),
            asyncio.ensure_future(rt.infer_async("digits", split.x_test[1])),
        ]
        while rt.pipelines()[0]["queue"]["queued"] < 2:
            await asyncio.sleep(0.001)
        clock.now += 0.05
        rt.resume()
        return await asyncio.gather(*calls, return_exceptions=True)

    bounded, patient = asyncio.run(main())
    assert isinstance(bounded, Expired)
    assert patient.label == rt.infer("digits", split.x_test[1]).label
    # Run at once when nothing is queued: a bound costs nothing then.
    assert asyncio.run(rt.infer_async("digits", split.x_test[0], max_queue_s=0.02)).label


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_a_bound_that_is_no_number_of_seconds_is_refused(
    bound: float, rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))
    with pytest.raises(ValueError, match="max_queue_s must be a number of seconds > 0"):
        rt.submit("digits", split.x_test[0], lambda r: None, max_queue_s=bound)
    with pytest.raises(ValueError, match="max_queue_s must be a number of seconds > 0"):
        asyncio.run(rt.infer_async("digits", split.x_test[0], max_queue_s=bound))
    assert rt.stats("digits")["nv_inference_request_success"] == 0  # nothing was admitted


def test_an_infer_timeout_keeps_the_queued_request_from_running(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    with Runtime(cores=1, monitor_interval_s=None) as rt:
        rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))
        rt.pause()
        with pytest.raises(Expired, match=r"no result within 0\.05 s"):
            rt.infer("digits", split.x_test[0], timeout=0.05)
        rt.resume()
        until(lambda: rt.stats("digits")["nv_inference_request_expired"] == 1)
        stats = rt.stats("digits")
        assert stats["nv_inference_request_success"] == 0
        assert stats["batch_size"]["count"] == 0  # the model never saw it
        assert rt.infer("digits", split.x_test[0], timeout=5).label is not None


def test_a_full_drop_oldest_queue_fails_its_oldest_requests_and_keeps_the_newest(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    spec = make_spec(batching={"queue_capacity": 4, "overflow": "drop_oldest"})
    rt.start_pipeline(spec, rt.load_model(mlp_bytes))
    seen = Outcomes()
    rt.pause()
    reqs = [rt.submit("digits", split.x_test[i], seen, ctx=i) for i in range(7)]
    assert 'nv_inference_pending_request_count{pipeline="digits"} 4' in rt.prometheus()
    # The three oldest made room for the three newest, at once (their callers know now).
    assert seen.seen == [(0, "Superseded"), (1, "Superseded"), (2, "Superseded")]
    assert "for a newer request" in str(reqs[0].error)
    rt.resume()
    assert seen.wait(7)[3:] == [(3, "ok"), (4, "ok"), (5, "ok"), (6, "ok")]
    stats = rt.stats("digits")
    assert stats["nv_inference_request_superseded"] == 3
    assert stats["nv_inference_request_rejected"] == 0
    assert stats["batch_size"]["sum"] == 4
    assert rt.pipelines()[0]["queue"] == {
        "queued": 0,
        "capacity": 4,
        "overflow": "drop_oldest",
        "max_queue_ms": None,
    }


def test_reject_is_the_default_overflow_and_keeps_the_queued_requests(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt.start_pipeline(make_spec(batching={"queue_capacity": 2}), rt.load_model(mlp_bytes))
    seen = Outcomes()
    rt.pause()
    for i in range(2):
        rt.submit("digits", split.x_test[i], seen, ctx=i)
    with pytest.raises(Rejected):
        rt.submit("digits", split.x_test[2], seen, ctx=2)
    rt.resume()
    assert seen.wait(2) == [(0, "ok"), (1, "ok")]
    assert rt.stats("digits")["nv_inference_request_superseded"] == 0


def test_drop_oldest_drops_only_its_own_pipelines_requests(
    rt: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    model = rt.load_model(mlp_bytes)
    rt.start_pipeline(make_spec("other"), model)
    rt.start_pipeline(
        make_spec("camera", batching={"queue_capacity": 2, "overflow": "drop_oldest"}), model
    )
    seen = Outcomes()
    rt.pause()
    rt.submit("other", split.x_test[0], seen, ctx=0)  # older than every camera request
    for i in range(1, 5):
        rt.submit("camera", split.x_test[i], seen, ctx=i)
    rt.resume()
    assert sorted(seen.wait(5)) == [
        (0, "ok"),
        (1, "Superseded"),
        (2, "Superseded"),
        (3, "ok"),
        (4, "ok"),
    ]
    assert rt.stats("other")["nv_inference_request_superseded"] == 0
    assert rt.stats("camera")["nv_inference_request_superseded"] == 2


def test_the_local_api_answers_503_with_the_reason_and_serves_on(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    with Runtime(cores=1, monitor_interval_s=None) as rt:
        model = rt.load_model(mlp_bytes)
        rt.start_pipeline(make_spec("slow", batching={"max_queue_ms": 30}), model)
        rt.start_pipeline(
            make_spec("camera", batching={"queue_capacity": 1, "overflow": "drop_oldest"}), model
        )
        http = HttpServer(InferenceAPI(rt))
        port = http.start()
        answers: dict[str, httpx.Response] = {}
        body = {"inputs": split.x_test[:1].tolist()}

        def post(key: str, pipeline: str) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                answers[key] = client.post(f"/v1/pipelines/{pipeline}/infer", json=body)

        try:
            rt.pause()
            threads = [threading.Thread(target=post, args=("slow", "slow"))]
            threads[0].start()
            until(lambda: rt.pipelines()[0]["queue"]["queued"] == 1)
            threads.append(threading.Thread(target=post, args=("old", "camera")))
            threads[1].start()
            until(lambda: rt.pipelines()[1]["queue"]["queued"] == 1)
            threads.append(threading.Thread(target=post, args=("new", "camera")))
            threads[2].start()
            threads[1].join(timeout=10)  # answered as soon as the new one took its place
            assert answers["old"].status_code == 503
            assert answers["old"].json()["error"]["code"] == "superseded"
            threading.Event().wait(0.06)  # the slow pipeline's request is past 30 ms now
            rt.resume()
            for t in threads:
                t.join(timeout=10)
            assert answers["slow"].status_code == 503
            assert answers["slow"].json()["error"]["code"] == "expired"
            assert answers["new"].status_code == 200
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                again = client.post("/v1/pipelines/slow/infer", json=body)
            assert again.status_code == 200 and again.json()["labels"]
        finally:
            http.stop()


def test_a_client_may_bound_its_own_requests_wait_with_x_max_queue_ms(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    with Runtime(cores=1, monitor_interval_s=None) as rt:
        rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))  # no max_queue_ms
        http = HttpServer(InferenceAPI(rt))
        port = http.start()
        answers: dict[str, httpx.Response] = {}
        body = {"inputs": split.x_test[:1].tolist()}

        def post(key: str, headers: dict[str, str]) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                answers[key] = client.post("/v1/pipelines/digits/infer", json=body, headers=headers)

        try:
            post("idle", {"x-max-queue-ms": "20"})  # runs at once: no wait at all
            assert answers["idle"].status_code == 200
            rt.pause()
            threads = [
                threading.Thread(target=post, args=("bounded", {"x-max-queue-ms": "20"})),
                threading.Thread(target=post, args=("patient", {})),
            ]
            for t in threads:
                t.start()
            until(lambda: rt.pipelines()[0]["queue"]["queued"] == 2)
            threading.Event().wait(0.05)  # the bounded one is past its 20 ms now
            rt.resume()
            for t in threads:
                t.join(timeout=10)
            assert answers["bounded"].status_code == 503
            assert answers["bounded"].json()["error"]["code"] == "expired"
            assert answers["patient"].status_code == 200
            assert rt.stats("digits")["nv_inference_request_expired"] == 1
        finally:
            http.stop()


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "600001", ""])
def test_a_bad_x_max_queue_ms_is_a_400_and_the_pipeline_serves_on(
    value: str, runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    http = HttpServer(InferenceAPI(runtime))
    port = http.start()
    body = {"inputs": split.x_test[:1].tolist()}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            bad = client.post(
                "/v1/pipelines/digits/infer", json=body, headers={"x-max-queue-ms": value}
            )
            assert bad.status_code == 400
            assert (
                "X-Max-Queue-Ms must be a number of milliseconds" in bad.json()["error"]["message"]
            )
            assert client.post("/v1/pipelines/digits/infer", json=body).status_code == 200
    finally:
        http.stop()
    stats = runtime.stats("digits")
    assert stats["nv_inference_request_success"] == 1
    assert stats["nv_inference_request_bad_input"] == 1  # counted like a body that does not fit


@pytest.mark.parametrize(
    ("batching", "message"),
    [
        ({"max_queue_ms": 0}, "greater than 0"),
        ({"max_queue_ms": -5}, "greater than 0"),
        ({"max_queue_ms": "soon"}, "valid number"),
        ({"max_queue_ms": 10, "max_queue_delay_ms": 10}, "must be longer than max_queue_delay"),
        ({"overflow": "drop_newest"}, "'reject' or 'drop_oldest'"),
    ],
)
def test_bad_queue_policies_are_refused_with_the_reason(
    batching: dict[str, Any], message: str
) -> None:
    body = {"name": "p", "model": {"name": "m"}, "batching": batching}
    with pytest.raises(ValidationError, match=message):
        PipelineSpec.model_validate(body)


def test_expired_superseded_and_nan_answers_count_against_a_rollout(
    rt: Runtime, clock: FakeClock
) -> None:
    spec = PipelineSpec.model_validate(
        {
            "name": "log",
            "model": {"name": "m"},
            "postprocess": [{"type": "softmax"}],
            "batching": {"queue_capacity": 1, "overflow": "drop_oldest", "max_queue_ms": 50},
        }
    )
    rt.start_pipeline(spec, rt.load_model(log_model()))
    good, bad = np.array([[1.0, 2, 3, 4]], np.float32), np.array([[-1.0, 1, 1, 1]], np.float32)
    rt.pause()
    reqs = [rt.submit("log", good, lambda r: None) for _ in range(3)]  # two superseded
    clock.now += 0.1  # the third expires
    rt.resume()
    until(lambda: all(r.error is not None for r in reqs))
    rt.infer("log", good)
    rt.infer("log", bad)  # answered, with a NaN score

    counts = stats_delta(None, rt.stats("log"))["counts"]
    assert {k: counts[k] for k in ("ok", "superseded", "expired", "nonfinite")} == {
        "ok": 2,
        "superseded": 2,
        "expired": 1,
        "nonfinite": 1,
    }
    phase = cohort_figures([WindowFigures.from_record("d1", {"counts": counts})])
    assert (phase.inferences, phase.errors) == (5, 4)
    control = cohort_figures([WindowFigures.from_record("d2", {"counts": {"ok": 100}})])
    gates = GateSpec(max_error_rate_delta=0.05, min_reporting=0, min_inferences=5)
    verdict = evaluate_gates(gates, {}, [], phase, control).by_name("error_rate_delta")
    assert verdict is not None and verdict.outcome is GateOutcome.FAIL
    # NaN rows of answered requests never count for more than those requests.
    assert requests_and_errors({"ok": 2, "nonfinite": 9}) == (2, 2)
