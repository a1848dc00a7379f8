"""Built-in sources: where a pipeline's inputs come from when no app calls the API.

A source factory takes `(params, runtime, pipeline_name)`, `params` being the stage's
model from `edgewise.protocol._stages`, and returns an object with `start()` and `stop()`.
Sources submit without waiting for results (results go to the sinks) and never block on
a full queue: admission control rejects at once, the runtime counts it, and the source
moves on.

- `synthetic`: replays a data set (`npy` file, the scikit-learn `digits` set, or random
  `shape`) at `rate_hz`, `count` items (0 = until stopped).
- `directory`: every new `*.npy` / `*.npz` / `*.png` / `*.jpg` file under `path`,
  polled (an `.npz` holds a model's inputs by name).
- `mqtt`: messages on `topic` at Mosquitto `host:port`; JSON arrays or raw tensors.
- `http`: the local inference API itself (nothing to start).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._stages import (
    DirectorySourceParams,
    MqttSourceParams,
    SyntheticSourceParams,
)
from edgewise.runtime._decode import decode_json
from edgewise.runtime._errors import RuntimeFailure
from edgewise.runtime._stages import SOURCES

__all__ = ["DirectorySource", "MqttSource", "SyntheticSource", "decode_message"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]


def _noop(_req: object) -> None:
    return None


class _Thread:
    """A source that runs one loop in a daemon thread until stopped."""

    def __init__(self, runtime: Any, pipeline: str) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.submitted = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def offer(self, x: Array | dict[str, Array]) -> None:
        """Submit one input; refusals are counted by the runtime and here."""
        try:
            self.runtime.submit(self.pipeline, x, _noop)
            self.submitted += 1
        except RuntimeFailure:
            self.refused += 1

    def _loop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


@SOURCES.register("synthetic", typed=True)
class SyntheticSource(_Thread):
    """Replays a data set at a fixed rate."""

    def __init__(self, params: SyntheticSourceParams, runtime: Any, pipeline: str) -> None:
        super().__init__(runtime, pipeline)
        self.rate_hz = params.rate_hz
        self.count = params.count
        self.data = self._data(params)

    @staticmethod
    def _data(params: SyntheticSourceParams) -> Array:
        if params.npy is not None:
            try:
                data: Array = np.load(Path(params.npy), allow_pickle=False)
            except OSError as exc:
                raise ValueError(f"cannot read npy {params.npy!r}: {exc}") from None
            return data
        if params.dataset == "digits":
            from sklearn.datasets import load_digits

            digits: Array = (load_digits().data / 16.0).astype(np.float32)
            return digits
        rng = np.random.default_rng(params.seed)
        return rng.random((params.size, *params.shape), dtype=np.float32)

    def _loop(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set() and (not self.count or i < self.count):
            self.offer(self.data[i % len(self.data)])
            i += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break


def _read_image(path: Path) -> Array:
    try:
        from PIL import Image
    except ImportError:
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"cannot read {path}") from None
        return np.asarray(img, dtype=np.float32)
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)


def _read_file(path: Path) -> Array | dict[str, Array]:
    """An array file, an image, or an `.npz` of a model's inputs by name."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as named:
            return {k: np.asarray(named[k]) for k in named.files}
    return _read_image(path)


@SOURCES.register("directory", typed=True)
class DirectorySource(_Thread):
    """Feeds every new file of a directory, oldest name first, polling for more."""

    SUFFIXES = (".npy", ".npz", ".png", ".jpg", ".jpeg")

    def __init__(self, params: DirectorySourceParams, runtime: Any, pipeline: str) -> None:
        super().__init__(runtime, pipeline)
        self.path = Path(params.path)
        self.poll_s = params.poll_s
        self.seen: set[str] = set()
        self.unreadable = 0

    def scan(self) -> int:
        """Feed files not seen yet; returns how many were offered."""
        fed = 0
        try:
            names = sorted(p for p in self.path.iterdir() if p.suffix.lower() in self.SUFFIXES)
        except OSError:
            return 0
        for p in names:
            if p.name in self.seen:
                continue
            self.seen.add(p.name)
            try:
                x = _read_file(p)
            except Exception as exc:  # any file at all may land here: skip it, keep going
                # (OSError, ValueError; and others, such as Pillow's DecompressionBombError)
                log.warning("directory source: skipping %s: %s", p, exc)
                self.unreadable += 1
                continue
            self.offer(x)
            fed += 1
        return fed

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self.poll_s)


def decode_message(
    payload: bytes, dtype: np.dtype[Any] | None = None, shape: tuple[int, ...] | None = None
) -> Array | dict[str, Array]:
    """An MQTT payload: JSON (as the local inference API takes it), or raw bytes.

    JSON is an array, `{"inputs": [...]}`, or inputs by name (`{"inputs": {"ids":
    [...], "mask": [...]}}`); raw bytes are of the source's dtype and shape.

    Raises:
        BadInput, ValueError: the payload is not such an input.
    """
    if dtype is not None:
        arr: Array = np.frombuffer(payload, dtype=dtype)
        return arr.reshape(shape) if shape else arr
    return decode_json(payload)  # as the local inference API reads a JSON body


@SOURCES.register("mqtt", typed=True)
class MqttSource:
    """Subscribes to a topic; each message is one request."""

    def __init__(self, params: MqttSourceParams, runtime: Any, pipeline: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.runtime, self.pipeline = runtime, pipeline
        self.topic = params.topic
        self.host = params.host
        self.port = params.port
        self.qos = params.qos
        try:
            self.dtype = None if params.dtype is None else np.dtype(params.dtype)
        except TypeError:
            raise ValueError(f"dtype: not a numpy dtype (got {params.dtype!r})") from None
        self.shape = params.shape
        self.received = 0
        self.undecodable = 0
        self.refused = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=self.qos)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received += 1
        try:
            x = decode_message(msg.payload, self.dtype, self.shape)
        except Exception as exc:  # whatever a publisher sends, the source keeps listening
            # (an exception out of this callback would end paho's network thread)
            self.undecodable += 1
            log.debug("mqtt source %s: undecodable message: %s", self.topic, exc)
            return
        try:
            self.runtime.submit(self.pipeline, x, _noop)
        except RuntimeFailure:
            self.refused += 1

    def start(self) -> None:
        """Connect and subscribe (the network loop runs in paho's thread)."""
        self.client.connect(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
