from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.bundle import Manifest, canonical_json, manifest_digest
from edgewise.bundle._canonical import _emit, format_number

from .conftest import TINY_MANIFEST


@pytest.mark.parametrize(
    ("value", "text"),
    [
        # RFC 8785 appendix / ECMAScript Number.prototype.toString vectors.
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (0.5, "0.5"),
        (1e-7, "1e-7"),
        (1e-6, "0.000001"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (333333333.3333333, "333333333.3333333"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (9007199254740992.0, "9007199254740992"),
        (0.1 + 0.2, "0.30000000000000004"),
        (-1.5e-9, "-1.5e-9"),
    ],
)
def test_numbers_use_the_ecmascript_shortest_form(value: float, text: str) -> None:
    assert format_number(value) == text
    assert float(text) == value


def test_objects_sort_keys_and_drop_whitespace() -> None:
    assert canonical_json({"b": [1, 2.0, "x"], "a": {"d": None, "c": True}}) == (
        b'{"a":{"c":true,"d":null},"b":[1,2,"x"]}'
    )


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+1F600 is a surrogate pair (D83D...) in UTF-16, so it sorts before U+FB01.
    text = canonical_json({"\ufb01": 1, "\U0001f600": 2})
    assert text == '{"\U0001f600":2,"\ufb01":1}'.encode()


def test_strings_escape_only_quotes_backslash_and_controls() -> None:
    assert canonical_json('é"\\\n\x01/') == '"é\\"\\\\\\n\\u0001/"'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 2**53 + 1, {1: "x"}, b"raw"])
def test_values_json_cannot_hold_exactly_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json({"v": bad})


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(ValueError):
        canonical_json("\ud800")


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=("Cs",)), max_size=6), inner, max_size=4
        )
    ),
    max_leaves=20,
)


def _numbers_as_floats(value: Any) -> Any:
    # JSON numbers are doubles: "51088645272301090" and 5.108864527230109e16 are one value.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    return [_numbers_as_floats(v) for v in value]


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(json_values, st.integers(0, 2**32), st.sampled_from([None, 0, 2, "\t"]))
def test_equal_values_give_equal_bytes_whatever_key_order_and_whitespace(
    value: Any, seed: int, indent: int | str | None
) -> None:
    text = json.dumps(_shuffled(value, random.Random(seed)), indent=indent)
    assert canonical_json(json.loads(text)) == canonical_json(value)
    # The canonical bytes are themselves JSON meaning the same value.
    assert _numbers_as_floats(json.loads(canonical_json(value))) == _numbers_as_floats(value)


def _mutations() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("version"), st.sampled_from(["1.0.1", "2.0.0", "1.0.0-rc.1"])),
        st.tuples(st.just("name"), st.sampled_from(["tinier", "tiny2"])),
        st.tuples(st.just("labels"), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
        st.tuples(
            st.just("preprocess"),
            st.dictionaries(st.text(max_size=4), json_scalars, min_size=1, max_size=3),
        ),
        st.tuples(st.just("description"), st.text(max_size=10)),
        st.tuples(st.just("requires.memory_mb"), st.integers(0, 10_000)),
        st.tuples(st.just("health.tolerance"), st.floats(0, 1)),
        st.tuples(
            st.just("inputs.0.shape"),
            st.lists(st.integers(1, 9) | st.just("N"), min_size=1, max_size=4),
        ),
    )


def _apply(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@settings(max_examples=150, deadline=None)
@given(_mutations(), st.integers(0, 2**32))
def test_manifest_digest_is_order_independent_and_changes_with_any_field(
    mutation: tuple[str, Any], seed: int
) -> None:
    base = json.loads(
        json.dumps({**TINY_MANIFEST, "health": {"tolerance": 0.5}, "description": "d"})
    )
    original = Manifest.model_validate(base)
    reordered = Manifest.model_validate(
        json.loads(json.dumps(_shuffled(base, random.Random(seed)), indent=3))
    )
    assert manifest_digest(reordered) == manifest_digest(original)

    changed = json.loads(json.dumps(base))
    _apply(changed, *mutation)
    edited = Manifest.model_validate(changed)
    same = edited.model_dump(mode="json", exclude_unset=True) == original.model_dump(
        mode="json", exclude_unset=True
    )
    assert (manifest_digest(edited) == manifest_digest(original)) == same


def _careful(value: Any) -> bytes:
    parts: list[str] = []
    _emit(value, parts)
    return "".join(parts).encode("utf-8")


ascii_keyed_values = st.recursive(
    json_scalars | st.floats(min_value=1e-5, max_value=1e17),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(max_codepoint=127), max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values | ascii_keyed_values)
def test_the_fast_path_writes_the_very_bytes_of_the_careful_one(value: Any) -> None:
    assert canonical_json(value) == _careful(value)


@pytest.mark.parametrize(
    "value",
    [
        1.0,
        -0.0,
        100.0,
        2.0**53,
        2.0**53 + 2,
        2.0**60,
        1e-5,
        1e16,
        1e20,
        123456789.5,
        0.0001,
        9999999999999998.0,
        -3.0,
        {"é": 1, "z": 0.25},
        [1.0, {"a": 2.0}],
    ],
)
def test_the_fast_path_edges_match_the_careful_one(value: Any) -> None:
    assert canonical_json({"v": value}) == _careful({"v": value})
