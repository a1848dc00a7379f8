"""Numeric inputs from JSON, shared by the local inference API and the MQTT source."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from edgewise.runtime._errors import BadInput

__all__ = ["decode_json"]

_R, _L = ord("r"), ord("l")  # (see `_may_hold_bool`)


def decode_json(body: bytes) -> np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]:
    """Decode `{"inputs": [...]}` or a bare array into a numeric array.

    A model's inputs by name (`{"inputs": {"ids": [...], "mask": [...]}}`) decode into
    arrays by name. Booleans are not numbers here: `[true, 0.5]` is refused, not read
    as `[1.0, 0.5]`.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadInput("body is not valid JSON") from None
    if isinstance(data, dict):
        if "inputs" not in data:
            raise BadInput("JSON body needs 'inputs': an array, or arrays by input name")
        data = data["inputs"]
        if isinstance(data, dict):
            if not data:
                raise BadInput("'inputs' names no input")
            return {str(k): _numbers(v, f"input {k!r}", body) for k, v in data.items()}
    return _numbers(data, "'inputs'", body)


def _numbers(data: Any, what: str, body: bytes) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        raise BadInput(f"{what} must be an array of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise BadInput(f"{what} is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, nulls; integers past 64 bits
        raise BadInput(f"{what} must hold only numbers (integers within 64 bits)")
    # numpy reads a boolean among numbers as 0 or 1: look for one, at little cost to a
    # body without (see `_may_hold_bool`).
    if _may_hold_bool(body) and _holds_bool(data):
        raise BadInput(f"{what} must hold only numbers, not true or false")
    return arr


def _may_hold_bool(body: bytes) -> bool:
    """Whether a body has the words `true` or `false` in it.

    Numbers and the key "inputs" have no "r" and no "l": a `memchr` each settles the
    usual body (an int needle goes straight to it: tens of nanoseconds for a kilobyte,
    where a bytes needle takes several times that); the words are looked for only then.
    """
    return (_R in body or _L in body) and (b"true" in body or b"false" in body)


def _holds_bool(data: list[Any]) -> bool:
    """Whether nested lists hold a boolean (walked without recursion: any depth)."""
    todo = [data]
    while todo:
        for v in todo.pop():
            if v is True or v is False:
                return True
            if type(v) is list:
                todo.append(v)
    return False
