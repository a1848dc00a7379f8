"""Stages by name: the registries and the built-in preprocess and postprocess steps.

A stage in a `PipelineSpec` is `{"type": NAME, "params": {...}}`. Each registry maps
NAME to a factory that takes the params once, when the pipeline starts, and returns the
callable that runs per request (preprocess) or per batch (postprocess), so that no
parameter parsing happens on the hot path. A built-in stage is registered with its
parameter model (`edgewise.protocol._stages`, the one the control plane checks deployments
with): its factory gets the validated model, not the raw mapping.

Preprocess runs in the caller's thread on one request; postprocess runs vectorised over a
whole batch on the scheduler's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from edgewise.protocol._stages import (
    BUILTIN_STAGE_PARAMS,
    NormalizeParams,
    ReshapeParams,
    ResizeParams,
    ScaleParams,
    ThresholdParams,
    TopkParams,
    TransposeParams,
    parse_stage_params,
)
from edgewise.runtime._errors import BadInput

__all__ = [
    "POSTPROCESS",
    "PREPROCESS",
    "SINKS",
    "SOURCES",
    "Post",
    "Registry",
]

Array = npt.NDArray[Any]
F = TypeVar("F")


class Registry(Generic[F]):
    """Factories by stage name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}
        self._typed: set[str] = set()  # names whose factory takes the parameter model

    def register(self, name: str, typed: bool = False) -> Callable[[F], F]:
        """Decorator: register `factory` under `name` (a later one replaces it).

        With `typed` (edgewise's built-in stages), the factory is given the stage's
        parameter model from `BUILTIN_STAGE_PARAMS`, validated, instead of the mapping.
        """
        if typed and (self.kind, name) not in BUILTIN_STAGE_PARAMS:
            raise ValueError(f"no parameter model for {self.kind} stage {name!r}")

        def deco(factory: F) -> F:
            self._factories[name] = factory
            if typed:
                self._typed.add(name)
            else:
                self._typed.discard(name)
            return factory

        return deco

    def get(self, name: str) -> F:
        """The factory for `name`; ValueError names the known ones."""
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise ValueError(f"unknown {self.kind} stage {name!r} (known: {known})") from None

    def build(self, name: str, params: Mapping[str, Any], *args: Any) -> Any:
        """The stage `name` made from its parameters (and the factory's other arguments).

        Parameters a built-in stage does not take are dropped (the agent logs them; the
        control plane refuses them at deploy time).

        Raises:
            ValueError: an unknown name, or parameters the stage cannot use; the message
                names the stage (and, for a built-in one, the parameter).
        """
        factory: Any = self.get(name)
        given: Any = params
        if name in self._typed:
            given = parse_stage_params(self.kind, name, params, lenient=True)
        try:
            return factory(given, *args)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{self.kind} stage {name!r}: {exc}") from exc

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)


@dataclass(slots=True)
class Post:
    """A batch on its way through postprocess."""

    outputs: dict[str, Array]
    scores: Array | None
    labels: tuple[str, ...]
    top: Array | None = None
    confidence: Array | None = None
    topk: list[list[tuple[str, float]]] | None = None
    rejected_label: str | None = None
    accepted: Array | None = None

    def finish(self) -> None:
        """Fill top-1 and confidence when no stage did."""
        if self.top is None and self.scores is not None and self.scores.ndim == 2:
            self.top = self.scores.argmax(axis=1)
            # The ufunc directly: ndarray.max goes through a Python-level wrapper.
            self.confidence = np.maximum.reduce(self.scores, axis=1)


PreFn = Callable[[Array], Array]
PostFn = Callable[[Post], None]
# A factory takes its parameter model (a built-in stage) or the params mapping.
PREPROCESS: Registry[Callable[[Any], PreFn]] = Registry("preprocess")
POSTPROCESS: Registry[Callable[[Any], PostFn]] = Registry("postprocess")
SOURCES: Registry[Callable[..., Any]] = Registry("source")
SINKS: Registry[Callable[..., Any]] = Registry("sink")


def _floats(value: Any, name: str) -> Array:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a list of numbers") from None
    return arr


def _as_float32(x: Array, stage: str) -> Array:
    """`x` as float32, for a stage that computes in it.

    Raises:
        BadInput: `x` does not hold numbers (text, dates, records and complex numbers
            from a file or a raw tensor), or holds one beyond float32's range, which the
            cast would make infinity (as `cast_fitting` refuses it for the model).
    """
    dtype = x.dtype
    if dtype == np.float32:
        return x
    if dtype.kind not in "biuf":
        raise BadInput(f"{stage} takes numbers, not dtype {dtype}")
    if dtype.kind == "f" and dtype.itemsize > 4:
        try:
            with np.errstate(over="raise"):
                return x.astype(np.float32)
        except FloatingPointError:
            raise BadInput(f"{stage}: a value is out of float32's range") from None
    return x.astype(np.float32)


def _misfit(stage: str, shape: tuple[int, ...], values: dict[str, Array]) -> BadInput:
    """The error for per-channel values that do not fit an input of `shape`.

    They fit when numpy broadcasts them onto the input without changing its shape: a
    value per channel (the last axis), or one for all.
    """
    for name, value in values.items():
        try:
            fits = np.broadcast_shapes(shape, value.shape) == shape
        except ValueError:
            fits = False
        if not fits:
            return BadInput(
                f"{stage}: {name} of shape {list(value.shape)} does not fit an input of "
                f"shape {list(shape)} (one value, or one per channel of the last axis)"
            )
    return BadInput(f"{stage}: its values do not fit an input of shape {list(shape)}")


@PREPROCESS.register("scale", typed=True)
def _scale(params: ScaleParams) -> PreFn:
    factor = _floats(params.factor, "factor")
    offset = _floats(params.offset, "offset")

    def run(x: Array) -> Array:
        f = _as_float32(x, "scale")
        try:
            out: Array = (f * factor + offset).astype(np.float32, copy=False)
        except ValueError:  # values per channel of another length than the input's
            raise _misfit("scale", f.shape, {"factor": factor, "offset": offset}) from None
        if out.shape != f.shape:  # or values that made more of the input
            raise _misfit("scale", f.shape, {"factor": factor, "offset": offset})
        return out

    return run


@PREPROCESS.register("normalize", typed=True)
def _normalize(params: NormalizeParams) -> PreFn:
    mean = _floats(params.mean, "mean")
    std = _floats(params.std, "std")

    def run(x: Array) -> Array:
        f = _as_float32(x, "normalize")
        try:
            out: Array = ((f - mean) / std).astype(np.float32, copy=False)
        except ValueError:  # values per channel of another length than the input's
            raise _misfit("normalize", f.shape, {"mean": mean, "std": std}) from None
        if out.shape != f.shape:  # or values that made more of the input
            raise _misfit("normalize", f.shape, {"mean": mean, "std": std})
        return out

    return run


@PREPROCESS.register("reshape", typed=True)
def _reshape(params: ReshapeParams) -> PreFn:
    shape = params.shape

    def run(x: Array) -> Array:
        try:
            out: Array = x.reshape(shape)
            return out
        except ValueError:
            raise BadInput(f"cannot reshape {list(x.shape)} to {list(shape)}") from None

    return run


@PREPROCESS.register("transpose", typed=True)
def _transpose(params: TransposeParams) -> PreFn:
    axes = params.axes

    def run(x: Array) -> Array:
        if x.ndim != len(axes):
            raise BadInput(
                f"transpose {list(axes)} needs {len(axes)} dimensions, got shape {list(x.shape)}"
            )
        # Contiguous, so that batching, the model and raw encoders see plain memory.
        return np.ascontiguousarray(x.transpose(axes))

    return run


def resize_bilinear(img: Array, height: int, width: int) -> Array:
    """Bilinear resize of an HxW or HxWxC image (align-corners off, like OpenCV)."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(height) + 0.5) * (h / height) - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * (w / width) - 0.5, 0, w - 1)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0).astype(np.float32), (xs - x0).astype(np.float32)
    if img.ndim == 3:
        wy, wx = wy[:, None, None], wx[None, :, None]
    else:
        wy, wx = wy[:, None], wx[None, :]
    f = img.astype(np.float32, copy=False)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bottom = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    out: Array = (top * (1 - wy) + bottom * wy).astype(np.float32)
    return out


@PREPROCESS.register("resize", typed=True)
def _resize(params: ResizeParams) -> PreFn:
    height, width, layout = params.height, params.width, params.layout

    def run(x: Array) -> Array:
        if x.ndim not in (2, 3):
            raise BadInput(f"resize expects an image, got shape {list(x.shape)}")
        img = x.transpose(1, 2, 0) if layout == "chw" and x.ndim == 3 else x
        if not img.shape[0] or not img.shape[1]:  # no pixel to interpolate from
            raise BadInput(f"resize: the image is empty (shape {list(x.shape)})")
        out = resize_bilinear(_as_float32(img, "resize"), height, width)
        return out.transpose(2, 0, 1) if layout == "chw" and out.ndim == 3 else out

    return run


@POSTPROCESS.register("softmax", typed=True)
def _softmax(params: BaseModel) -> PostFn:
    def run(post: Post) -> None:
        if post.scores is None:
            return
        z = post.scores - post.scores.max(axis=-1, keepdims=True)
        e = np.exp(z)
        post.scores = e / e.sum(axis=-1, keepdims=True)

    return run


@POSTPROCESS.register("argmax", typed=True)
def _argmax(params: BaseModel) -> PostFn:
    def run(post: Post) -> None:
        post.top = None
        post.finish()

    return run


@POSTPROCESS.register("topk", typed=True)
def _topk(params: TopkParams) -> PostFn:
    k = params.k

    def run(post: Post) -> None:
        if post.scores is None or post.scores.ndim != 2:  # no scores per row, as `finish`
            return
        idx = np.argsort(-post.scores, axis=1)[:, :k]
        names = post.labels
        post.topk = [
            [(names[i] if i < len(names) else str(i), float(row[i])) for i in ids]
            for ids, row in zip(idx, post.scores, strict=True)
        ]

    return run


@POSTPROCESS.register("threshold", typed=True)
def _threshold(params: ThresholdParams) -> PostFn:
    minimum, label = params.min_confidence, params.label

    def run(post: Post) -> None:
        post.finish()
        if post.confidence is not None:
            post.accepted = post.confidence >= minimum
            post.rejected_label = label

    return run
