"""Numeric inputs from JSON, shared by the local inference API and the MQTT source."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from edgewise.runtime._errors import BadInput

__all__ = ["decode_json"]


def decode_json(body: bytes) -> np.ndarray[Any, Any]:
    """Decode `{"inputs": [...]}` or a bare array into a numeric array."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadInput("body is not valid JSON") from None
    if isinstance(data, dict):
        if "inputs" not in data:
            raise BadInput("JSON body needs an 'inputs' array")
        data = data["inputs"]
    if not isinstance(data, list):
        raise BadInput("'inputs' must be an array of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise BadInput("'inputs' is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, nulls; integers past 64 bits
        raise BadInput("'inputs' must hold only numbers (integers within 64 bits)")
    return arr
