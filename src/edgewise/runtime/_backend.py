"""Inference backends behind one interface, and the onnxruntime one.

A backend turns model bytes into a `ModelSession`: input tensors in, named output
tensors out. A model with one input takes a plain array. A model with several inputs
(a detector's image and scale factor, a transformer's token ids and attention mask)
takes them packed into one structured array, one field per input (see
`LoadedModel.pack`): a packed request stacks, slices and indexes by rows like any
array, so the scheduler batches it as it batches any request; `run` feeds each field to
its input.

Execution providers are chosen from those the device has, in a preference order; after
the session exists we read back which provider it actually got, because onnxruntime
silently falls back to CPU when an accelerator provider fails to initialise.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgewise.runtime._errors import AcceleratorUnavailable, ModelLoadError

__all__ = [
    "DEFAULT_PROVIDERS",
    "ModelSession",
    "OnnxSession",
    "TensorInfo",
    "choose_providers",
    "open_onnx",
    "packed_info",
    "rejected_input",
]

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    CPU,
)

#: Providers that run none of a model's standard operators: Azure's (in onnxruntime's
#: default wheel, listed first by `get_available_providers`) only calls a cloud endpoint
#: for its own operators. A session that lists it first runs the model on the provider
#: after it, which is the one the model actually got (CPU, on a device without an
#: accelerator).
_RUNS_NO_MODEL = frozenset({"AzureExecutionProvider"})

_ORT_DTYPES: dict[str, np.dtype[np.generic]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}
INPUT_DTYPES = frozenset(_ORT_DTYPES.values())
# What no numpy array here can feed (strings, bfloat16, float8, complex...): as an output
# such a tensor is kept as onnxruntime returns it (strings come as objects).
_OTHER = np.dtype(object)
_SCORES = np.dtype(np.float32)


def _unzip(rows: Any) -> npt.NDArray[np.generic]:
    """A ZipMap output (one {class: probability} per row) as a [rows, classes] array."""
    if not rows:
        return np.zeros((0, 0), _SCORES)
    return np.array([list(row.values()) for row in rows], dtype=_SCORES)


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of a model input or output; None marks a free dimension."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int | None, ...]


def packed_info(inputs: Sequence[TensorInfo], batch: int | None) -> TensorInfo:
    """The one tensor a pipeline feeds a model with several inputs: a structured array.

    Its dtype has one field per input, each of the input's dtype and inner shape; a free
    inner dimension stands at 1 here (each request's own packing has its real size).
    """
    fields = [(i.name, i.dtype, tuple(d or 1 for d in i.shape[1:])) for i in inputs]
    return TensorInfo(",".join(i.name for i in inputs), np.dtype(fields), (batch,))


def _batch_of(inputs: Sequence[TensorInfo]) -> int | None:
    """The batch size the model fixes (None: any); its inputs share the first axis.

    Raises:
        ModelLoadError: an input without a batch axis, or inputs fixing other batches.
    """
    fixed = set()
    for i in inputs:
        if not i.shape:
            raise ModelLoadError(
                f"the model's input {i.name!r} is a scalar; a pipeline batches its inputs "
                "along their first axis"
            )
        if i.shape[0] is not None:
            fixed.add(i.shape[0])
    if len(fixed) > 1:
        raise ModelLoadError(
            f"the model's inputs fix different batch sizes ({sorted(fixed)}); a pipeline "
            "batches every input along one first axis"
        )
    return fixed.pop() if fixed else None


class ModelSession(Protocol):
    """What the scheduler needs from a backend session."""

    backend: str
    provider: str
    # Every model input. `input` is the one tensor a pipeline feeds: the model's input,
    # or with several inputs their packed form (`packed_info`).
    inputs: tuple[TensorInfo, ...]
    input: TensorInfo
    outputs: tuple[TensorInfo, ...]
    # Rows the model takes per call when it was exported with a fixed batch size (None:
    # any). `run` still takes any number of rows; the scheduler batches no further.
    fixed_batch: int | None

    def run(self, x: npt.NDArray[np.generic]) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch (first axis is the batch) and return every output by name.

        A model with several inputs takes them packed (see `packed_info`).
        """
        ...


def choose_providers(preference: Sequence[str], available: Sequence[str]) -> list[str]:
    """Providers to request, in preference order, restricted to those present.

    CPU is always appended last so that a session can exist at all; whether falling back
    to it is acceptable is decided after creation (see `open_onnx`).
    """
    chosen = [p for p in preference if p in available and p != CPU]
    return [*chosen, CPU]


def _dim(d: object) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


class OnnxSession:
    """An onnxruntime session with its input/output metadata resolved once."""

    backend = "onnxruntime"

    def __init__(self, session: object, provider: str) -> None:
        import onnxruntime as ort

        assert isinstance(session, ort.InferenceSession)
        self._session = session
        self.provider = provider
        infos = []
        for inp in session.get_inputs():
            dtype = _ORT_DTYPES.get(inp.type)
            if dtype is None:
                raise ModelLoadError(
                    f"the model's input {inp.name!r} is a {inp.type}, which a pipeline cannot "
                    f"feed (it feeds {', '.join(sorted(t.name for t in INPUT_DTYPES))})"
                )
            infos.append(TensorInfo(inp.name, dtype, tuple(map(_dim, inp.shape))))
        if not infos:
            raise ModelLoadError("the model has no inputs")
        self.inputs = tuple(infos)
        # An export without dynamic axes fixes the batch, usually at 1: such a model is
        # run in calls of that many rows (the last one padded), never on a larger batch.
        if len(infos) == 1:
            self.input = infos[0]
            self.fixed_batch: int | None = infos[0].shape[0] if infos[0].shape else None
        else:
            self.fixed_batch = _batch_of(infos)
            self.input = packed_info(infos, self.fixed_batch)
        # With several inputs, `run` feeds each field of the packed request by name.
        self._fields = tuple(i.name for i in infos) if len(infos) > 1 else ()
        outs = session.get_outputs()
        # scikit-learn classifiers exported with skl2onnx's defaults give their scores as a
        # ZipMap (a list of {class: probability} per row): served as a [rows, classes]
        # float array, so they are the scores, encodable as JSON, like any model's.
        self._zipmaps = tuple(o.name for o in outs if o.type.startswith("seq(map("))
        # The classes a ZipMap names (its keys, in score order), once a call has shown
        # them: the model's own labels, for a bundle that lists none.
        self.class_labels: tuple[str, ...] | None = None
        self.outputs = tuple(
            TensorInfo(o.name, _SCORES, (None, None))
            if o.name in self._zipmaps
            else TensorInfo(o.name, _ORT_DTYPES.get(o.type, _OTHER), tuple(map(_dim, o.shape)))
            for o in outs
        )
        self._names = [o.name for o in self.outputs]
        self._input_name = infos[0].name
        # The pybind session's run skips the Python wrapper's per-call input checks
        # (we validate once per request before queueing); fall back to the public one.
        inner = getattr(session, "_sess", None)
        self._run = inner.run if inner is not None and hasattr(inner, "run") else session.run
        self._opts = None if inner is None else ort.RunOptions()

    def run(self, x: npt.NDArray[np.generic]) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch."""
        fixed = self.fixed_batch
        if fixed is not None and x.shape[0] != fixed:
            return self._run_in_calls(x, fixed)
        if self._fields:  # a packed request: each field is one input, made contiguous
            feed = {name: np.ascontiguousarray(x[name]) for name in self._fields}  # type: ignore[call-overload]
        else:
            feed = {self._input_name: x}
        if self._opts is not None:
            values = self._run(self._names, feed, self._opts)
        else:
            values = self._run(self._names, feed)
        out = dict(zip(self._names, values, strict=False))  # a value per name asked for
        for name in self._zipmaps:
            rows = out[name]
            if self.class_labels is None and rows:
                self.class_labels = tuple(str(k) for k in rows[0])
            out[name] = _unzip(rows)
        return out

    def _run_in_calls(
        self, x: npt.NDArray[np.generic], size: int
    ) -> dict[str, npt.NDArray[np.generic]]:
        """`x` through a fixed-batch model, `size` rows a call; outputs joined, row-aligned."""
        n = x.shape[0]
        calls = []
        for start in range(0, n, size):
            chunk = x[start : start + size]
            if chunk.shape[0] < size:  # the last call: padded with zero rows, cut off after
                pad = np.zeros((size - chunk.shape[0], *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            calls.append(self.run(chunk))
        return {k: _join([c[k] for c in calls], size, n) for k in calls[0]}


def _join(parts: list[npt.NDArray[np.generic]], size: int, n: int) -> npt.NDArray[np.generic]:
    """One output of calls of `size` rows each, as one output of the first `n` rows."""
    if parts[0].shape[:1] == (size,):
        return np.concatenate(parts)[:n]
    # An output without the batch axis (a batch-1 export that squeezed it): one per call.
    return np.stack(parts)[:n]


def open_onnx(
    model: bytes | str | os.PathLike[str],
    *,
    cores: int,
    preference: Sequence[str] = DEFAULT_PROVIDERS,
    require_accelerator: bool = False,
    allow_spinning: bool = True,
) -> OnnxSession:
    """Create an onnxruntime session with threads set from `cores`.

    Raises:
        ModelLoadError: the bytes are not a model onnxruntime can load.
        AcceleratorUnavailable: `require_accelerator` and the session ended up on CPU.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, cores)
    # One model per session, executed sequentially: inter-op parallelism only adds
    # thread wake-ups for the small graphs edge pipelines run.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = choose_providers(preference, ort.get_available_providers())
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        session = ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated types here
        raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc
    actual = next(p for p in [*session.get_providers(), CPU] if p not in _RUNS_NO_MODEL)
    if require_accelerator and actual == CPU:
        raise AcceleratorUnavailable(
            f"an accelerator is required but the session runs on {actual} "
            f"(requested {', '.join(providers)})"
        )
    return OnnxSession(session, actual)


#: The longest reason `rejected_input` passes on: enough for an operator's complaint
#: (the op, the index and the range it wanted), not a wall of C++ source paths.
MAX_REASON = 300

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")
_ORT_NODE = re.compile(r"while running (\S+) node\. Name:'[^']*' Status Message: (.*)", re.S)


def rejected_input(exc: BaseException) -> str | None:
    """The reason when `exc` is onnxruntime refusing an input's values, else None.

    onnxruntime raises `InvalidArgument` when a kernel refuses what it was given (a
    Gather index past its table) or when an input does not fit the graph: the input's
    fault. `Fail`, `RuntimeException` and the rest can be a bug of the model or of
    onnxruntime (a Reshape the model got wrong raises `Fail`): not the caller's, so
    not answered here. The reason is onnxruntime's message trimmed to its first line
    and `MAX_REASON` characters: `Gather node: indices element out of data bounds, ...`.
    """
    # (Not imported here: an error onnxruntime raised means it is loaded already.)
    state = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    if state is None or not isinstance(exc, state.InvalidArgument):
        return None
    text = _ORT_PREFIX.sub("", str(exc).strip())
    node = _ORT_NODE.search(text)
    if node is not None:
        text = f"{node.group(1)} node: {node.group(2).strip()}"
    line = text.splitlines()[0] if text else "invalid argument"
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."
