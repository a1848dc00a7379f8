"""The TFLite backend (`ai-edge-litert`, the `tflite` extra), behind `ModelSession`.

Quantized outputs (a quantized classifier's uint8 scores) are served dequantized.

The interpreter is not thread-safe; the scheduler only ever runs one batch per lane at a
time, and a lock guards the resize-then-invoke sequence anyway. TFLite models usually
have a fixed batch dimension, so batches are resized on demand (cheap when the size
repeats, which dynamic batching makes common).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.runtime._backend import TensorInfo, packed_info
from edgewise.runtime._errors import ModelLoadError

__all__ = ["TfliteSession", "open_tflite", "tflite_available"]


def tflite_available() -> bool:
    """Whether the `ai-edge-litert` interpreter is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class TfliteSession:
    """A LiteRT interpreter exposing the `ModelSession` interface."""

    backend = "tflite"
    provider = "CPUExecutionProvider"
    fixed_batch: int | None = None  # the input is resized to each batch

    def __init__(self, interpreter: Any) -> None:
        self._it = interpreter
        self._lock = threading.Lock()
        infos = []
        self._ins: list[tuple[int, str]] = []
        self._shapes: dict[int, tuple[int, ...]] = {}
        for d in interpreter.get_input_details():
            shape = tuple(int(v) for v in d.get("shape_signature", d["shape"]))
            name = str(d["name"])
            infos.append(
                TensorInfo(
                    name, np.dtype(d["dtype"]), (None, *(v if v > 0 else None for v in shape[1:]))
                )
            )
            self._ins.append((int(d["index"]), name))
            self._shapes[int(d["index"])] = tuple(int(v) for v in d["shape"])
        self.inputs: tuple[TensorInfo, ...] = tuple(infos)
        # Several inputs come packed, a field per input (see `packed_info`).
        self.input = infos[0] if len(infos) == 1 else packed_info(infos, None)
        self._several = len(infos) > 1
        # A quantized output (an integer tensor with a scale: a quantized classifier's
        # uint8 scores) is served dequantized, `(q - zero_point) * scale` as float32, so
        # its scores are probabilities the runtime reads for labels and confidences.
        self._outs: list[tuple[str, int, float, int]] = []
        infos_out = []
        for o in interpreter.get_output_details():
            dtype = np.dtype(o["dtype"])
            scale, zero = o.get("quantization", (0.0, 0))
            if dtype.kind not in "iu" or not scale:
                scale = 0.0
            else:
                dtype = np.dtype(np.float32)
            self._outs.append((str(o["name"]), int(o["index"]), float(scale), int(zero)))
            infos_out.append(
                TensorInfo(str(o["name"]), dtype, (None, *(int(d) for d in o["shape"][1:])))
            )
        self.outputs = tuple(infos_out)

    def run(self, x: npt.NDArray[np.generic]) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch, resizing an input when its shape changes.

        The batch changes its shape, and so does a free inner dimension.
        """
        feeds = (
            [(i, x[name]) for i, name in self._ins]  # type: ignore[call-overload]
            if self._several
            else [(self._ins[0][0], x)]
        )
        it = self._it
        with self._lock:
            resized = False
            for i, a in feeds:
                if a.shape != self._shapes[i]:
                    it.resize_tensor_input(i, list(a.shape), strict=False)
                    self._shapes[i] = a.shape
                    resized = True
            if resized:
                it.allocate_tensors()
            for i, a in feeds:
                it.set_tensor(i, np.ascontiguousarray(a))
            it.invoke()
            out = {}
            for name, index, scale, zero in self._outs:
                value = it.get_tensor(index)
                if scale:
                    out[name] = (value.astype(np.float32) - np.float32(zero)) * np.float32(scale)
                else:
                    out[name] = np.array(value)
            return out


def open_tflite(model: bytes | str | os.PathLike[str], *, cores: int) -> TfliteSession:
    """Create a LiteRT interpreter with `cores` threads.

    Raises:
        ModelLoadError: the extra is not installed or the model cannot be loaded.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModelLoadError(
            "TFLite models need the 'tflite' extra: pip install 'edgewise[tflite]'"
        ) from exc
    try:
        if isinstance(model, bytes):
            it = Interpreter(model_content=model, num_threads=max(1, cores))
        else:
            it = Interpreter(model_path=str(Path(model)), num_threads=max(1, cores))
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"LiteRT cannot load the model: {exc}") from exc
    return TfliteSession(it)
