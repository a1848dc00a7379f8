"""Loaded models: what a pipeline runs, whatever the backend and wherever it came from.

A model comes either as raw ONNX bytes / a file path (early tests, tools), or as an
unpacked bundle directory plus its manifest. The manifest is read through
`ModelInfo.from_manifest`, which accepts the bundle's pydantic `Manifest` or its plain
JSON dict, so the runtime does not depend on the manifest's Python class.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from edgewise.runtime._backend import ModelSession, TensorInfo
from edgewise.runtime._errors import BadInput, ModelLoadError

__all__ = [
    "HealthResult",
    "HealthSample",
    "Input",
    "InputCheck",
    "LoadedModel",
    "ModelInfo",
    "fit_tensor",
    "health_check",
    "input_mismatch",
    "output_mismatch",
]

#: A request: one array, or a model's inputs by name (a mapping of arrays).
Input = npt.NDArray[Any] | Mapping[str, Any]

_CONFIDENCE_NAMES = ("probabilities", "probs", "scores", "softmax", "output_probability")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _plain(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


@dataclass(frozen=True)
class HealthSample:
    """One install-gate sample: an input (or inputs by name) and its expected outputs."""

    input: Input
    expected: dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model, backend-neutral."""

    name: str
    version: str = "0"
    format: str = "onnx"
    labels: tuple[str, ...] = ()
    preprocess: dict[str, Any] = field(default_factory=dict)
    health_samples: tuple[HealthSample, ...] = ()
    health_atol: float = 1e-4
    health_max_latency_ms: float = 1000.0
    model_file: str | None = None
    # The inputs and outputs the manifest declares: (name, dtype, shape with None for a
    # named dimension); checked against the model's own at load (`input_mismatch`).
    inputs: tuple[tuple[str, str, tuple[int | None, ...]], ...] = ()
    outputs: tuple[tuple[str, str, tuple[int | None, ...]], ...] = ()

    @property
    def key(self) -> str:
        """`name@version`."""
        return f"{self.name}@{self.version}"

    @classmethod
    def from_manifest(cls, manifest: Any) -> ModelInfo:
        """Read a bundle manifest (pydantic model or dict)."""
        m = _plain(manifest)
        labels = tuple(str(x) for x in (_get(m, "labels") or ()))
        model_file = _get(m, "model") if isinstance(_get(m, "model"), str) else None
        files = _get(m, "files") or []
        for f in [] if model_file else (files if isinstance(files, list) else list(files)):
            path = f if isinstance(f, str) else (_get(f, "path") or _get(f, "name"))
            if path and str(path).endswith((".onnx", ".tflite")):
                model_file = str(path)
                break
        health = _get(m, "health") or {}
        samples = []
        for s in _get(health, "samples") or []:
            raw_in = _get(s, "input")
            if raw_in is None:
                raw_in = _get(s, "inputs")
            sample_in: Input = (
                {str(k): _sample_input(_row(v)) for k, v in raw_in.items()}
                if isinstance(raw_in, Mapping)
                else _sample_input(_row(raw_in))
            )
            expected = _get(s, "expected") or _get(s, "outputs") or {}
            if not isinstance(expected, Mapping):
                expected = {"probabilities": expected}
            samples.append(
                HealthSample(
                    sample_in,
                    {str(k): np.asarray(v) for k, v in expected.items()},
                )
            )
        return cls(
            name=str(_get(m, "name") or "model"),
            version=str(_get(m, "version") or "0"),
            format=str(_get(m, "format") or "onnx"),
            labels=labels,
            preprocess=dict(_get(m, "preprocess") or {}),
            health_samples=tuple(samples),
            health_atol=float(_get(health, "tolerance") or _get(health, "atol") or 1e-4),
            health_max_latency_ms=float(_get(health, "max_latency_ms") or 1000.0),
            model_file=model_file,
            inputs=_declared(_get(m, "inputs")),
            outputs=_declared(_get(m, "outputs")),
        )

    def model_path(self, directory: Path) -> Path:
        """The model file inside an unpacked bundle directory."""
        if self.model_file is not None:
            return directory / self.model_file
        found = sorted(directory.glob("*.onnx")) + sorted(directory.glob("*.tflite"))
        if not found:
            raise ModelLoadError(f"no model file in {directory}")
        return found[0]


def input_mismatch(
    declared: Sequence[tuple[str, str, tuple[int | None, ...]]], actual: Sequence[TensorInfo]
) -> str | None:
    """How a manifest's declared inputs differ from the model's own, or None.

    The names must be the model's inputs, all of them; dtypes and ranks must agree, and
    so must a dimension both give a size (a named dimension in the manifest, such as
    "N", stands for any size). Nothing declared: nothing to check.
    """
    if not declared:
        return None
    names = [d[0] for d in declared]
    have = [i.name for i in actual]
    if sorted(names) != sorted(have):
        return (
            f"the manifest declares inputs {', '.join(map(repr, names))}; "
            f"the model's are {', '.join(map(repr, have))}"
        )
    return _tensors_differ("input", declared, actual)


def output_mismatch(
    declared: Sequence[tuple[str, str, tuple[int | None, ...]]], actual: Sequence[TensorInfo]
) -> str | None:
    """How a manifest's declared outputs differ from the model's own, or None.

    As `input_mismatch`, except that the manifest may leave outputs out.
    """
    have = [o.name for o in actual]
    unknown = [d[0] for d in declared if d[0] not in have]
    if unknown:
        return (
            f"the manifest declares outputs {', '.join(map(repr, unknown))} the model does "
            f"not have (its outputs are {', '.join(map(repr, have))})"
        )
    return _tensors_differ("output", declared, actual)


def _tensors_differ(
    kind: str,
    declared: Sequence[tuple[str, str, tuple[int | None, ...]]],
    actual: Sequence[TensorInfo],
) -> str | None:
    have = {i.name: i for i in actual}
    for name, dtype, shape in declared:
        got = have[name]
        # Strings come out of onnxruntime as Python objects.
        theirs = "string" if got.dtype.kind == "O" else str(got.dtype)
        if dtype != theirs:
            return f"{kind} {name!r} is {theirs} in the model, {dtype} in the manifest"
        if len(shape) != len(got.shape):
            return (
                f"{kind} {name!r} has {len(got.shape)} dimensions in the model, "
                f"{len(shape)} in the manifest"
            )
        for k, (want, size) in enumerate(zip(shape, got.shape, strict=True)):
            if want is not None and size is not None and want != size:
                return (
                    f"{kind} {name!r} dimension {k} is {size} in the model, {want} in the manifest"
                )
    return None


def _declared(tensors: Any) -> tuple[tuple[str, str, tuple[int | None, ...]], ...]:
    """A manifest's tensor list as (name, dtype, shape), a named dimension as None."""
    return tuple(
        (
            str(_get(t, "name")),
            str(_get(t, "dtype")),
            tuple(d if isinstance(d, int) else None for d in _get(t, "shape") or ()),
        )
        for t in tensors or ()
    )


def _row(raw: Any) -> Any:
    """A flat list of numbers is one unbatched row."""
    if isinstance(raw, list) and raw and not isinstance(raw[0], list):
        return [raw]
    return raw


def _sample_input(raw: Any) -> npt.NDArray[Any]:
    """A health sample's input, its numbers as they are.

    Integers stay integers, so a model with an integer input (uint8 pixels) takes them;
    `validate` casts them as for a request (to float32 for a float model).
    """
    arr = np.asarray(raw)
    return arr if arr.dtype.kind in "iuf" else np.asarray(raw, dtype=np.float32)


@functools.cache
def castable(got: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """JSON numbers decode as int64/float64; cast them when the kinds are compatible.

    Integers may go to an unsigned input too (an image model's uint8 pixels, sent as
    JSON): `cast_fitting` then refuses any value that does not fit.
    """
    if got.kind not in "iuf":
        return False
    return bool(np.can_cast(got, want, "same_kind")) or (got.kind in "iu" and want.kind == "u")


def cast_fitting(x: npt.NDArray[Any], want: np.dtype[Any]) -> npt.NDArray[Any]:
    """`x` cast to `want` (a cast `castable` allows), refusing values that do not fit.

    Without the check the model would see other numbers than the caller sent: a float64
    beyond float32's range becomes inf, an integer beyond int8's wraps around. Rounding
    to the nearest float32 is not a change of value here.

    Raises:
        BadInput: a value is out of the range of `want`.
    """
    if want.kind == "f":
        try:
            with np.errstate(over="raise"):  # an infinity the caller did not send
                return x.astype(want)
        except FloatingPointError:
            raise BadInput(f"a value is out of the range of the model's {want} input") from None
    if x.dtype.kind in "iu" and x.size and not np.can_cast(x.dtype, want, "safe"):
        info = np.iinfo(want)
        if x.min() < info.min or x.max() > info.max:
            raise BadInput(
                f"a value is out of the range of the model's {want} input "
                f"({info.min} to {info.max})"
            )
    return x.astype(want)


def _nothing(_shape: tuple[int, ...]) -> None:
    """The pick of a model input whose inner dimensions are all free."""
    return None


class InputCheck(NamedTuple):
    """One model input as `fit_tensor` checks a request for it, in C calls only.

    A batched array of the right rank fits when `pick(x.shape) == want`: `pick` takes the
    inner dimensions the input fixes (free ones, such as an image width, are not picked).
    """

    spec: TensorInfo
    rank: int
    pick: Callable[[tuple[int, ...]], Any]
    want: Any

    @classmethod
    def of(cls, spec: TensorInfo) -> InputCheck:
        """The check of `spec`."""
        known = [(i + 1, d) for i, d in enumerate(spec.shape[1:]) if d is not None]
        if not known:
            return cls(spec, len(spec.shape), _nothing, None)
        # itemgetter of one index gives the item, of several a tuple
        want = known[0][1] if len(known) == 1 else tuple(d for _, d in known)
        return cls(spec, len(spec.shape), operator.itemgetter(*(i for i, _ in known)), want)


@dataclass(frozen=True)
class LoadedModel:
    """A ready (created and warmed) session plus what the runtime knows about it."""

    info: ModelInfo
    session: ModelSession
    confidence_output: str | None
    # The outputs without one entry per input row (see `unaligned_outputs`). A detector's
    # boxes after NMS ([detections, 6] for the whole call) cannot be split among the
    # requests of a batch: such a model serves one request per call, and such an output
    # is never taken for per-row scores.
    unaligned: frozenset[str] = frozenset()
    _fixed: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    _several: bool = field(init=False, repr=False, compare=False, default=False)
    # A check per input (see `fit_tensor`), and with several inputs the packed dtypes
    # made so far, by the inputs' inner shapes.
    _checks: tuple[InputCheck, ...] = field(init=False, repr=False, compare=False, default=())
    _packed: dict[tuple[tuple[int, ...], ...], np.dtype[np.void]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        # A shape with free inner dimensions never takes submit_group's stacking path.
        fixed = self.session.input.shape[1:]
        marker = (-1,) if None in fixed else tuple(d for d in fixed if d is not None)
        object.__setattr__(self, "_fixed", marker)
        inputs = self.session.inputs
        object.__setattr__(self, "_several", len(inputs) > 1)
        object.__setattr__(self, "_checks", tuple(InputCheck.of(i) for i in inputs))

    @property
    def key(self) -> str:
        """`name@version`."""
        return self.info.key

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        """The input shape after the batch axis; `(-1,)` when a dimension is free."""
        return self._fixed

    @property
    def input_ndim(self) -> int:
        """Rank of the model input, batch axis included."""
        return len(self.session.input.shape)

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on."""
        return self.session.provider

    @property
    def rows_aligned(self) -> bool:
        """Whether every output has one entry per input row (requests can share a call)."""
        return not self.unaligned

    @staticmethod
    def confidence_output_of(
        session: ModelSession, labels: Sequence[str], unaligned: frozenset[str] = frozenset()
    ) -> str | None:
        """Pick the float output holding per-class scores, if any (one row per input)."""
        floats = [o for o in session.outputs if o.dtype.kind == "f" and o.name not in unaligned]
        for o in floats:
            if o.name in _CONFIDENCE_NAMES:
                return o.name
        for o in floats:
            if labels and o.shape and o.shape[-1] == len(labels):
                return o.name
        return floats[0].name if floats else None

    def validate(self, x: Input, exact_dtype: bool = False) -> npt.NDArray[np.generic]:
        """Check one request (with or without its batch axis) and return it batched.

        A model with several inputs takes them by name (a mapping of arrays, or a packed
        array) and gets them packed (see `pack`).

        Args:
            x: the request tensor, or the model's inputs by name.
            exact_dtype: raw tensors must carry the model's dtype; decoded JSON numbers
                (int64/float64) are cast when the kinds are compatible.

        Raises:
            BadInput: wrong dtype or shape, or inputs missing or unknown by name.
        """
        if self._several:
            return self.pack(x, exact_dtype)
        if type(x) is not np.ndarray:
            x = self.unwrap(x)
        return fit_tensor(x, self._checks[0], exact_dtype)

    @property
    def several_inputs(self) -> bool:
        """Whether the model has more than one input (requests name them)."""
        return self._several

    @property
    def ragged(self) -> bool:
        """Whether an input has a free inner dimension (an image size, a sequence length).

        Requests of different shapes then run as separate model calls.
        """
        return any(None in i.shape[1:] for i in self.session.inputs)

    def unwrap(self, x: Input) -> npt.NDArray[Any]:
        """A one-input model's request as an array: sent by the input's name, or as is.

        Raises:
            BadInput: a mapping that does not hold exactly the model's input.
        """
        if isinstance(x, Mapping):
            name = self.session.input.name
            if set(x) != {name}:
                raise BadInput(
                    f"the model has one input, {name!r}; got inputs {sorted(map(str, x))}"
                )
            x = x[name]
        return x if isinstance(x, np.ndarray) else np.asarray(x)

    def pack(self, x: Input, exact_dtype: bool = False) -> npt.NDArray[np.void]:
        """A several-input model's request, checked input by input, packed.

        The packed form is one structured array: a field per input, one element per row.
        Rows stack and slice as for any request; the backend feeds each field to its
        input.

        Raises:
            BadInput: an input missing or unknown, of the wrong dtype or shape, or inputs
                with different numbers of rows.
        """
        if type(x) is not dict:
            if isinstance(x, np.ndarray) and x.dtype.names is not None:
                x = {n: x[n] for n in x.dtype.names}  # packed already: checked again all the same
            elif not isinstance(x, Mapping):
                names = [i.name for i in self.session.inputs]
                listed = ", ".join(repr(n) for n in names)
                raise BadInput(
                    f"the model has {len(names)} inputs ({listed}): send them by name, "
                    '{"inputs": {"' + names[0] + '": [...], ...}}'
                )
        checks = self._checks
        if len(x) != len(checks):
            raise BadInput(self._naming_mistake(x))
        arrays: list[npt.NDArray[Any]] = []
        for check in checks:
            name = check.spec.name
            a = x.get(name)
            if a is None:
                raise BadInput(self._naming_mistake(x))
            a = fit_tensor(a if type(a) is np.ndarray else np.asarray(a), check, exact_dtype, True)
            if arrays and len(a) != len(arrays[0]):
                raise BadInput(
                    f"input {name!r} has {len(a)} rows and {checks[0].spec.name!r} "
                    f"{len(arrays[0])}: every input needs one entry per row"
                )
            arrays.append(a)
        inner = tuple(a.shape[1:] for a in arrays)
        dtype = self._packed.get(inner)
        if dtype is None:
            if len(self._packed) >= 256:  # sequence lengths without end: keep a few
                self._packed.clear()
            fields = [(c.spec.name, c.spec.dtype, s) for c, s in zip(checks, inner, strict=True)]
            dtype = self._packed[inner] = np.dtype(fields)
        out = np.empty(len(arrays[0]), dtype=dtype)
        for c, a in zip(checks, arrays, strict=True):
            out[c.spec.name] = a
        return out

    def _naming_mistake(self, x: Mapping[str, Any]) -> str:
        """What is wrong with the names of a several-input model's request."""
        names = [i.name for i in self.session.inputs]
        missing = [n for n in names if n not in x]
        unknown = sorted(str(k) for k in x if k not in names)
        said = [f"missing {', '.join(map(repr, missing))}"] if missing else []
        said += [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
        return f"the model's inputs are {', '.join(map(repr, names))}: {'; '.join(said)}"


def fit_tensor(
    x: npt.NDArray[Any], check: InputCheck, exact_dtype: bool = False, named: bool = False
) -> npt.NDArray[Any]:
    """`x` checked against one model input, cast as `castable` allows, and batched.

    Every request's path: a batch of the input's dtype and shape passes on a few C calls.

    Args:
        x: one input's array, with or without its batch axis.
        check: the model input it is for.
        exact_dtype: refuse another dtype rather than cast (raw tensors).
        named: the model has several inputs: a message names the input.

    Raises:
        BadInput: wrong dtype or shape, or no rows.
    """
    spec, rank, pick, want = check
    try:
        if x.dtype != spec.dtype:
            if exact_dtype or not castable(x.dtype, spec.dtype):
                raise BadInput(f"dtype {x.dtype} does not match the model input {spec.dtype}")
            x = cast_fitting(x, spec.dtype)
        if x.ndim == rank - 1:
            x = x[np.newaxis]
        if not rank or x.ndim != rank or pick(x.shape) != want:
            want_s = "x".join("N" if d is None else str(d) for d in spec.shape)
            raise BadInput(f"shape {list(x.shape)} does not match the model input {want_s}")
        if not len(x):
            raise BadInput("empty batch")
    except BadInput as exc:
        if named:
            raise BadInput(f"input {spec.name!r}: {exc}") from None
        raise
    return x


@dataclass(frozen=True)
class HealthResult:
    """Outcome of running a model's health samples (the install gate)."""

    ok: bool
    reason: str
    passed: int
    total: int
    max_latency_ms: float


def _matches(got: npt.NDArray[Any], want: npt.NDArray[Any], atol: float) -> bool:
    """Whether a health sample's output is what the manifest expects (both flat).

    Integers and booleans must be equal; floats within `atol`; anything else (a
    classifier's labels, which onnxruntime gives as Python strings) equal as text.
    """
    if want.dtype.kind in "iub":
        return bool(np.array_equal(got, want))
    if want.dtype.kind == "f" and got.dtype.kind in "biuf":
        return bool(np.allclose(got, want, atol=atol))
    return [str(v) for v in got.tolist()] == [str(v) for v in want.tolist()]


#: Runs of a health sample, at most, before its latency counts as over the bound.
HEALTH_LATENCY_TRIES = 3


def health_check(
    model: LoadedModel,
    info: ModelInfo | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> HealthResult:
    """Run each health sample alone; outputs within tolerance, latency within bound."""
    info = info or model.info
    samples = info.health_samples
    if not samples:
        return HealthResult(True, "no health samples", 0, 0, 0.0)
    bound = info.health_max_latency_ms
    passed, worst = 0, 0.0
    for i, sample in enumerate(samples):
        given = sample.input
        if isinstance(given, Mapping) and len(given) == 1 and not model.several_inputs:
            given = next(iter(given.values()))  # a one-input model's, whatever its name
        try:
            x = model.validate(given)
        except BadInput as exc:
            reason = f"health check failed: sample {i + 1} does not fit the model: {exc}"
            return HealthResult(False, reason, passed, len(samples), worst)
        t0 = clock()
        try:
            out = model.session.run(x)
        except Exception as exc:  # the backend's own errors: the gate fails, not the caller
            reason = f"health check failed: the model fails on sample {i + 1}: {exc}"
            return HealthResult(False, reason, passed, len(samples), worst)
        took = (clock() - t0) * 1000.0
        # One slow run is as often the device's scheduler as the model (a busy CPU, a
        # first call that allocates): a sample over the bound is its best of a few runs,
        # so a model that is really slow still fails and a preempted one does not.
        for _ in range(HEALTH_LATENCY_TRIES - 1):
            if took <= bound:
                break
            t0 = clock()
            model.session.run(x)
            took = min(took, (clock() - t0) * 1000.0)
        worst = max(worst, took)
        good = True
        for name, want in sample.expected.items():
            got = out.get(name)
            if got is None:
                reason = (
                    f"health check failed: sample {i + 1} expects an output {name!r}; the "
                    f"model's outputs are {', '.join(map(repr, out))}"
                )
                return HealthResult(False, reason, passed, len(samples), worst)
            if np.asarray(got).reshape(-1).size != want.reshape(-1).size:
                reason = (
                    f"health check failed: sample {i + 1} expects {want.size} values of "
                    f"{name!r}; the model gave {np.asarray(got).size}"
                )
                return HealthResult(False, reason, passed, len(samples), worst)
            good = good and _matches(
                np.asarray(got).reshape(-1), want.reshape(-1), info.health_atol
            )
        passed += good
    total = len(samples)
    if passed < total:
        reason = f"health check failed: {total - passed}/{total} outputs out of tolerance"
        return HealthResult(False, reason, passed, total, worst)
    if worst > bound:
        reason = (
            f"health check failed: latency {worst:.1f} ms over the {bound:g} ms bound "
            f"(best of {HEALTH_LATENCY_TRIES} runs)"
        )
        return HealthResult(False, reason, passed, total, worst)
    return HealthResult(True, f"{passed}/{total} samples within tolerance", passed, total, worst)
