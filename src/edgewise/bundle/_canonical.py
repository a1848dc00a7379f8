r"""Canonical JSON bytes (RFC 8785 style) and the manifest digest that signatures cover.

Two manifests that mean the same thing must hash the same, whatever their key order or
whitespace, so signatures survive re-serialisation. The rules follow RFC 8785 (JCS):

- objects: keys sorted by their UTF-16 code units, no whitespace anywhere;
- strings: UTF-8, only ``"``, ``\`` and control characters escaped (``\n`` style where
  JSON has a short form, else ``\u00xx``); lone surrogates are refused;
- numbers: the ECMAScript shortest round-trip form (``1``, ``0.5``, ``1e-7``, ``1e+21``);
  an integral float prints as an integer, ``-0`` as ``0``; NaN and infinities are refused,
  and so are integers beyond +-2**53 that a double cannot hold exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

__all__ = ["canonical_json", "format_number", "manifest_digest"]

_MAX_SAFE_INT = 2**53


def canonical_json(obj: Any) -> bytes:
    """Serialise a JSON value (or a pydantic model) to canonical bytes.

    Args:
        obj: dicts with str keys, lists/tuples, str, int, float, bool, None, or a
            pydantic model (dumped in JSON mode, unset fields left out).

    Returns:
        The canonical UTF-8 bytes.

    Raises:
        ValueError: on NaN/infinity, unsafe integers, non-str keys, lone surrogates or
            values JSON cannot represent.
    """
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", exclude_unset=True)
    plain = _plain(obj)
    if plain is not _CAREFUL:
        # The common case (signed documents, manifests): the C encoder writes the same
        # bytes several times faster than `_emit`.
        text = json.dumps(plain, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    else:
        parts: list[str] = []
        _emit(obj, parts)
        text = "".join(parts)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Show what precedes it (the key, mostly), never the surrogate: not UTF-8 either.
        before = text[max(0, exc.start - 40) : exc.start]
        raise ValueError(f"string holds a lone surrogate (after {before!r})") from exc


_CAREFUL = object()


def _plain(value: Any) -> Any:
    """`value` in a form `json.dumps(sort_keys=True)` writes canonically, or `_CAREFUL`.

    Plain dicts with ASCII keys (code-point order is UTF-16 order there), lists, strings
    (escaped as `_emit` escapes them), safe ints, bools and None pass as they are; an
    integral float up to 2**53 becomes its int (ECMAScript writes 1.0 as 1); other floats
    pass when Python's repr already writes them as ECMAScript does: in [1e-4, 1e16), both
    plain decimals with the shortest round-trip digits. Anything else: `_CAREFUL`.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else _CAREFUL
    if kind is float:
        size = abs(value)
        if size.is_integer():
            return int(value) if size <= _MAX_SAFE_INT else _CAREFUL
        return value if 1e-4 <= size < 1e16 else _CAREFUL
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str or not key.isascii():
                return _CAREFUL
            plain = _plain(item)
            if plain is _CAREFUL:
                return _CAREFUL
            out[key] = plain
        return out
    if kind is list or kind is tuple:
        items = []
        for item in value:
            plain = _plain(item)
            if plain is _CAREFUL:
                return _CAREFUL
            items.append(plain)
        return items
    return _CAREFUL


def manifest_digest(manifest: Any) -> str:
    """The sha256 hex digest of a manifest's canonical bytes: what signatures cover.

    Args:
        manifest: A `Manifest` (or any pydantic model / JSON value).

    Returns:
        64 lowercase hex digits.
    """
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def _emit(value: Any, out: list[str]) -> None:
    # bool before int: bool is a subclass of int.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise ValueError(f"integer {value} is beyond the exactly representable range")
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(format_number(value))
    elif isinstance(value, Mapping):
        keys = list(value.keys())
        for key in keys:
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
        out.append("{")
        for i, key in enumerate(sorted(keys, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


def _utf16_key(key: str) -> bytes:
    # RFC 8785 sorts by UTF-16 code units; code-point order differs above the BMP.
    return key.encode("utf-16-be", "surrogatepass")


def format_number(x: float) -> str:
    """Format a float the way ECMAScript's Number.prototype.toString does.

    Args:
        x: A finite float.

    Returns:
        The shortest round-trip decimal form.

    Raises:
        ValueError: for NaN or an infinity.
    """
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a finite number")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp_text = repr(abs(x)).partition("e")
    int_part, _, frac = mantissa.partition(".")
    raw = int_part + frac
    stripped = raw.lstrip("0")
    # value = 0.DIGITS * 10**point
    point = len(int_part) + (int(exp_text) if exp_text else 0) - (len(raw) - len(stripped))
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= point <= 21:
        body = digits + "0" * (point - k)
    elif 0 < point <= 21:
        body = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        body = "0." + "0" * (-point) + digits
    else:
        exp = point - 1
        exp_str = f"e{'+' if exp >= 0 else '-'}{abs(exp)}"
        body = (digits if k == 1 else digits[0] + "." + digits[1:]) + exp_str
    return sign + body
