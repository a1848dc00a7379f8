"""What a pipeline spec says, and what an agent understands of it, as sets of terms.

A control plane and its agents are upgraded at different times, and a spec that uses a
field an agent was built before cannot run there: the agent's spec model refuses fields
it does not know (it would rather refuse than run something other than what was asked),
and drops built-in stage parameters it does not know. So each agent reports its
*vocabulary* (`spec_vocabulary`), and the control plane checks each deployment's specs
against what the targeted agents reported (`spec_terms`, `unknown_terms`) before a
device is asked to run what it cannot.

Terms are plain strings:

- a field, by its dotted path: `batching.overflow`, `cascade.endpoint`;
- a choice of a field that takes one of a few values: `batching.overflow=drop_oldest`,
  `priority=critical`;
- a stage, by kind and type: `preprocess:resize`, `sink:mqtt`; each parameter it
  takes: `preprocess:resize.height`; and the choices of those that take one of a few
  values: `preprocess:resize.layout=hwc`. A stage registered on the device by another
  package (not a built-in) takes any parameters: `preprocess:crop.*`.

Example:
    >>> terms = spec_terms({"name": "d", "batching": {"overflow": "drop_oldest"}})
    >>> terms
    ['batching', 'batching.overflow', 'batching.overflow=drop_oldest', 'name']
    >>> unknown_terms(terms + ["batching.spill"], spec_vocabulary())
    ['batching.spill']
"""

from __future__ import annotations

import enum
import hashlib
import types
import typing
from collections.abc import Collection, Iterable, Iterator, Mapping
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel

from edgewise.protocol._pipeline import PipelineSpec, StageSpec
from edgewise.protocol._stages import BUILTIN_STAGE_PARAMS

__all__ = [
    "incompatible_reason",
    "spec_terms",
    "spec_vocabulary",
    "unknown_terms",
    "vocabulary_digest",
]

# Where a spec holds stages, and the kind of stage each place holds.
_STAGE_FIELDS = {
    "source": "source",
    "preprocess": "preprocess",
    "postprocess": "postprocess",
    "sinks": "sink",
}


def _inner(annotation: Any) -> list[Any]:
    """The types an annotation admits: `X | None` and `list[X]` give X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) if a is not type(None) for t in _inner(a)]
    if origin in (list, tuple, set, frozenset):
        return [t for a in typing.get_args(annotation) for t in _inner(a)]
    return [annotation]


def _choices(annotation: Any) -> list[str]:
    out: list[str] = []
    for t in _inner(annotation):
        if typing.get_origin(t) is Literal:
            out += [str(v) for v in typing.get_args(t)]
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            out += [str(m.value) for m in t]
    return out


def _field_terms(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        yield from (f"{path}={c}" for c in _choices(info.annotation))
        for t in _inner(info.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel) and t is not StageSpec:
                yield from _field_terms(t, f"{path}.")


@cache
def _choice_fields() -> frozenset[str]:
    """The paths of this side's fields that take one of a few values."""
    return frozenset(t.partition("=")[0] for t in _builtin_vocabulary() if "=" in t)


@cache
def _builtin_vocabulary() -> frozenset[str]:
    terms = set(_field_terms(PipelineSpec, ""))
    for (kind, name), params in BUILTIN_STAGE_PARAMS.items():
        terms.add(f"{kind}:{name}")
        for p, info in params.model_fields.items():
            terms.add(f"{kind}:{name}.{p}")
            terms.update(f"{kind}:{name}.{p}={c}" for c in _choices(info.annotation))
    return frozenset(terms)


def spec_vocabulary(stages: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Every term this side's spec model knows, sorted.

    Args:
        stages: Stage kind -> the types registered on this device (the runtime's
            registries); those that are not built-ins take any parameters.
    """
    terms = set(_builtin_vocabulary())
    for kind, names in (stages or {}).items():
        for name in names:
            if (kind, name) not in BUILTIN_STAGE_PARAMS:
                terms.update((f"{kind}:{name}", f"{kind}:{name}.*"))
    return sorted(terms)


def vocabulary_digest(vocabulary: Iterable[str]) -> str:
    """A short digest of a vocabulary: equal for equal sets of terms."""
    text = "\n".join(sorted(set(vocabulary)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stage_terms(kind: str, stage: Any) -> Iterator[str]:
    if not isinstance(stage, Mapping) or not isinstance(stage.get("type"), str):
        return
    head = f"{kind}:{stage['type']}"
    yield head
    params = stage.get("params")
    if isinstance(params, Mapping):
        choices = _choice_fields()
        for p, value in params.items():
            yield (term := f"{head}.{p}")
            if term in choices and isinstance(value, str):
                yield f"{term}={value}"


def _walk(value: Mapping[str, Any], prefix: str) -> Iterator[str]:
    choices = _choice_fields()
    for key, item in value.items():
        path = f"{prefix}{key}"
        yield path
        if not prefix and key in _STAGE_FIELDS:
            stages = item if isinstance(item, list) else [item]
            for stage in stages:
                yield from _stage_terms(_STAGE_FIELDS[key], stage)
        elif isinstance(item, Mapping):
            yield from _walk(item, f"{path}.")
        elif path in choices and isinstance(item, str):
            yield f"{path}={item}"


def spec_terms(spec: Mapping[str, Any]) -> list[str]:
    """The terms a spec (as it travels: JSON, defaults left out) uses, sorted.

    Read defensively: what is not shaped like a spec yields no terms rather than an error.
    """
    return sorted(set(_walk(spec, ""))) if isinstance(spec, Mapping) else []


def unknown_terms(terms: Iterable[str], vocabulary: Collection[str]) -> list[str]:
    """The terms a side with `vocabulary` does not know, in the given order.

    A parameter of a stage that takes any parameters (`kind:type.*`) is known.
    """
    out = []
    for term in terms:
        if term in vocabulary:
            continue
        head, dot, _ = term.partition(".")
        if dot and ":" in head and f"{head}.*" in vocabulary:
            continue
        out.append(term)
    return out


def incompatible_reason(unknown: Iterable[str]) -> str:
    """What an agent reports when it refuses a spec with terms it does not know.

    Control planes read it with `cannot_run` (a device that cannot run the revision is
    held back by a rollout, not counted as failed).
    """
    terms = ", ".join(unknown)
    return f"incompatible: this agent does not know {terms} (the spec needs a newer agent)"
