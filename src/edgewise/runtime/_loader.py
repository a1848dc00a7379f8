"""Model loading: bytes, a model file, or an unpacked bundle directory, on either backend."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.runtime._backend import DEFAULT_PROVIDERS, ModelSession, open_onnx
from edgewise.runtime._errors import AcceleratorUnavailable, ModelLoadError
from edgewise.runtime._model import LoadedModel, ModelInfo, input_mismatch, output_mismatch

__all__ = ["ModelSource", "load_model", "unaligned_outputs"]

ModelSource = bytes | str | os.PathLike[str]


def load_model(
    source: ModelSource,
    manifest: Any = None,
    *,
    cores: int,
    preference: Sequence[str] = DEFAULT_PROVIDERS,
    require_accelerator: bool = False,
    allow_spinning: bool = True,
    warmup: int = 3,
) -> LoadedModel:
    """Create, check and warm a session; see `Runtime.load_model`.

    Raises:
        ModelLoadError: unreadable model, or AcceleratorUnavailable.
    """
    info = ModelInfo.from_manifest(manifest) if manifest is not None else None
    path: Path | None = None
    if not isinstance(source, bytes):
        path = Path(source)
        if path.is_dir():
            if info is None:
                mf = path / "manifest.json"
                if not mf.is_file():
                    raise ModelLoadError(f"{path} has no manifest.json")
                info = ModelInfo.from_manifest(json.loads(mf.read_text()))
            path = info.model_path(path)
        if not path.is_file():
            raise ModelLoadError(f"no model file at {path}")
    if info is None:
        stem = path.stem if path is not None else "model"
        info = ModelInfo(
            name=stem, format="tflite" if path and path.suffix == ".tflite" else "onnx"
        )
    target: bytes | Path = path if path is not None else bytes(source)  # type: ignore[arg-type]
    session = _open(target, info, cores, preference, require_accelerator, allow_spinning)
    # A bundle whose manifest describes other inputs or outputs than its model has:
    # every app and health sample written against the manifest would fail on it.
    # Refused here, at the install gate, not request by request.
    wrong = input_mismatch(info.inputs, session.inputs) or output_mismatch(
        info.outputs, session.outputs
    )
    if wrong is not None:
        raise ModelLoadError(f"the manifest does not describe the model: {wrong}")
    shape = tuple(d if d is not None else 1 for d in session.input.shape)
    zeros = np.zeros(shape, dtype=session.input.dtype)
    try:
        for _ in range(max(1, warmup)):  # one run at least: its outputs are checked below
            out = session.run(zeros)
    except Exception as exc:  # the backend's own error types; the model is unusable
        raise ModelLoadError(
            f"the model fails on an input of zeros of its own shape {list(shape)} and dtype "
            f"{session.input.dtype}: {exc}"
        ) from exc
    unaligned = unaligned_outputs(session, zeros, out)
    named = getattr(session, "class_labels", None)
    if named and not info.labels:  # a scikit-learn classifier's classes, from its ZipMap
        info = dataclasses.replace(info, labels=named)
    conf = LoadedModel.confidence_output_of(session, info.labels, unaligned)
    return LoadedModel(info, session, conf, unaligned=unaligned)


def _rows(value: Any) -> int | None:
    """The first dimension of an output (None for a scalar)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    try:
        return len(value)
    except TypeError:
        return None


def unaligned_outputs(
    session: ModelSession, one: np.ndarray[Any, Any], out: dict[str, Any]
) -> frozenset[str]:
    """The outputs that do not have one entry per input row.

    Checked on the warm-up input, and on twice its rows where the model takes any batch.
    Such an output (a detector's boxes after NMS, a summary of the whole call) cannot be
    split among the requests of a batch, and no output of a model that fails on two rows
    can.
    """
    n = one.shape[0]
    wrong = {name for name, v in out.items() if _rows(v) != n}
    if session.fixed_batch is not None:
        return frozenset(wrong)  # it never runs on more rows per call than the warm-up had
    try:
        two = session.run(np.concatenate([one, one]))
    except Exception:  # works on one row only: serve one request per call
        return frozenset(out)
    return frozenset(wrong | {name for name, v in two.items() if _rows(v) != 2 * n})


def _open(
    source: bytes | Path,
    info: ModelInfo,
    cores: int,
    preference: Sequence[str],
    require: bool,
    allow_spinning: bool,
) -> ModelSession:
    if isinstance(source, Path):
        fmt = source.suffix.lstrip(".")
    else:  # a TFLite flatbuffer carries its file identifier at bytes 4..8
        fmt = "tflite" if source[4:8] == b"TFL3" else info.format
    if fmt == "tflite":
        from edgewise.runtime._tflite import open_tflite

        if require:
            raise AcceleratorUnavailable("the TFLite backend here runs on CPU only")
        return open_tflite(source, cores=cores)
    return open_onnx(
        source,
        cores=cores,
        preference=preference,
        require_accelerator=require,
        allow_spinning=allow_spinning,
    )
