from __future__ import annotations

import numpy as np
import pytest

from edgewise.examples import DigitsSplit
from edgewise.runtime import Runtime

from .conftest import SpecFactory


def test_low_confidence_rows_escalate_to_the_heavier_model(
    runtime: Runtime,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    light = runtime.load_model(logreg_bytes)
    heavy = runtime.load_model(mlp_bytes)
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    runtime.start_pipeline(spec, light, cascade_model=heavy)

    result = runtime.infer("digits", split.x_test)

    light_p = np.asarray(light.session.run(split.x_test)["probabilities"])
    heavy_p = np.asarray(heavy.session.run(split.x_test)["probabilities"])
    low = light_p.max(axis=1) < 0.6
    assert 0 < low.sum() < len(low)
    expected = np.where(low, heavy_p.argmax(axis=1), light_p.argmax(axis=1))
    assert result.labels == [str(k) for k in expected]
    assert result.escalated == low.tolist()
    stats = runtime.stats("digits")
    assert stats["nv_inference_escalated"] == int(low.sum())
    assert stats["tier_count"] == {"primary": int((~low).sum()), "cascade": int(low.sum())}
    assert stats["tier_duration_ms"]["cascade"]["count"] == 1
    assert stats["escalation_rate"] == pytest.approx(low.sum() / len(low))


def test_local_cascade_without_a_cascade_model_is_refused(
    runtime: Runtime, logreg_bytes: bytes, make_spec: SpecFactory
) -> None:
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    with pytest.raises(ValueError, match="no cascade_model"):
        runtime.start_pipeline(spec, runtime.load_model(logreg_bytes))


def test_cascade_to_an_upstream_http_endpoint(
    runtime: Runtime,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    from edgewise.runtime import make_inference_app

    from .test_runtime_http import Server

    upstream = Runtime(cores=1, monitor_interval_s=None)
    try:
        heavy = upstream.load_model(mlp_bytes)
        upstream.start_pipeline(make_spec(), heavy)
        with Server(make_inference_app(upstream)) as url:
            light = runtime.load_model(logreg_bytes)
            spec = make_spec(cascade={"threshold": 0.6, "endpoint": url, "timeout_s": 5})
            runtime.start_pipeline(spec, light)
            result = runtime.infer("digits", split.x_test[:60])
        up_stats = upstream.stats("digits")
    finally:
        upstream.close()
    light_p = np.asarray(light.session.run(split.x_test[:60])["probabilities"])
    heavy_p = np.asarray(heavy.session.run(split.x_test[:60])["probabilities"])
    low = light_p.max(axis=1) < 0.6
    assert low.any()
    expected = np.where(low, heavy_p.argmax(axis=1), light_p.argmax(axis=1))
    assert result.labels == [str(k) for k in expected]
    assert result.escalated == low.tolist()
    assert up_stats["nv_inference_exec_rows"] == int(low.sum())


def test_unreachable_upstream_keeps_the_local_answer(
    runtime: Runtime, logreg_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    light = runtime.load_model(logreg_bytes)
    spec = make_spec(
        cascade={"threshold": 0.99, "endpoint": f"http://127.0.0.1:{port}", "timeout_s": 1}
    )
    runtime.start_pipeline(spec, light)
    result = runtime.infer("digits", split.x_test[:10])
    local = np.asarray(light.session.run(split.x_test[:10])["probabilities"]).argmax(axis=1)
    assert result.labels == [str(k) for k in local]
    assert result.escalated == [False] * 10
    assert runtime.stats("digits")["nv_inference_escalated"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nesting-past-the-parser"),
        pytest.param(b'{"labels": ["1"], "confidences": [0.9, 0.9]}', id="fewer-labels"),
        pytest.param(b'{"labels": ["1", "2"], "confidences": [0.9]}', id="fewer-confidences"),
        pytest.param(b'{"labels": ["1", "2"], "confidences": [[0.9], [0.9]]}', id="nested"),
        pytest.param(b'["1", "2"]', id="not-an-object"),
        pytest.param(b"not json", id="not-json"),
    ],
)
def test_an_upstream_that_answers_nonsense_leaves_the_local_answer(
    runtime: Runtime,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    answer: bytes,
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        light = runtime.load_model(logreg_bytes)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        spec = make_spec(cascade={"threshold": 0.99, "endpoint": endpoint, "timeout_s": 5})
        runtime.start_pipeline(spec, light)
        x = split.x_test[:2]
        result = runtime.infer("digits", x)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    local = np.asarray(light.session.run(x)["probabilities"]).argmax(axis=1)
    assert result.labels == [str(k) for k in local]
    assert result.escalated == [False, False]
    stats = runtime.stats("digits")
    assert stats["nv_inference_request_success"] == 1 and stats["nv_inference_escalated"] == 0
