from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise._httpd import Deferred, Headers
from edgewise.examples import DigitsSplit
from edgewise.protocol import PipelineSpec
from edgewise.runtime import HttpServer, InferenceAPI, Runtime, make_inference_app

from .conftest import SpecFactory, onnx_model


class Server:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: object) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        config = uvicorn.Config(app, log_level="error", lifespan="on")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def api_in_loop(
    mlp_bytes: bytes, make_spec: SpecFactory
) -> Iterator[Callable[[Headers, bytes], tuple[int, Any]]]:
    """The infer route called as `HttpServer` calls it, in an event loop of its own."""
    rt = Runtime(cores=1, monitor_interval_s=None)
    rt.start_pipeline(make_spec(), rt.load_model(mlp_bytes))
    api = InferenceAPI(rt)
    loop = asyncio.new_event_loop()

    async def answer(headers: Headers, body: bytes) -> tuple[int, Any]:
        got = api("POST", "/v1/pipelines/digits/infer", headers, body)
        if isinstance(got, Deferred):
            await asyncio.wait([got.fut])
            got = got.finish()
        return got[0], orjson.loads(got[1])

    try:
        yield lambda headers, body: loop.run_until_complete(answer(headers, body))
    finally:
        loop.close()
        rt.close()


@pytest.fixture(params=["httpserver", "asgi-on-uvicorn"])
def served(
    request: pytest.FixtureRequest, runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory
) -> Iterator[httpx.Client]:
    """The API as the agent serves it (`HttpServer`), and as an ASGI app on uvicorn."""
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    if request.param == "asgi-on-uvicorn":
        server = Server(make_inference_app(runtime, max_body_bytes=64 * 1024))
        with server as url, httpx.Client(base_url=url, timeout=10) as client:
            yield client
        return
    api = InferenceAPI(runtime)
    http = HttpServer(api, max_body_bytes=64 * 1024)
    api.alone = http.alone
    port = http.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        http.stop()


def _raw(x: np.ndarray, dtype: str | None = None, shape: str | None = None) -> dict[str, object]:
    return {
        "content": x.tobytes(),
        "headers": {
            "content-type": "application/octet-stream",
            "x-tensor-dtype": dtype or str(x.dtype),
            "x-tensor-shape": shape or ",".join(map(str, x.shape)),
        },
    }


def test_json_inference_matches_the_runtime(
    served: httpx.Client, runtime: Runtime, split: DigitsSplit
) -> None:
    resp = served.post("/v1/pipelines/digits/infer", json={"inputs": split.x_test[:3].tolist()})
    assert resp.status_code == 200
    body = resp.json()
    assert body["labels"] == runtime.infer("digits", split.x_test[:3]).labels
    assert len(body["outputs"]["probabilities"]) == 3
    bare = served.post("/v1/pipelines/digits/infer", json=split.x_test[0].tolist())
    assert bare.status_code == 200 and len(bare.json()["labels"]) == 1


def test_raw_tensor_inference(served: httpx.Client, split: DigitsSplit) -> None:
    resp = served.post("/v1/pipelines/digits/infer", **_raw(split.x_test[:2]))  # type: ignore[arg-type]
    assert resp.status_code == 200
    assert len(resp.json()["labels"]) == 2


def test_listing_and_stats(served: httpx.Client, split: DigitsSplit) -> None:
    served.post("/v1/pipelines/digits/infer", json=split.x_test[0].tolist())
    listing = served.get("/v1/pipelines").json()["pipelines"]
    assert [p["name"] for p in listing] == ["digits"]
    assert listing[0]["input"] == {"dtype": "float32", "shape": [None, 64]}
    stats = served.get("/v1/pipelines/digits/stats").json()
    assert stats["nv_inference_request_success"] == 1


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"inputs": [[0.0] * 63]}}, 400, "bad_input"),
        ({"json": {"inputs": [["a"] * 64]}}, 400, "bad_input"),
        ({"json": {"inputs": [[0.0] * 64, [0.0] * 3]}}, 400, "bad_input"),
        ({"json": {"wrong": 1}}, 400, "bad_input"),
        ({"json": "text"}, 400, "bad_input"),
        ({"json": {"inputs": [[True] * 64]}}, 400, "bad_input"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "bad_input",
        ),
        ({"json": {"inputs": [[0.0] * 64] * 2000}}, 413, "payload_too_large"),
        ({"json": {"inputs": [[1e300] + [0.0] * 63]}}, 400, "bad_input"),
    ],
    ids=[
        "size",
        "non-numeric",
        "ragged",
        "no-inputs",
        "not-array",
        "bool",
        "syntax",
        "oversized",
        "beyond-float32",
    ],
)
def test_bad_json_gets_a_4xx_and_the_pipeline_keeps_serving(
    served: httpx.Client, split: DigitsSplit, kwargs: dict[str, object], status: int, code: str
) -> None:
    resp = served.post("/v1/pipelines/digits/infer", **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["message"]
    ok = served.post("/v1/pipelines/digits/infer", json=split.x_test[0].tolist())
    assert ok.status_code == 200


def test_bad_raw_tensors_get_a_4xx(
    served: httpx.Client, runtime: Runtime, split: DigitsSplit
) -> None:
    x = split.x_test[:1]
    cases = [
        _raw(x.astype(np.float64)),  # wrong dtype
        _raw(x, shape="1,32"),  # shape and size disagree
        _raw(x[:, :32], shape="1,32"),  # wrong shape for the model
        _raw(x, dtype="complex64"),  # unsupported dtype
        _raw(x, shape="1,x"),  # unreadable shape
        # 2**32 x 2**32 rows: numpy's product of the shape wraps around to 0 bytes
        {**_raw(x[:0], shape=f"{2**32},{2**32}")},
        _raw(x, shape=",".join(["1"] * 70 + ["64"])),  # numpy holds 64 dimensions (a 500)
        _raw(split.x_test[:10], shape="1_0,64"),  # int() reads "1_0" as 10
    ]
    for case in cases:
        resp = served.post("/v1/pipelines/digits/infer", **case)  # type: ignore[arg-type]
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "bad_input"
    assert served.post("/v1/pipelines/digits/infer", **_raw(x)).status_code == 200  # type: ignore[arg-type]
    shouted = _raw(x)  # a media type is case-insensitive
    shouted["headers"] = {**shouted["headers"], "content-type": "Application/Octet-Stream"}  # type: ignore[dict-item]
    assert served.post("/v1/pipelines/digits/infer", **shouted).status_code == 200  # type: ignore[arg-type]
    # Those the headers already gave away are counted as the pipeline's bad input too.
    assert runtime.stats("digits")["nv_inference_request_bad_input"] == len(cases)


def test_unknown_pipeline_route_and_method(served: httpx.Client) -> None:
    resp = served.post("/v1/pipelines/nope/infer", json=[[0.0] * 64])
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_pipeline"
    assert served.get("/v1/elsewhere").status_code == 404
    assert served.get("/v1/pipelines/digits/infer").status_code == 405
    assert served.get("/v1/pipelines/nope/stats").status_code == 404


def test_concurrent_http_clients_are_batched_and_all_served(
    served: httpx.Client, runtime: Runtime, split: DigitsSplit
) -> None:
    errors: list[int] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=10) as c:
            for i in range(20):
                r = c.post("/v1/pipelines/digits/infer", json=split.x_test[(k + i) % 50].tolist())
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert runtime.stats("digits")["nv_inference_request_success"] == 160


@pytest.mark.parametrize("prefix", ["/", "/v1/pipelines"])
def test_agent_can_mount_the_api_next_to_its_own_routes(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory, split: DigitsSplit, prefix: str
) -> None:
    from fastapi import FastAPI

    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    agent = FastAPI()

    @agent.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    agent.mount(prefix, make_inference_app(runtime))
    with Server(agent) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").json() == {"ok": True}
        resp = client.post("/v1/pipelines/digits/infer", json=split.x_test[0].tolist())
        assert resp.status_code == 200, resp.text
        assert client.get("/v1/pipelines", follow_redirects=True).status_code == 200


def _call(
    app: object, body_messages: list[dict[str, object]], headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, Any]]:
    """Drive the ASGI app directly with the body in the given messages (as uvicorn does
    for a chunked upload); returns (status, JSON body)."""
    import asyncio
    import json

    sent: list[dict[str, Any]] = []
    queue = list(body_messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0)

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/pipelines/digits/infer",
        "headers": headers,
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    return int(sent[0]["status"]), json.loads(sent[1]["body"])


def test_a_body_in_several_messages_is_joined_and_checked_against_the_limit(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory, split: DigitsSplit
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    app = make_inference_app(runtime, max_body_bytes=4096)
    body = httpx.Request("POST", "http://x", json={"inputs": split.x_test[:2].tolist()}).read()
    assert len(body) < 4096
    whole = _call(app, [{"type": "http.request", "body": body}], [])
    thirds = [body[: len(body) // 3], body[len(body) // 3 : -5], body[-5:]]
    chunked = _call(
        app,
        [{"type": "http.request", "body": c, "more_body": i < 2} for i, c in enumerate(thirds)],
        [(b"content-type", b"application/json")],
    )
    assert whole[0] == chunked[0] == 200
    assert (
        chunked[1]["labels"]
        == whole[1]["labels"]
        == runtime.infer("digits", split.x_test[:2]).labels
    )
    # No content-length to refuse up front: the size is counted as the chunks arrive.
    big = [{"type": "http.request", "body": b" " * 3000, "more_body": True}] * 2
    status, err = _call(app, [*big, {"type": "http.request", "body": body}], [])
    assert (status, err["error"]["code"]) == (413, "payload_too_large")
    # One message holding more than the limit, also without a content-length.
    status, err = _call(app, [{"type": "http.request", "body": b" " * 5000}], [])
    assert (status, err["error"]["code"]) == (413, "payload_too_large")
    # The client went away half-way: a 4xx, and the pipeline keeps serving.
    gone = [{"type": "http.request", "body": thirds[0], "more_body": True}]
    status, err = _call(app, [*gone, {"type": "http.disconnect"}], [])
    assert (status, err["error"]["code"]) == (400, "bad_input")
    again = _call(app, [{"type": "http.request", "body": body}], [])
    assert again[0] == 200 and again[1]["labels"] == whole[1]["labels"]


_LEAF = st.one_of(
    st.floats(allow_nan=False),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
_JSON = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=70) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=150,
)
_HEADERS = st.fixed_dictionaries(
    {
        b"content-type": st.just(b"application/octet-stream"),
        b"x-tensor-dtype": st.sampled_from(
            [b"float32", b"float64", b"uint8", b"int64", b"bool", b""]
        ),
        b"x-tensor-shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4).map(
            lambda dims: ",".join(map(str, dims)).encode()
        )
        | st.binary(max_size=8),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    # The standard library writes integers beyond 64 bits (and Infinity, not JSON).
    body=st.one_of(_JSON, st.fixed_dictionaries({"inputs": _JSON})).map(
        lambda v: json.dumps(v).encode()
    )
    | st.tuples(_HEADERS, st.binary(max_size=600)),
)
def test_any_body_gets_a_json_answer_below_500_and_the_pipeline_keeps_serving(
    api_in_loop: Callable[[Headers, bytes], tuple[int, Any]], body: bytes | tuple[Headers, bytes]
) -> None:
    headers, raw = (
        body if isinstance(body, tuple) else ({b"content-type": b"application/json"}, body)
    )
    status, answer = api_in_loop(headers, raw)
    assert status < 500, answer
    if status >= 400:
        assert answer["error"]["code"] and answer["error"]["message"]
    ok, _ = api_in_loop({b"content-type": b"application/json"}, orjson.dumps([[0.0] * 64]))
    assert ok == 200


def test_raw_tensors_of_every_input_dtype_reach_their_model(runtime: Runtime) -> None:
    # A depth camera's uint16 frames, sent as they are.
    from onnx import TensorProto

    runtime.start_pipeline(
        PipelineSpec.model_validate({"name": "depth", "model": {"name": "m"}}),
        runtime.load_model(onnx_model(TensorProto.UINT16)),
    )
    api = InferenceAPI(runtime)
    http = HttpServer(api)
    port = http.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            frame = np.array([[0, 1, 65535, 1000]], dtype=np.uint16)
            resp = client.post("/v1/pipelines/depth/infer", **_raw(frame))  # type: ignore[arg-type]
            assert resp.status_code == 200, resp.text
            assert resp.json()["outputs"]["y"] == [[0.0, 1.0, 65535.0, 1000.0]]
            wrong = client.post("/v1/pipelines/depth/infer", **_raw(frame.astype(np.int16)))  # type: ignore[arg-type]
            assert wrong.status_code == 400
            assert "dtype int16 does not match the model input uint16" in wrong.text
            assert client.post("/v1/pipelines/depth/infer", **_raw(frame)).status_code == 200  # type: ignore[arg-type]
    finally:
        http.stop()
