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

Whatever arrives, a source's thread goes on: an input that cannot be read is counted and
logged, and so is one that a stage fails on. Files are read only when they are regular
files and never unpickled; a broker that is down is retried in the background.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from edgewise.protocol._stages import (
    DirectorySourceParams,
    MqttSourceParams,
    SyntheticSourceParams,
)
from edgewise.runtime._decode import decode_json
from edgewise.runtime._errors import BadInput, RuntimeFailure
from edgewise.runtime._stages import SOURCES

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_NPZ_BYTES",
    "DirectorySource",
    "MqttSource",
    "SyntheticSource",
    "decode_message",
]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

#: The largest JSON message the `mqtt` source decodes: the local inference API's default
#: body limit. Parsed, JSON numbers take ten times their text's size in memory.
MAX_JSON_BYTES = 8 * 1024 * 1024

#: The most an `.npz` file's arrays may take unpacked (the `directory` source): a few
#: kilobytes of zip can inflate to gigabytes. As much as Pillow lets an image take as
#: float32 (its decompression bomb limit, 89 million pixels, at 4 bytes each).
MAX_NPZ_BYTES = 4 * 89_478_485


def _noop(_req: object) -> None:
    return None


class _Thread:
    """A source that runs one loop in a daemon thread until stopped."""

    def __init__(self, runtime: Any, pipeline: str) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.submitted = 0
        self.refused = 0
        self.failed = 0
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
        """Submit one input; refusals are counted by the runtime and here.

        Any other error out of a stage (one an app registered) is counted in `failed`
        and logged: one input must not end the source's thread.
        """
        try:
            self.runtime.submit(self.pipeline, x, _noop)
            self.submitted += 1
        except RuntimeFailure:
            self.refused += 1
        except Exception as exc:
            self.failed += 1
            log.warning("source of pipeline %s: an input failed: %r", self.pipeline, exc)

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
                with _open_regular(Path(params.npy)) as f:
                    data = _load_array(f)
            except (OSError, ValueError, MemoryError) as exc:
                raise ValueError(f"cannot read npy {params.npy!r}: {exc}") from None
            if data.ndim == 0 or not len(data):  # the loop replays data[i % len(data)]
                raise ValueError(
                    f"npy {params.npy!r} holds no rows to replay (shape {list(data.shape)})"
                )
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


def _open_regular(path: Path) -> IO[bytes]:
    """`path` opened to read, when it is a regular file (or a link to one).

    It is opened without waiting and looked at before it is read: a FIFO named like an
    input would hold open() until a writer came, and the source's thread with it.

    Raises:
        OSError: it cannot be opened.
        ValueError: it is no regular file (a directory, a FIFO, a device).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _load_array(f: IO[bytes]) -> Array:
    """The array of an `.npy` file, never unpickled.

    Raises:
        ValueError: not an `.npy` array (an `.npz` archive by that name, a pickle).
    """
    loaded = np.load(f, allow_pickle=False)
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise ValueError("an .npz archive, not an .npy array")
    return loaded


def _load_named(f: IO[bytes], max_bytes: int = MAX_NPZ_BYTES) -> dict[str, Array]:
    """The arrays of an `.npz` archive by name, never unpickled.

    The archive's members may unpack to `max_bytes` in all. Their sizes are read from
    the zip's directory before anything is inflated, and they hold: `zipfile` reads no
    member past its stated size (and a member cut short fails its CRC).

    Raises:
        ValueError: not an `.npz` archive (an `.npy` array by that name, a pickle), or
            one that unpacks to more than `max_bytes`.
    """
    loaded = np.load(f, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        raise ValueError("an .npy array, not an .npz archive")
    with loaded as named:
        unpacked = sum(i.file_size for i in named.zip.infolist())
        if unpacked > max_bytes:
            raise ValueError(
                f"an .npz archive that unpacks to {unpacked} bytes; at most {max_bytes}"
            )
        return {k: np.asarray(named[k]) for k in named.files}


def _read_image(f: IO[bytes]) -> Array:
    """An image's pixels as float32.

    Raises:
        ValueError: not an image, or one of more pixels than Pillow's decompression
            bomb limit (where Pillow only warns, up to twice that): as float32 such an
            image takes gigabytes.
    """
    try:
        from PIL import Image
    except ImportError:
        import cv2

        img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError("not an image OpenCV can read") from None
        return np.asarray(img, dtype=np.float32)
    with Image.open(f) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise ValueError(
                f"an image of {im.width} x {im.height} pixels is over {limit} (Pillow's "
                "decompression bomb limit)"
            )
        return np.asarray(im, dtype=np.float32)


def _read_file(path: Path, max_npz_bytes: int = MAX_NPZ_BYTES) -> Array | dict[str, Array]:
    """An array file, an image, or an `.npz` of a model's inputs by name."""
    suffix = path.suffix.lower()
    with _open_regular(path) as f:
        if suffix == ".npy":
            return _load_array(f)
        if suffix == ".npz":
            return _load_named(f, max_npz_bytes)
        return _read_image(f)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """Size, modification and change times of a regular file; None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


@SOURCES.register("directory", typed=True)
class DirectorySource(_Thread):
    """Feeds every new file of a directory, oldest name first, polling for more.

    A file that cannot be read is counted in `unreadable` (and in the pipeline's bad
    input) and read again only once it changes: a writer may still be writing it. An
    `.npz` may unpack to `max_npz_bytes` at most. A name that leaves the directory is
    forgotten (so `seen` holds no more names than the directory), and a file that comes
    back under it is a new file.
    """

    SUFFIXES = (".npy", ".npz", ".png", ".jpg", ".jpeg")

    def __init__(self, params: DirectorySourceParams, runtime: Any, pipeline: str) -> None:
        super().__init__(runtime, pipeline)
        self.path = Path(params.path)
        self.poll_s = params.poll_s
        self.seen: set[str] = set()
        self.unreadable = 0
        self.max_npz_bytes = MAX_NPZ_BYTES
        # Unreadable files by name: what they were (`_signature`) when they failed.
        self._failed: dict[str, tuple[int, int, int] | None] = {}

    def _pending(self, name: str, path: Path) -> bool:
        """Whether the file is to be read: never seen, or unreadable and changed since."""
        if name not in self.seen:
            return True
        if name not in self._failed:
            return False
        was = self._failed[name]
        return was is not None and _signature(path) != was

    def scan(self) -> int:
        """Feed files not seen yet; returns how many were offered."""
        fed = 0
        try:
            names = sorted(p for p in self.path.iterdir() if p.suffix.lower() in self.SUFFIXES)
        except OSError:
            return 0
        present = {p.name for p in names}
        self.seen &= present
        for gone in self._failed.keys() - present:
            del self._failed[gone]
        for p in names:
            if not self._pending(p.name, p):
                continue
            self.seen.add(p.name)
            before = _signature(p)
            try:
                x = _read_file(p, self.max_npz_bytes)
            except Exception as exc:  # any file at all may land here: skip it, keep going
                # (OSError, ValueError; and others, such as Pillow's DecompressionBombError)
                log.warning("directory source: skipping %s: %s", p, exc)
                self.unreadable += 1
                self.runtime.count_bad_input(self.pipeline)
                self._failed[p.name] = before
                continue
            self._failed.pop(p.name, None)
            self.offer(x)
            fed += 1
        return fed

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self.poll_s)


def decode_message(
    payload: bytes,
    dtype: np.dtype[Any] | None = None,
    shape: tuple[int, ...] | None = None,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> Array | dict[str, Array]:
    """An MQTT payload: JSON (as the local inference API takes it), or raw bytes.

    JSON is an array, `{"inputs": [...]}`, or inputs by name (`{"inputs": {"ids":
    [...], "mask": [...]}}`), of at most `max_json_bytes`; raw bytes are of the
    source's dtype and shape.

    Raises:
        BadInput, ValueError: the payload is not such an input.
    """
    if dtype is not None:
        arr: Array = np.frombuffer(payload, dtype=dtype)
        return arr.reshape(shape) if shape else arr
    if len(payload) > max_json_bytes:
        raise BadInput(f"a JSON message of {len(payload)} bytes; at most {max_json_bytes}")
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
        if self.dtype is not None and self.dtype.kind not in "biuf":
            # Text, dates, records, objects: no message would ever make an input.
            raise ValueError(f"dtype: raw tensors are numbers, not {self.dtype}")
        self.shape = params.shape
        self.received = 0
        self.undecodable = 0
        self.refused = 0
        self.failed = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_connect_fail = self._on_connect_fail

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=self.qos)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        where = (self.topic, self.host, self.port)
        log.warning("mqtt source %s: no broker at %s:%s (retrying)", *where)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received += 1
        try:
            x = decode_message(msg.payload, self.dtype, self.shape)
        except Exception as exc:  # whatever a publisher sends, the source keeps listening
            # (an exception out of this callback would end paho's network thread)
            self.undecodable += 1
            self.runtime.count_bad_input(self.pipeline)
            log.debug("mqtt source %s: undecodable message: %s", self.topic, exc)
            return
        try:
            self.runtime.submit(self.pipeline, x, _noop)
        except RuntimeFailure:
            self.refused += 1
        except Exception as exc:  # a stage an app registered: keep paho's thread alive
            self.failed += 1
            log.warning("mqtt source %s: an input failed: %r", self.topic, exc)

    def start(self) -> None:
        """Connect and subscribe (the network loop runs in paho's thread).

        A broker that is not up yet does not keep the pipeline from starting: paho
        connects when it can, as it reconnects when the broker goes away later, and the
        source subscribes then.
        """
        self.client.connect_async(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
