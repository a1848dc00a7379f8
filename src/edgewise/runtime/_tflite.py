"""The TFLite backend (`ai-edge-litert`, the `tflite` extra), behind `ModelSession`.

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

from edgewise.runtime._backend import TensorInfo
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
        details = interpreter.get_input_details()
        if len(details) != 1:
            names = ", ".join(repr(str(d["name"])) for d in details)
            raise ModelLoadError(
                f"the TFLite model has {len(details)} inputs ({names}); the TFLite backend "
                "feeds one (models with several inputs run on onnxruntime)"
            )
        inp = details[0]
        self._in_index = int(inp["index"])
        shape = tuple(int(d) for d in inp.get("shape_signature", inp["shape"]))
        self.input = TensorInfo(
            str(inp["name"]),
            np.dtype(inp["dtype"]),
            (None, *(d if d > 0 else None for d in shape[1:])),
        )
        self.inputs: tuple[TensorInfo, ...] = (self.input,)
        self._outs = interpreter.get_output_details()
        self.outputs = tuple(
            TensorInfo(
                str(o["name"]), np.dtype(o["dtype"]), (None, *(int(d) for d in o["shape"][1:]))
            )
            for o in self._outs
        )
        self._shape = tuple(int(d) for d in inp["shape"])

    def run(self, x: npt.NDArray[np.generic]) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch, resizing the input when its shape changes.

        The batch changes its shape, and so does a free inner dimension.
        """
        with self._lock:
            if x.shape != self._shape:
                self._it.resize_tensor_input(self._in_index, list(x.shape), strict=False)
                self._it.allocate_tensors()
                self._shape = x.shape
            self._it.set_tensor(self._in_index, np.ascontiguousarray(x))
            self._it.invoke()
            return {o["name"]: np.array(self._it.get_tensor(o["index"])) for o in self._outs}


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
