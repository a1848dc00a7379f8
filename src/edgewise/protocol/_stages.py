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
import reprlib
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

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # No stage takes a flag, and pydantic would read true as 1 (`k: true`, a topk of
        # one; `rate_hz: true`, one a second): a boolean is a mistake to point out.
        if isinstance(value, bool):
            raise ValueError("must not be true or false")
        return value


class NoParams(_Params):
    """A stage that takes no parameters (softmax, argmax, the http source, summary)."""


_FLOAT32_MAX = 3.4028234663852886e38


_MAX_NESTING = 16  # as many axes as a `reshape` stage may give a request


def _number(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number or a list of numbers")
    if not abs(value) <= _FLOAT32_MAX:  # NaN fails too
        raise ValueError("must be a finite number within float32's range")


def _numbers(value: Any) -> Any:
    """A number, or a (nested) list of numbers: one per channel, broadcast by numpy.

    The stages compute in float32: a number beyond its range would become infinity.
    Nested lists are rectangular, as numpy makes an array of them only then (`[[1],
    [1, 2]]` would fail on the device, after the control plane took it), and are read
    level by level, without recursion however deep they are.
    """
    level = [value]
    for _ in range(_MAX_NESTING + 1):
        lists = [v for v in level if isinstance(v, list)]
        if not lists:
            for v in level:
                _number(v)
            return value
        if len(lists) != len(level) or len({len(v) for v in lists}) != 1:
            raise ValueError(
                "must be a number or a list of numbers, nested lists all of one length"
            )
        if not lists[0]:
            raise ValueError("must not be an empty list")
        level = [item for v in lists for item in v]
    raise ValueError(f"must be a number or a list of numbers at most {_MAX_NESTING} deep")


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

    # At least one a million seconds (11.6 days): a longer wait is past what a thread
    # can wait for at once (threading.TIMEOUT_MAX), which had ended the source's thread.
    rate_hz: float = Field(default=100.0, ge=1e-6, le=1_000_000)
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


def _topic_problem(topic: str, filter_: bool) -> str | None:
    """What makes `topic` no MQTT topic name (`filter_`: no subscription filter), or None.

    A broker drops the connection of a client that uses one; paho refuses a bad filter
    by raising inside its network thread, which ends it: a source that never hears.
    """
    if len(topic.encode("utf-8", "surrogatepass")) > 65_535:
        return "must be at most 65535 bytes"
    if "\x00" in topic:
        return "must not hold a NUL character"
    if not filter_:
        if "+" in topic or "#" in topic:
            return "must not hold the wildcards + or # (a topic to publish to)"
        return None
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "may hold # only as its whole last level ('a/#')"
        if "+" in level and level != "+":
            return "may hold + only as a whole level ('a/+/c')"
    return None


class MqttSourceParams(_Params):
    """One request per message on `topic`: JSON, or raw bytes of `dtype` and `shape`."""

    topic: str = Field(min_length=1)
    host: _Host = "127.0.0.1"
    port: _Port = 1883
    qos: _Qos = 0
    dtype: str | None = Field(default=None, min_length=1, max_length=32)
    shape: tuple[Dim, ...] | None = Field(default=None, min_length=1, max_length=16)

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        problem = _topic_problem(value, filter_=True)
        if problem is not None:
            raise ValueError(problem)
        return value

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

    @field_validator("topic")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        problem = None if value is None else _topic_problem(value, filter_=False)
        if problem is not None:
            raise ValueError(problem)
        return value


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
    if message.startswith("must be ") and _is_nan(err.get("input")):
        message = "must be a number, not NaN"  # out of no bound: no number at all
    message = message.removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required"
    elif err["type"] == "extra_forbidden":
        return f"{where}: unknown parameter"
    if err["type"] != "missing" and "input" in err:
        message += f" (got {_brief(err['input'])})"
    return f"{where}: {message}"


def _is_nan(value: Any) -> bool:
    """Whether `value` is NaN, or text that pydantic reads as NaN ("nan", "NaN")."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and math.isnan(value)


# Nested values are cut a few levels down: a list thousands of levels deep is a value
# to refuse, and repr() would give up on it with RecursionError.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 16  # past the 40 shown


def _brief(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
