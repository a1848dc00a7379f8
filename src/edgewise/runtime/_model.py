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
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.runtime._backend import ModelSession
from edgewise.runtime._errors import BadInput, ModelLoadError

__all__ = ["HealthResult", "HealthSample", "LoadedModel", "ModelInfo", "health_check"]

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
    """One install-gate sample: an input and the outputs it must produce."""

    input: npt.NDArray[np.generic]
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
            if isinstance(raw_in, Mapping):
                raw_in = next(iter(raw_in.values()))
            if isinstance(raw_in, list) and raw_in and not isinstance(raw_in[0], list):
                raw_in = [raw_in]  # one unbatched row
            expected = _get(s, "expected") or _get(s, "outputs") or {}
            if not isinstance(expected, Mapping):
                expected = {"probabilities": expected}
            samples.append(
                HealthSample(
                    _sample_input(raw_in),
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
        )

    def model_path(self, directory: Path) -> Path:
        """The model file inside an unpacked bundle directory."""
        if self.model_file is not None:
            return directory / self.model_file
        found = sorted(directory.glob("*.onnx")) + sorted(directory.glob("*.tflite"))
        if not found:
            raise ModelLoadError(f"no model file in {directory}")
        return found[0]


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


@dataclass(frozen=True)
class LoadedModel:
    """A ready (created and warmed) session plus what the runtime knows about it."""

    info: ModelInfo
    session: ModelSession
    confidence_output: str | None
    _fixed: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    # validate()'s check of a batched input, in C calls only: `_pick(x.shape) == _want`
    # compares the inner dimensions the model fixes (free ones, such as an image width,
    # are not picked).
    _pick: Callable[[tuple[int, ...]], Any] = field(init=False, repr=False, compare=False)
    _want: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # A shape with free inner dimensions never takes submit_group's stacking path.
        fixed = self.session.input.shape[1:]
        marker = (-1,) if None in fixed else tuple(d for d in fixed if d is not None)
        object.__setattr__(self, "_fixed", marker)
        known = [(i + 1, d) for i, d in enumerate(fixed) if d is not None]
        pick: Callable[[tuple[int, ...]], Any] = _nothing
        want: Any = None
        if known:  # itemgetter of one index gives the item, of several a tuple
            pick = operator.itemgetter(*(i for i, _ in known))
            want = known[0][1] if len(known) == 1 else tuple(d for _, d in known)
        object.__setattr__(self, "_pick", pick)
        object.__setattr__(self, "_want", want)

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

    @staticmethod
    def confidence_output_of(session: ModelSession, labels: Sequence[str]) -> str | None:
        """Pick the float output holding per-class scores, if any."""
        floats = [o for o in session.outputs if o.dtype.kind == "f"]
        for o in floats:
            if o.name in _CONFIDENCE_NAMES:
                return o.name
        for o in floats:
            if labels and o.shape and o.shape[-1] == len(labels):
                return o.name
        return floats[0].name if floats else None

    def validate(
        self, x: npt.NDArray[np.generic], exact_dtype: bool = False
    ) -> npt.NDArray[np.generic]:
        """Check one request (with or without its batch axis) and return it batched.

        Args:
            x: the request tensor.
            exact_dtype: raw tensors must carry the model's dtype; decoded JSON numbers
                (int64/float64) are cast when the kinds are compatible.

        Raises:
            BadInput: wrong dtype or shape.
        """
        spec = self.session.input
        if x.dtype != spec.dtype:
            if exact_dtype or not castable(x.dtype, spec.dtype):
                raise BadInput(f"dtype {x.dtype} does not match the model input {spec.dtype}")
            x = cast_fitting(x, spec.dtype)
        if x.ndim == len(spec.shape) and len(x) and self._pick(x.shape) == self._want:
            return x  # the common case: already batched
        fixed = spec.shape[1:]
        if x.ndim == len(fixed):
            x = x[np.newaxis]
        if x.ndim != len(spec.shape) or any(
            want is not None and got != want for got, want in zip(x.shape[1:], fixed, strict=True)
        ):
            want_s = "x".join("N" if d is None else str(d) for d in spec.shape)
            raise BadInput(f"shape {list(x.shape)} does not match the model input {want_s}")
        if x.shape[0] == 0:
            raise BadInput("empty batch")
        return x


@dataclass(frozen=True)
class HealthResult:
    """Outcome of running a model's health samples (the install gate)."""

    ok: bool
    reason: str
    passed: int
    total: int
    max_latency_ms: float


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
        try:
            x = model.validate(sample.input)
        except BadInput as exc:
            reason = f"health check failed: sample {i + 1} does not fit the model: {exc}"
            return HealthResult(False, reason, passed, len(samples), worst)
        t0 = clock()
        out = model.session.run(x)
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
            if got is None or np.asarray(got).reshape(-1).size != want.reshape(-1).size:
                good = False
            elif want.dtype.kind in "iub":
                good = good and bool(np.array_equal(np.asarray(got).reshape(-1), want.reshape(-1)))
            else:
                good = good and bool(
                    np.allclose(
                        np.asarray(got).reshape(-1), want.reshape(-1), atol=info.health_atol
                    )
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
