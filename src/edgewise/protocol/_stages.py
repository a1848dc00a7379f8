"""The parameters of the built-in pipeline stages, typed: one model per stage.

Both sides use these models. The control plane validates a deployment's stages with
them (`stage_problems`, run by `PipelineSpec` under `STRICT_STAGE_PARAMS`), so a
misspelt parameter or a value the stage cannot use (`topk` with `k: 0`, an MQTT sink on
port 70000, a `directory` source without a `path`) is a 422 at deploy time, not a canary
that fails to start and rolls back. A device builds each built-in stage from the same
model (`parse_stage_params`), so the two cannot disagree on what a value means.

A device is lenient about names only: it drops parameters a stage does not take (and
logs them), so a pipeline deployed before names were checked keeps running after an
agent upgrade. Stages registered under other names take any parameters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_STAGE_PARAMS",
    "DirectorySourceParams",
    "HttpSinkParams",
    "LogSinkParams",
    "MqttSinkParams",
    "MqttSourceParams",
    "NoParams",
    "NormalizeParams",
    "ReshapeParams",
    "ResizeParams",
    "ScaleParams",
    "SyntheticSourceParams",
    "ThresholdParams",
    "TopkParams",
    "TransposeParams",
    "parse_stage_params",
    "stage_reference",
]


class _Params(BaseModel):
    # Numbers given for text (an MQTT topic `7`, a label `3`) were str()-ed by the
    # stages before they had models; keep taking them.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class NoParams(_Params):
    """A stage that takes no parameters (softmax, argmax, the http source, summary)."""


_FLOAT32_MAX = 3.4028234663852886e38


def _numbers(value: Any) -> Any:
    """A number, or a (nested) list of numbers: one per channel, broadcast by numpy.

    The stages compute in float32: a number beyond its range would become infinity.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise ValueError("must be a number or a list of numbers")
    if not isinstance(value, list) and not abs(value) <= _FLOAT32_MAX:  # NaN fails too
        raise ValueError("must be a finite number within float32's range")
    if isinstance(value, list):
        if not value:
            raise ValueError("must not be an empty list")
        for item in value:
            _numbers(item)
    return value


def _no_zero(value: Any) -> Any:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif abs(v) < 1e-45:  # zero, or a number that float32 rounds to zero
            raise ValueError("must not be zero")
    return value


Numbers = Annotated[
    Any,
    AfterValidator(_numbers),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "array"}]}),
]


class ScaleParams(_Params):
    """`x * factor + offset`."""

    factor: Numbers = 1.0
    offset: Numbers = 0.0


class NormalizeParams(_Params):
    """`(x - mean) / std`."""

    mean: Numbers = 0.0
    std: Annotated[Numbers, AfterValidator(_no_zero)] = 1.0


Dim = Annotated[int, Field(ge=-1, le=1 << 31)]


class ReshapeParams(_Params):
    """Reshape each request to `shape` (one dimension may be -1)."""

    shape: tuple[Dim, ...] = Field(min_length=1, max_length=16)

    @field_validator("shape")
    @classmethod
    def _one_free(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if value.count(-1) > 1:
            raise ValueError("at most one dimension may be -1")
        return value


class TransposeParams(_Params):
    """Reorder each request's axes (numpy's transpose): [2, 0, 1] makes HxWxC images CxHxW."""

    axes: tuple[Annotated[int, Field(ge=0, le=31)], ...] = Field(min_length=1, max_length=32)

    @field_validator("axes")
    @classmethod
    def _permutation(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if sorted(value) != list(range(len(value))):
            raise ValueError(f"must be a permutation of 0..{len(value) - 1}")
        return value


class ResizeParams(_Params):
    """Bilinear resize of an image to `height` x `width`."""

    height: int = Field(gt=0, le=65_536)
    width: int = Field(gt=0, le=65_536)
    layout: Literal["hwc", "chw"] = "hwc"


class TopkParams(_Params):
    """The `k` best classes per row, with their scores."""

    k: int = Field(default=3, ge=1, le=100_000)


class ThresholdParams(_Params):
    """Rows whose top-1 confidence is below `min_confidence` are labelled `label`."""

    min_confidence: float = Field(default=0.5, ge=0, le=1)
    label: str = "unknown"


_MAX_SYNTHETIC_VALUES = 1 << 26
_Port = Annotated[int, Field(ge=1, le=65_535)]
_Qos = Annotated[int, Field(ge=0, le=2)]
_Host = Annotated[str, Field(min_length=1, max_length=253)]


class SyntheticSourceParams(_Params):
    """Replay a data set (`npy` file, `dataset: digits`, or random rows) at `rate_hz`."""

    rate_hz: float = Field(default=100.0, gt=0, le=1_000_000)
    count: int = Field(default=0, ge=0)  # 0: forever
    npy: str | None = Field(default=None, min_length=1)
    dataset: Literal["digits"] | None = None
    shape: tuple[Annotated[int, Field(ge=1, le=1 << 20)], ...] = Field(
        default=(64,), min_length=1, max_length=8
    )
    seed: int = Field(default=0, ge=0)
    size: int = Field(default=256, ge=1, le=1 << 20)

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticSourceParams:
        if self.npy is None and self.dataset is None:
            values = self.size * math.prod(self.shape)
            if values > _MAX_SYNTHETIC_VALUES:
                raise ValueError(
                    f"size x shape is {values} values; at most {_MAX_SYNTHETIC_VALUES} "
                    "(256 MB of float32) are generated"
                )
        return self


class DirectorySourceParams(_Params):
    """Feed every new file of `path`, polling every `poll_s` seconds."""

    path: str = Field(min_length=1)
    poll_s: float = Field(default=0.5, gt=0, le=3600)


class MqttSourceParams(_Params):
    """One request per message on `topic`: JSON, or raw bytes of `dtype` and `shape`."""

    topic: str = Field(min_length=1)
    host: _Host = "127.0.0.1"
    port: _Port = 1883
    qos: _Qos = 0
    dtype: str | None = Field(default=None, min_length=1, max_length=32)
    shape: tuple[Dim, ...] | None = Field(default=None, min_length=1, max_length=16)

    @field_validator("shape", mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # Written as "1,64" from the start; a list is taken too.
        if isinstance(value, str):
            if not re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", value):
                raise ValueError("must be dimensions such as '1,64' or a list of them")
            return tuple(int(d) for d in value.split(","))
        return value


class LogSinkParams(_Params):
    """One log line per result, at `level`."""

    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError("must be a logging level such as INFO or WARNING")
        return value.upper()


class MqttSinkParams(_Params):
    """Publish each result to `topic` (default `edgewise/results/<pipeline>`)."""

    topic: str | None = Field(default=None, min_length=1)
    qos: _Qos = 0
    host: _Host = "127.0.0.1"
    port: _Port = 1883


class HttpSinkParams(_Params):
    """POST each result to `url`; at most `queue` results wait, the rest are dropped."""

    url: str
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    timeout_s: float = Field(default=5.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://\S+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


#: The parameter model of each built-in stage, by (kind, type).
BUILTIN_STAGE_PARAMS: dict[tuple[str, str], type[BaseModel]] = {
    ("source", "http"): NoParams,
    ("source", "synthetic"): SyntheticSourceParams,
    ("source", "directory"): DirectorySourceParams,
    ("source", "mqtt"): MqttSourceParams,
    ("preprocess", "scale"): ScaleParams,
    ("preprocess", "normalize"): NormalizeParams,
    ("preprocess", "reshape"): ReshapeParams,
    ("preprocess", "resize"): ResizeParams,
    ("preprocess", "transpose"): TransposeParams,
    ("postprocess", "softmax"): NoParams,
    ("postprocess", "argmax"): NoParams,
    ("postprocess", "topk"): TopkParams,
    ("postprocess", "threshold"): ThresholdParams,
    ("sink", "log"): LogSinkParams,
    ("sink", "mqtt"): MqttSinkParams,
    ("sink", "http"): HttpSinkParams,
    ("sink", "summary"): NoParams,
}


def stage_reference() -> list[dict[str, Any]]:
    """Each built-in stage (`kind`, `type`) with the JSON Schema of its parameters."""
    return [
        {"kind": kind, "type": name, "params": model.model_json_schema()}
        for (kind, name), model in BUILTIN_STAGE_PARAMS.items()
    ]


def unknown_param_names(kind: str, stage_type: str, params: Mapping[str, Any]) -> list[str]:
    """The names in `params` that built-in stage `stage_type` does not take, sorted."""
    model = BUILTIN_STAGE_PARAMS.get((kind, stage_type))
    if model is None:
        return []
    return sorted(set(params) - set(model.model_fields))


def parse_stage_params(
    kind: str, stage_type: str, params: Mapping[str, Any], *, lenient: bool = False
) -> BaseModel | None:
    """The typed parameters of a built-in stage; None for a stage of another name.

    With `lenient` (a device), parameters the stage does not take are dropped; otherwise
    they are refused like any bad value.

    Raises:
        ValueError: a value the stage cannot use; the message names the stage and the
            parameter: "postprocess stage 'topk': k: must be >= 1 (got 0)".
    """
    model = BUILTIN_STAGE_PARAMS.get((kind, stage_type))
    if model is None:
        return None
    fields = model.model_fields
    given = {k: v for k, v in params.items() if k in fields} if lenient else dict(params)
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise ValueError(f"{kind} stage {stage_type!r}: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in err["loc"]) or "params"
    ctx = err.get("ctx") or {}
    message = str(err["msg"])
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            message = f"must be {op} {ctx[bound]}"
            break
    message = message.removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required"
    elif err["type"] == "extra_forbidden":
        return f"{where}: unknown parameter"
    if err["type"] != "missing" and "input" in err:
        message += f" (got {_brief(err['input'])})"
    return f"{where}: {message}"


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
