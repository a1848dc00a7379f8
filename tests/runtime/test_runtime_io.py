"""Sources and sinks against real parts: files, Mosquitto, a loopback HTTP server."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from edgewise.examples import DigitsSplit
from edgewise.runtime import Runtime

from .conftest import SpecFactory, until


def test_synthetic_source_replays_a_data_set_into_the_summary_sink(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", split.x_test[:25])
    spec = make_spec(
        source={
            "type": "synthetic",
            "params": {"npy": str(tmp_path / "x.npy"), "rate_hz": 2000, "count": 50},
        },
        sinks=[{"type": "summary"}, {"type": "log"}],
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    until(lambda: runtime.stats("digits")["nv_inference_request_success"] == 50)
    summary = runtime.summaries("digits")[0]
    assert summary["count"] == 50
    assert sum(summary["labels"].values()) == 50
    assert summary["tiers"] == {"primary": 50}
    assert runtime.summaries("digits")[0]["count"] == 0  # the window was reset


def test_directory_source_feeds_new_files_once_and_skips_unreadable(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    for i in range(3):
        np.save(tmp_path / f"{i:03d}.npy", split.x_test[i])
    (tmp_path / "004.npy").write_bytes(b"garbage")
    (tmp_path / "notes.txt").write_text("ignored")
    # A tiny PNG that claims 200 million pixels: Pillow refuses to open it with an error
    # that is neither OSError nor ValueError, which had ended the source's thread.
    Image.new("1", (20_000, 10_000)).save(tmp_path / "003.png")
    spec = make_spec(
        source={"type": "directory", "params": {"path": str(tmp_path), "poll_s": 0.02}},
        sinks=[{"type": "summary"}],
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    until(lambda: runtime.stats("digits")["nv_inference_request_success"] == 3)
    np.save(tmp_path / "005.npy", split.x_test[5])
    until(lambda: runtime.stats("digits")["nv_inference_request_success"] == 4)
    source = runtime.source("digits")
    assert source.unreadable == 2
    assert sorted(source.seen) == [
        "000.npy",
        "001.npy",
        "002.npy",
        "003.png",
        "004.npy",
        "005.npy",
    ]


def test_mqtt_source_to_mqtt_sink_through_mosquitto(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    mqtt_broker: tuple[str, int],
) -> None:
    host, port = mqtt_broker
    root = f"test/{uuid.uuid4().hex[:8]}"
    got: list[dict[str, Any]] = []
    subscribed = threading.Event()
    listener = mqtt.Client(CallbackAPIVersion.VERSION2)
    listener.on_connect = lambda c, *a: c.subscribe(f"{root}/out", qos=1)
    listener.on_subscribe = lambda *a: subscribed.set()
    listener.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    listener.connect(host, port)
    listener.loop_start()
    try:
        assert subscribed.wait(5)
        mq = {"host": host, "port": port}
        spec = make_spec(
            source={"type": "mqtt", "params": {**mq, "topic": f"{root}/in", "qos": 1}},
            sinks=[{"type": "mqtt", "params": {**mq, "topic": f"{root}/out", "qos": 1}}],
        )
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
        source = runtime.source("digits")
        assert source.subscribed.wait(5)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect(host, port)
        pub.loop_start()
        # Nesting too deep for any parser first: the source must keep listening after it.
        pub.publish(f"{root}/in", b"[" * 100_000 + b"]" * 100_000, qos=1)
        for i in range(5):
            pub.publish(f"{root}/in", json.dumps({"inputs": split.x_test[i].tolist()}), qos=1)
        pub.publish(f"{root}/in", b"not json", qos=1)
        pub.publish(f"{root}/in", b"5", qos=1)  # JSON, not an input (as over HTTP)
        pub.publish(f"{root}/in", json.dumps([[0.0] * 10]), qos=1)  # wrong size
        until(lambda: len(got) == 5 and source.received == 9)
        pub.loop_stop()
        pub.disconnect()
    finally:
        listener.loop_stop()
        listener.disconnect()
    want = [str(k) for k in runtime.infer("digits", split.x_test[:5]).labels]
    assert sorted(g["labels"][0] for g in got) == sorted(want)
    assert source.undecodable == 3 and source.refused == 1
    # The pipeline's bad input counts both: what could not be decoded, and what did not fit.
    assert runtime.stats("digits")["nv_inference_request_bad_input"] == 4


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_http_callback_sink_posts_every_result(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        spec = make_spec(sinks=[{"type": "http", "params": {"url": url}}])
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
        for i in range(4):
            runtime.infer("digits", split.x_test[i])
        runtime.stop_pipeline("digits")  # closes the sink: it sends what is queued first
    finally:
        server.shutdown()
        server.server_close()
    assert len(_Collector.received) == 4
    assert all(r["pipeline"] == "digits" and len(r["labels"]) == 1 for r in _Collector.received)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"source": {"type": "directory"}}, "source stage 'directory': path: is required"),
        ({"sinks": [{"type": "http", "params": {"url": "ftp://x"}}]}, "url: must be an http"),
        ({"sinks": [{"type": "mqtt", "params": {"qos": 3}}]}, r"qos: must be <= 2 \(got 3\)"),
        ({"source": {"type": "carrier_pigeon"}}, "unknown source stage"),
        ({"preprocess": [{"type": "normalize", "params": {"std": 0}}]}, "std: must not be zero"),
        # Parameters of the wrong type are refused as bad parameters, naming the stage.
        ({"postprocess": [{"type": "topk", "params": {"k": [1]}}]}, "postprocess stage 'topk': k"),
        ({"preprocess": [{"type": "reshape", "params": {"shape": 5}}]}, "stage 'reshape': shape"),
        ({"preprocess": [{"type": "resize", "params": {"height": {}}}]}, "stage 'resize': height"),
        ({"sinks": [{"type": "mqtt", "params": {"port": [1883]}}]}, "sink stage 'mqtt': port"),
        ({"source": {"type": "synthetic", "params": {"rate_hz": "fast"}}}, "source stage"),
        # Values checked by the stage itself once its parameters are typed.
        ({"preprocess": [{"type": "scale", "params": {"factor": [[1], [1, 2]]}}]}, "factor"),
        ({"source": {"type": "mqtt", "params": {"topic": "t", "dtype": "f5"}}}, "dtype"),
        ({"source": {"type": "synthetic", "params": {"npy": "/nonexistent.npy"}}}, "npy"),
    ],
)
def test_bad_stage_parameters_are_refused_at_start(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory, stage: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        runtime.start_pipeline(make_spec(**stage), runtime.load_model(mlp_bytes))
    assert runtime.pipelines() == []


def test_image_preprocess_resizes_and_normalises() -> None:
    from edgewise.runtime import PREPROCESS

    resize = PREPROCESS.build("resize", {"height": 4, "width": 6, "layout": "chw"})
    img = np.arange(3 * 8 * 12, dtype=np.float32).reshape(3, 8, 12)
    out = resize(img)
    assert out.shape == (3, 4, 6)
    assert out.min() >= img.min() and out.max() <= img.max()
    norm = PREPROCESS.build("normalize", {"mean": 0.5, "std": 0.5})
    assert np.allclose(norm(np.array([0.0, 1.0], np.float32)), [-1.0, 1.0])
