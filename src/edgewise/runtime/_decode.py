"""Numeric inputs from JSON, shared by the local inference API and the MQTT source."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from edgewise.runtime._errors import BadInput

__all__ = ["decode_json"]


def decode_json(body: bytes) -> np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]:
    """Decode `{"inputs": [...]}` or a bare array into a numeric array.

    A model's inputs by name (`{"inputs": {"ids": [...], "mask": [...]}}`) decode into
    arrays by name.
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
            return {str(k): _numbers(v, f"input {k!r}") for k, v in data.items()}
    return _numbers(data, "'inputs'")


def _numbers(data: Any, what: str) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        raise BadInput(f"{what} must be an array of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise BadInput(f"{what} is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, nulls; integers past 64 bits
        raise BadInput(f"{what} must hold only numbers (integers within 64 bits)")
    return arr
