"""Sources and sinks against bad input and a hostile environment, with real parts.

Files of every wrong kind, MQTT messages and brokers that go away, freeze or come late,
callback servers that hang, fail or never stop answering. The contract: bad input is
refused with a clear error and counted, nothing else is lost, no source or sink thread
dies, nothing waits forever, and stopping stays prompt.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image
from pydantic import ValidationError

from edgewise.examples import DigitsSplit
from edgewise.protocol import (
    STRICT_STAGE_PARAMS,
    HttpSinkParams,
    MqttSinkParams,
    PipelineSpec,
    parse_stage_params,
    stage_problems,
)
from edgewise.runtime import PREPROCESS, SINKS, BadInput, Runtime
from edgewise.runtime._sinks import HttpCallbackSink, MqttSink

from .conftest import SpecFactory, log_model, until

# -- real parts: a private broker, an MQTT listener, a callback server -----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A private Mosquitto on a free loopback port, to kill, freeze and start again."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until(lambda: _listens(self.port))

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # (a frozen one dies only once woken)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        """Stop the process, not its connections: a broker that hangs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)


@pytest.fixture
def broker(require_binary: Callable[[str, str], str]) -> Iterator[Broker]:
    """A private broker, not started (the shared one must not be stopped)."""
    b = Broker(require_binary("mosquitto", "mosquitto"))
    try:
        yield b
    finally:
        b.kill()


@contextlib.contextmanager
def listening(port: int, topic: str) -> Iterator[list[bytes]]:
    """The payloads published on `topic` while in the block."""
    got: list[bytes] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        yield got
    finally:
        client.loop_stop()
        client.disconnect()


@contextlib.contextmanager
def publisher(port: int) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        yield client
    finally:
        client.loop_stop()
        client.disconnect()


class _Hostile(BaseHTTPRequestHandler):
    """A callback server; the path says how it answers (its first `bad` requests)."""

    protocol_version = "HTTP/1.1"
    received: ClassVar[list[dict[str, Any]]] = []
    hanging: ClassVar[int] = 0
    bad: ClassVar[int] = 0
    release: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        cls = type(self)
        mode = self.path.strip("/")
        if cls.bad > 0 and mode in ("500", "redirect", "close"):
            cls.bad -= 1
            if mode == "close":  # no answer at all
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(500 if mode == "500" else 307)
            self.send_header("location", self.path)  # (a redirect to itself)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if mode == "hang":
            cls.hanging += 1
            cls.release.wait(60)
            self.close_connection = True
            return
        if mode == "endless":  # a body that never ends
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            with contextlib.suppress(OSError):
                while not cls.release.wait(0.001):
                    self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            self.close_connection = True
            return
        cls.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def hostile_server() -> Iterator[str]:
    """The base URL of a `_Hostile` server on loopback."""
    _Hostile.received, _Hostile.hanging, _Hostile.bad = [], 0, 0
    _Hostile.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Hostile.release.set()
        server.shutdown()
        server.server_close()


def _served(runtime: Runtime, name: str = "digits") -> int:
    n: int = runtime.stats(name)["nv_inference_request_success"]
    return n


def _bad_input(runtime: Runtime, name: str = "digits") -> int:
    n: int = runtime.stats(name)["nv_inference_request_bad_input"]
    return n


def _unblock(fifo: Path) -> None:
    """Open a FIFO's writing end and close it: a reader waiting on it goes on."""
    with contextlib.suppress(OSError):  # (no reader waiting: nothing to do)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


class _Mkdir:
    """Unpickled, it makes a directory: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


# -- stages: what they cannot compute is bad input ---------------------------------------


@pytest.mark.parametrize(
    ("preprocess", "x", "message"),
    [
        # Text, complex numbers: from an .npy file or a raw tensor (had been a ValueError,
        # and a ComplexWarning that dropped the imaginary part).
        ([{"type": "scale"}], np.array([["7"] * 64]), "scale takes numbers, not dtype <U1"),
        ([{"type": "scale"}], np.zeros((1, 64), np.complex64), "takes numbers, not dtype complex"),
        # JSON's float64 beyond float32 (the cast had made it infinity, as the model's own
        # input check refuses to).
        ([{"type": "scale"}], np.full((1, 64), 1e300), "scale: a value is out of float32"),
        # Values per channel that do not fit the input (had been numpy's ValueError) ...
        (
            [{"type": "scale", "params": {"factor": [1, 2, 3]}}],
            np.ones((1, 64), np.float32),
            r"factor of shape \[3\] does not fit an input of shape \[1, 64\]",
        ),
        # ... or that make more of it: one row had become two, answered as two.
        (
            [{"type": "normalize", "params": {"mean": [[0], [0]]}}],
            np.ones((1, 64), np.float32),
            r"mean of shape \[2, 1\] does not fit",
        ),
        # An image without pixels (had been an IndexError).
        (
            [{"type": "resize", "params": {"height": 8, "width": 8}}],
            np.zeros((0, 8), np.float32),
            "resize: the image is empty",
        ),
    ],
)
def test_an_input_a_stage_cannot_compute_is_bad_input(
    runtime: Runtime,
    mlp_bytes: bytes,
    make_spec: SpecFactory,
    preprocess: list[dict[str, Any]],
    x: np.ndarray[Any, Any],
    message: str,
) -> None:
    runtime.start_pipeline(make_spec(preprocess=preprocess), runtime.load_model(mlp_bytes))
    with pytest.raises(BadInput, match=message):
        runtime.infer("digits", x)
    assert _bad_input(runtime) == 1


# -- spec: values a device could not use are refused at deploy time ----------------------


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        # The control plane took these; the device failed to start the pipeline.
        (
            {"preprocess": [{"type": "scale", "params": {"factor": [[1], [1, 2]]}}]},
            "factor: must be a number or a list of numbers, nested lists all of one length",
        ),
        (
            {"preprocess": [{"type": "normalize", "params": {"mean": [1, [2]]}}]},
            "mean: must be a number or a list of numbers, nested lists all of one length",
        ),
        # Booleans had been read as numbers: a topk of one, one input a second.
        (
            {"postprocess": [{"type": "topk", "params": {"k": True}}]},
            "postprocess stage 'topk': k: must not be true or false (got True)",
        ),
        (
            {"source": {"type": "synthetic", "params": {"rate_hz": True}}},
            "rate_hz: must not be true or false",
        ),
        # NaN is no number out of a bound ("must be <= 1000000.0 (got nan)").
        (
            {"source": {"type": "synthetic", "params": {"rate_hz": float("nan")}}},
            "rate_hz: must be a number, not NaN (got nan)",
        ),
        (
            {"sinks": [{"type": "http", "params": {"url": "http://x", "timeout_s": "NaN"}}]},
            "timeout_s: must be a number, not NaN",
        ),
        # A wait longer than a thread can wait at once had ended the source's thread.
        (
            {"source": {"type": "synthetic", "params": {"rate_hz": 1e-12}}},
            "rate_hz: must be >= 1e-06 (got 1e-12)",
        ),
        # Filters paho refuses by raising in its network thread: a source that never hears.
        (
            {"source": {"type": "mqtt", "params": {"topic": "cams/#/in"}}},
            "topic: may hold # only as its whole last level",
        ),
        (
            {"source": {"type": "mqtt", "params": {"topic": "cams+"}}},
            "topic: may hold + only as a whole level",
        ),
        (
            {"source": {"type": "mqtt", "params": {"topic": "cams/\x00"}}},
            "topic: must not hold a NUL character",
        ),
        # Topics no result can be published to: every publish had raised.
        (
            {"sinks": [{"type": "mqtt", "params": {"topic": "results/#"}}]},
            "sink stage 'mqtt': topic: must not hold the wildcards + or #",
        ),
        (
            {"sinks": [{"type": "mqtt", "params": {"topic": "r" * 70_000}}]},
            "topic: must be at most 65535 bytes",
        ),
    ],
)
def test_spec_refuses_values_a_device_could_not_use(stage: dict[str, object], message: str) -> None:
    body = {"name": "p", "model": {"name": "m"}, **stage}
    with pytest.raises(ValidationError) as info:
        PipelineSpec.model_validate(body, context=STRICT_STAGE_PARAMS)  # the control plane
    assert message in str(info.value)
    (problem,) = stage_problems(PipelineSpec.model_validate(body))  # the device
    assert message in problem


def test_spec_refuses_a_list_nested_past_any_tensor_without_recursion_error() -> None:
    deep: Any = 1.0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="factor: must be a number or a list of numbers at most"):
        parse_stage_params("preprocess", "scale", {"factor": deep})


def test_mqtt_source_refuses_a_raw_dtype_that_is_no_number_at_start(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory
) -> None:
    # Every message would have been refused (or failed a stage) one by one.
    spec = make_spec(source={"type": "mqtt", "params": {"topic": "t", "dtype": "U4"}})
    with pytest.raises(ValueError, match="dtype: raw tensors are numbers, not <U4"):
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    assert runtime.pipelines() == []


# -- directory source --------------------------------------------------------------------


def _directory_spec(make_spec: SpecFactory, path: Path, **extra: Any) -> PipelineSpec:
    return make_spec(
        source={"type": "directory", "params": {"path": str(path), "poll_s": 0.02}}, **extra
    )


def test_directory_source_goes_on_after_an_input_a_stage_cannot_compute(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    # Text in an .npy file: the scale stage's ValueError had ended the source's thread.
    np.save(tmp_path / "000.npy", np.array([["7"] * 64]))
    np.save(tmp_path / "001.npy", split.x_test[:1])
    spec = _directory_spec(make_spec, tmp_path, preprocess=[{"type": "scale"}])
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    until(lambda: _served(runtime) == 1)
    source = runtime.source("digits")
    assert (source.refused, source.failed, _bad_input(runtime)) == (1, 0, 1)


def test_directory_source_skips_hostile_files_and_never_unpickles(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    inbox, marker = tmp_path / "in", tmp_path / "unpickled"
    inbox.mkdir()
    (inbox / "00_corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    np.save(inbox / "01_object.npy", np.array([_Mkdir(marker)], dtype=object), allow_pickle=True)
    (inbox / "02_pickle.npy").write_bytes(pickle.dumps(_Mkdir(marker)))
    header = io.BytesIO()  # an array of 4 TiB, by its header
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)}
    )
    (inbox / "03_huge_header.npy").write_bytes(header.getvalue() + bytes(64))
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    (inbox / "04_truncated.png").write_bytes(png.getvalue()[:40])
    (inbox / "05_text.png").write_text("not an image")
    (inbox / "06_empty.npy").write_bytes(b"")
    (inbox / "07_directory.npy").mkdir()
    (inbox / "08_loop.npy").symlink_to(inbox / "08_loop.npy")
    (inbox / "09_dangling.npy").symlink_to(tmp_path / "nothing")
    np.savez(tmp_path / "archive.npz", input=split.x_test[:1])  # an archive named .npy: its
    os.rename(tmp_path / "archive.npz", inbox / "10_archive.npy")  # member names had been fed
    with (inbox / "11_array.npz").open("wb") as f:  # (np.save would add ".npy" to the name)
        np.save(f, split.x_test[:1])
    np.savez(inbox / "12_pickled.npz", input=np.array([_Mkdir(marker)], dtype=object))
    (inbox / "13_device.npy").symlink_to("/dev/zero")
    np.save(inbox / "99_good.npy", split.x_test[:1])
    runtime.start_pipeline(_directory_spec(make_spec, inbox), runtime.load_model(mlp_bytes))
    until(lambda: _served(runtime) == 1)
    source = runtime.source("digits")
    until(lambda: len(source.seen) == 15)
    assert (source.unreadable, source.refused, source.failed) == (14, 0, 0)
    assert _bad_input(runtime) == 14  # the pipeline's own count: they had not been in it
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # as deployed
def test_directory_source_skips_an_image_past_the_decompression_bomb_limit(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Up to twice the limit Pillow only warns: the image had been read, as float32 (an
    # RGB image at the limit is a gigabyte then).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 40)).save(tmp_path / "000.png")  # 1600 pixels
    np.save(tmp_path / "001.npy", split.x_test[:1])
    runtime.start_pipeline(_directory_spec(make_spec, tmp_path), runtime.load_model(mlp_bytes))
    until(lambda: _served(runtime) == 1)
    source = runtime.source("digits")
    assert (source.unreadable, source.refused) == (1, 0)


def test_directory_source_is_not_held_by_a_fifo(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    # Opening a FIFO waits for a writer: the source's thread had waited there for good.
    os.mkfifo(tmp_path / "000.npy")
    np.save(tmp_path / "001.npy", split.x_test[:1])
    try:
        runtime.start_pipeline(_directory_spec(make_spec, tmp_path), runtime.load_model(mlp_bytes))
        until(lambda: _served(runtime) == 1)
        assert runtime.source("digits").unreadable == 1
    finally:
        _unblock(tmp_path / "000.npy")


def test_directory_source_reads_a_file_again_once_it_is_complete(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    whole = io.BytesIO()
    np.save(whole, split.x_test[:1])
    (tmp_path / "000.npy").write_bytes(whole.getvalue()[:100])  # its writer is not done
    runtime.start_pipeline(_directory_spec(make_spec, tmp_path), runtime.load_model(mlp_bytes))
    source = runtime.source("digits")
    until(lambda: source.unreadable == 1)
    (tmp_path / "000.npy").write_bytes(whole.getvalue())  # had never been read again
    until(lambda: _served(runtime) == 1)


def test_directory_source_feeds_a_name_that_comes_back(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    # Names were kept for good: `seen` grew with every file, and one reused was lost.
    np.save(tmp_path / "000.npy", split.x_test[:1])
    runtime.start_pipeline(_directory_spec(make_spec, tmp_path), runtime.load_model(mlp_bytes))
    until(lambda: _served(runtime) == 1)
    (tmp_path / "000.npy").unlink()
    np.save(tmp_path / "001.npy", split.x_test[1:2])  # fed by a scan that saw 000 gone
    until(lambda: _served(runtime) == 2)
    np.save(tmp_path / "000.npy", split.x_test[2:3])
    until(lambda: _served(runtime) == 3)
    assert runtime.source("digits").seen == {"000.npy", "001.npy"}


def test_an_error_out_of_an_app_stage_fails_the_input_not_the_source(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, tmp_path: Path
) -> None:
    def refuse_negatives(params: object) -> Callable[[np.ndarray[Any, Any]], Any]:
        def run(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            if (x < 0).any():
                raise RuntimeError("negative pixels")  # not a BadInput
            return x

        return run

    builtin = PREPROCESS.get("transpose")
    PREPROCESS.register("transpose")(refuse_negatives)  # an app's own stage by that name
    try:
        np.save(tmp_path / "000.npy", -split.x_test[:1])
        np.save(tmp_path / "001.npy", split.x_test[:1])
        spec = _directory_spec(make_spec, tmp_path, preprocess=[{"type": "transpose"}])
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    finally:
        PREPROCESS.register("transpose", typed=True)(builtin)
    until(lambda: _served(runtime) == 1)
    source = runtime.source("digits")
    assert (source.failed, source.refused, source.submitted) == (1, 0, 1)


# -- synthetic source --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # Its thread had died on len() of a 0-d array, and on `i % 0`.
        (np.float32(1.0), r"holds no rows to replay \(shape \[\]\)"),
        (np.zeros((0, 64), np.float32), r"holds no rows to replay \(shape \[0, 64\]\)"),
        ("archive", "an .npz archive, not an .npy array"),  # had died on a KeyError
    ],
)
def test_synthetic_source_refuses_an_npy_without_rows_at_start(
    runtime: Runtime,
    mlp_bytes: bytes,
    make_spec: SpecFactory,
    tmp_path: Path,
    data: Any,
    message: str,
) -> None:
    path = tmp_path / "x.npy"
    if isinstance(data, str):
        with path.open("wb") as f:
            np.savez(f, input=np.zeros((2, 64), np.float32))
    else:
        np.save(path, data)
    spec = make_spec(source={"type": "synthetic", "params": {"npy": str(path)}})
    with pytest.raises(ValueError, match=message):
        runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    assert runtime.pipelines() == []


def test_synthetic_source_start_is_not_held_by_a_fifo(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory, tmp_path: Path
) -> None:
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    spec = make_spec(source={"type": "synthetic", "params": {"npy": str(fifo)}})
    model = runtime.load_model(mlp_bytes)
    refused: list[ValueError] = []

    def start() -> None:
        try:
            runtime.start_pipeline(spec, model)
        except ValueError as exc:
            refused.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "start_pipeline waited on the FIFO"
    finally:
        _unblock(fifo)
        thread.join(10)
    assert len(refused) == 1 and "not a regular file" in str(refused[0])


# -- mqtt source -------------------------------------------------------------------------


def test_mqtt_source_keeps_listening_after_an_image_without_pixels(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    mqtt_broker: tuple[str, int],
) -> None:
    # `[[]]` through a resize stage: its IndexError had ended paho's network thread.
    host, port = mqtt_broker
    topic = f"test/{os.urandom(4).hex()}/in"
    spec = make_spec(
        source={"type": "mqtt", "params": {"host": host, "port": port, "topic": topic}},
        preprocess=[
            {"type": "resize", "params": {"height": 8, "width": 8}},
            {"type": "reshape", "params": {"shape": [-1, 64]}},
        ],
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    source = runtime.source("digits")
    assert source.subscribed.wait(10)
    with publisher(port) as pub:
        pub.publish(topic, b"[[]]", qos=1)
        pub.publish(topic, json.dumps(split.x_test[0].reshape(8, 8).tolist()), qos=1)
        until(lambda: _served(runtime) == 1)
    assert (source.received, source.refused, source.failed) == (2, 1, 0)
    assert _bad_input(runtime) == 1


def test_mqtt_source_does_not_decode_json_over_the_size_limit(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    mqtt_broker: tuple[str, int],
) -> None:
    # Parsed, 9 MB of JSON numbers take ten times that: it had been decoded all the same.
    host, port = mqtt_broker
    topic = f"test/{os.urandom(4).hex()}/in"
    mq = {"host": host, "port": port, "topic": topic}
    runtime.start_pipeline(
        make_spec(source={"type": "mqtt", "params": mq}), runtime.load_model(mlp_bytes)
    )
    source = runtime.source("digits")
    assert source.subscribed.wait(10)
    with publisher(port) as pub:
        pub.publish(topic, b"[" + b"0.5," * 2_300_000 + b"0.5]", qos=1)
        pub.publish(topic, json.dumps(split.x_test[:1].tolist()), qos=1)
        until(lambda: source.received == 2 and _served(runtime) == 1)
    assert (source.undecodable, source.refused) == (1, 0)
    assert _bad_input(runtime) == 1  # the pipeline's own count: it had not been in it


def test_mqtt_source_and_sink_start_before_their_broker(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, broker: Broker
) -> None:
    # A device that boots before its broker: start_pipeline had raised ConnectionRefused
    # (and the agent had blamed the model for it).
    mq = {"port": broker.port}
    spec = make_spec(
        source={"type": "mqtt", "params": {**mq, "topic": "in"}},
        sinks=[{"type": "mqtt", "params": {**mq, "topic": "out", "qos": 1}}],
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    source = runtime.source("digits")
    broker.start()
    assert source.subscribed.wait(30)
    with listening(broker.port, "out") as got, publisher(broker.port) as pub:
        pub.publish("in", json.dumps(split.x_test[:1].tolist()), qos=1)
        until(lambda: len(got) == 1, timeout=30)  # the sink got there too
    assert orjson.loads(got[0])["pipeline"] == "digits"


def test_mqtt_source_hears_again_after_its_broker_is_killed_and_restarted(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, broker: Broker
) -> None:
    broker.start()
    spec = make_spec(source={"type": "mqtt", "params": {"port": broker.port, "topic": "in"}})
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    assert runtime.source("digits").subscribed.wait(10)
    broker.kill()
    broker.start()
    payload = json.dumps(split.x_test[:1].tolist())
    with publisher(broker.port) as pub:

        def heard() -> bool:  # until the source is subscribed again, messages reach nobody
            pub.publish("in", payload, qos=1)
            return _served(runtime) > 0

        until(heard, timeout=60)


# -- mqtt sink ---------------------------------------------------------------------------


def test_mqtt_sink_counts_what_it_could_not_publish_while_its_broker_was_gone(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, broker: Broker
) -> None:
    broker.start()
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:1])
    sink = SINKS.build("mqtt", {"port": broker.port, "topic": "out"}, "digits")
    try:
        until(sink.client.is_connected)
        broker.kill()
        until(lambda: not sink.client.is_connected())
        for _ in range(3):  # qos 0: paho drops them; they had been counted as published
            sink.emit(result)
        assert (sink.published, sink.dropped) == (0, 3)
        broker.start()
        with listening(broker.port, "out") as got:
            until(sink.client.is_connected, timeout=60)
            sink.emit(result)
            until(lambda: len(got) == 1)
        assert (sink.published, sink.dropped) == (1, 3)
    finally:
        sink.close()


def test_mqtt_sink_holds_a_bounded_number_of_results_for_a_broker_that_is_down(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    # qos 1 results wait in paho for the broker: they had piled up without a bound.
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:1])
    sink = SINKS.build("mqtt", {"port": _free_port(), "topic": "out", "qos": 1}, "digits")
    try:
        for _ in range(MqttSink.QUEUE + 3):
            sink.emit(result)
        assert (sink.published, sink.dropped) == (MqttSink.QUEUE, 3)
    finally:
        sink.close()


def test_mqtt_sink_close_is_not_held_by_a_broker_that_hangs(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory, broker: Broker
) -> None:
    # A broker that stops reading fills the connection: closing had waited for paho to
    # write it all, until the keepalive gave up on the broker (a minute and a half).
    broker.start()
    label = "x" * 100_000  # results of 100 kB each: 500 of them fill any socket buffer
    spec = make_spec(
        postprocess=[{"type": "threshold", "params": {"min_confidence": 1.0, "label": label}}]
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", np.zeros((1, 64), np.float32))
    sink = MqttSink(MqttSinkParams(port=broker.port, topic="out"), "digits", close_grace_s=0.5)
    until(sink.client.is_connected)
    broker.freeze()
    for _ in range(500):
        sink.emit(result)
    closing = threading.Thread(target=sink.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "close() waited on the hung broker"


# -- http sink ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["500", "redirect", "close"])
def test_http_sink_counts_failed_posts_and_goes_on(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    hostile_server: str,
    mode: str,
) -> None:
    _Hostile.bad = 2  # the first two requests fail so; the server answers after that
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:1])
    sink = SINKS.build("http", {"url": f"{hostile_server}/{mode}"}, "digits")
    try:
        for _ in range(4):
            sink.emit(result)
        until(lambda: sink.sent + sink.failed == 4)
    finally:
        sink.close()
    assert (sink.failed, sink.sent, len(_Hostile.received)) == (2, 2, 2)


def test_http_sink_is_not_held_by_an_endless_answer(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    hostile_server: str,
) -> None:
    # The sender had read the body to its end: never, with memory growing all along.
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:1])
    sink = SINKS.build("http", {"url": f"{hostile_server}/endless"}, "digits")
    try:
        for _ in range(3):
            sink.emit(result)
        until(lambda: sink.sent == 3)
    finally:
        _Hostile.release.set()
        sink.close()


def test_http_sink_close_is_not_held_by_a_server_that_hangs(
    runtime: Runtime,
    mlp_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
    hostile_server: str,
) -> None:
    # Closing had waited out the queue at up to `timeout_s` a result, then closed the
    # client under the sender (whose next post raised and ended its thread), with the
    # queued results counted nowhere.
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:1])
    params = HttpSinkParams(url=f"{hostile_server}/hang", timeout_s=300)
    sink = HttpCallbackSink(params, "digits", close_grace_s=0.5)
    for _ in range(3):
        sink.emit(result)
    until(lambda: _Hostile.hanging == 1)  # the first is on its way
    closing = threading.Thread(target=sink.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive() and not _Hostile.release.is_set()
    assert (sink.sent, sink.failed, sink.dropped) == (0, 0, 2)


def test_a_nan_confidence_reaches_every_sink_as_null(
    runtime: Runtime, hostile_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    # y = log(x): a row with a negative number has NaN scores, so a NaN confidence. The
    # HTTP sink's sender had died on it (httpx refuses NaN in JSON), losing every later
    # result, and close() had then waited for good on the full queue; the log line was
    # no JSON; the summary's mean confidence was NaN for the window.
    spec = PipelineSpec.model_validate(
        {
            "name": "log",
            "model": {"name": "m"},
            "sinks": [
                {"type": "http", "params": {"url": f"{hostile_server}/ok"}},
                {"type": "log"},
                {"type": "summary"},
            ],
        }
    )
    runtime.start_pipeline(spec, runtime.load_model(log_model()))
    caplog.set_level(logging.INFO, logger="edgewise.runtime.results")
    runtime.infer("log", np.array([[1.0, 2, 3, 4], [-1.0, 1, 1, 1]], np.float32))
    finite = runtime.infer("log", np.array([[1.0, 1, 1, 4]], np.float32)).confidences[0]
    summary = runtime.summaries("log")[0]
    runtime.stop_pipeline("log")  # sends what the HTTP sink holds
    assert [r["confidences"] for r in _Hostile.received] == [
        [pytest.approx(np.log(4)), None],
        [finite],
    ]
    lines = [orjson.loads(r.getMessage()) for r in caplog.records]  # strict JSON
    assert [line["confidences"][-1] for line in lines] == [None, finite]
    assert summary["count"] == 3
    assert summary["mean_confidence"] == pytest.approx((np.log(4) + finite) / 2)


def test_log_sink_writes_one_line_whatever_the_label(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory, caplog: pytest.LogCaptureFixture
) -> None:
    label = "fake\nINFO forged line \x1b[31mred %s ü"
    threshold = {"type": "threshold", "params": {"min_confidence": 1.0, "label": label}}
    spec = make_spec(postprocess=[threshold], sinks=[{"type": "log"}])
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    caplog.set_level(logging.INFO, logger="edgewise.runtime.results")
    runtime.infer("digits", np.zeros((1, 64), np.float32))
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "\x1b" not in line
    assert orjson.loads(line)["labels"] == [label]
