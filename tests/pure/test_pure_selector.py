from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.control._selector import (
    LabelError,
    Operator,
    Requirement,
    SelectorError,
    parse_selector,
    selector_within,
    validate_labels,
)

# ------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("", {}, True),
        ("   ", {"a": "1"}, True),
        ("a=1", {"a": "1"}, True),
        ("a=1", {"a": "2"}, False),
        ("a=1", {}, False),
        ("a==1", {"a": "1"}, True),
        ("a!=1", {"a": "2"}, True),
        ("a!=1", {}, True),
        ("a!=1", {"a": "1"}, False),
        ("a in (1,2)", {"a": "2"}, True),
        ("a in (1,2)", {"a": "3"}, False),
        ("a in (1,2)", {}, False),
        ("a notin (1,2)", {"a": "3"}, True),
        ("a notin (1,2)", {}, True),
        ("a notin (1,2)", {"a": "1"}, False),
        ("a", {"a": ""}, True),
        ("a", {"b": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("!a", {"a": "1"}, False),
        ("a=", {"a": ""}, True),
        ("a=", {"a": "x"}, False),
        ("site in (a,b), hw=jetson-orin", {"site": "b", "hw": "jetson-orin"}, True),
        ("site in (a,b), hw=jetson-orin", {"site": "c", "hw": "jetson-orin"}, False),
        ("example.com/tier=gold", {"example.com/tier": "gold"}, True),
    ],
)
def test_selector_matches_like_kubernetes(
    text: str, labels: dict[str, str], expected: bool
) -> None:
    assert parse_selector(text).matches(labels) is expected


def test_commas_inside_parentheses_belong_to_the_value_set() -> None:
    sel = parse_selector("a in (x, y ,z),b")
    assert sel.requirements == (
        Requirement("a", Operator.IN, ("x", "y", "z")),
        Requirement("b", Operator.EXISTS),
    )


def test_empty_selector_has_no_requirements_and_matches_everything() -> None:
    sel = parse_selector("")
    assert sel.is_empty
    assert sel.matches({"anything": "goes"})
    assert str(sel) == ""


# ------------------------------------------------------------------------- canonical form


def test_canonical_form_sorts_requirements_and_values() -> None:
    sel = parse_selector("site notin (b, a), hw == x,!retired, zone")
    assert str(sel) == "hw=x,!retired,site notin (a,b),zone"


def test_equal_selectors_in_different_order_compare_equal() -> None:
    assert parse_selector("a=1,b in (y,x)") == parse_selector("b in (x,y), a==1")


def test_duplicate_requirements_collapse() -> None:
    assert str(parse_selector("a=1,a=1")) == "a=1"


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a in (x", "position 8: expected ',' or ')'"),
        ("a in ()", "position 7: empty value set"),
        ("a in x", "position 6: expected '('"),
        ("a=1,", "position 5: expected a requirement after ','"),
        (",a", "position 1: expected a label key"),
        ("a b", "position 3: expected an operator"),
        ("a=1 b=2", "position 5: expected ',' between requirements"),
        ("!a=1", "position 3: expected ',' between requirements"),
        ("a===b", "position 4: expected a label value"),
        ("-a=1", "position 1: label key '-a'"),
        ("a=" + "v" * 64, "longer than 63"),
        ("a=b$", "position 3: label value 'b$'"),
        ("x/y/z=1", "not a DNS subdomain"),
        ("/a=1", "prefix before '/' is empty"),
        ("a/=1", "name is empty"),
        ("k" * 64, "name longer than 63"),
        ("a in (x))", "position 9: expected ',' between requirements, found ')'"),
    ],
)
def test_parse_errors_name_position_and_token(text: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse_selector(text)
    assert fragment in str(err.value)


def test_non_string_selector_is_refused() -> None:
    with pytest.raises(SelectorError):
        parse_selector(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "labels",
    [
        {"": "x"},
        {"a": "x" * 64},
        {"a": "-x"},
        {"a b": "x"},
        {"a": 3},
        {"Bad_Prefix.com/a": "x"},
        {("p" * 254) + "/a": "x"},
    ],
)
def test_validate_labels_refuses_invalid_keys_and_values(labels: dict[str, str]) -> None:
    with pytest.raises(LabelError):
        validate_labels(labels)


def test_validate_labels_accepts_kubernetes_style_labels() -> None:
    validate_labels({"site": "store-12", "hw": "jetson_orin.v2", "example.com/x": "", "a": "Z"})


def test_label_error_is_a_selector_error() -> None:
    with pytest.raises(SelectorError):
        validate_labels({"a": "-"})


# ------------------------------------------------------------------------- scopes


@pytest.mark.parametrize(
    ("inner", "scope", "expected"),
    [
        ("site=s1", "site=s1", True),
        ("site=s1,hw=x", "site=s1", True),
        ("hw=x", "site=s1", False),
        ("", "site=s1", False),
        ("site=s1", "", True),
        ("site in (s1,s2)", "site=s1", False),
        ("site in (s1,s2)", "site in (s1,s2,s3)", True),
        ("site=s1", "site!=s2", True),
        ("site!=s2", "site!=s2", True),
        ("site notin (s2,s3)", "site!=s2", True),
        ("site!=s2", "site notin (s2,s3)", False),
        ("site=s1", "site", True),
        ("site", "site=s1", False),
        ("!site", "site!=s1", True),
        ("!site", "site", False),
        ("site,site notin (s1)", "site!=s1", True),
        ("site in (s1,s2),site!=s2", "site=s1", True),
        ("a=1,a=2", "site=s1", True),  # unsatisfiable: vacuously inside
        ("site=s1,!site", "b=2", True),
    ],
)
def test_selector_within(inner: str, scope: str, expected: bool) -> None:
    assert selector_within(parse_selector(inner), parse_selector(scope)) is expected


# ------------------------------------------------------------------------- properties

_KEYS = ["a", "b", "c"]
_VALUES = ["1", "2", "3"]
_requirement = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
    st.builds(lambda k, v: f"{k}!={v}", st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
    st.builds(
        lambda k, vs: f"{k} in ({','.join(vs)})",
        st.sampled_from(_KEYS),
        st.lists(st.sampled_from(_VALUES), min_size=1, max_size=3),
    ),
    st.builds(
        lambda k, vs: f"{k} notin ({','.join(vs)})",
        st.sampled_from(_KEYS),
        st.lists(st.sampled_from(_VALUES), min_size=1, max_size=3),
    ),
    st.sampled_from(_KEYS),
    st.builds(lambda k: f"!{k}", st.sampled_from(_KEYS)),
)
_selector_text = st.lists(_requirement, max_size=4).map(", ".join)

# Every label set over the small universe, with "9" standing for any other value.
_ALL_LABELS = [
    {k: v for k, v in zip(_KEYS, combo, strict=True) if v is not None}
    for combo in itertools.product([None, *_VALUES, "9"], repeat=len(_KEYS))
]


@settings(max_examples=200, deadline=None)
@given(_selector_text)
def test_canonical_form_reparses_to_the_same_selector(text: str) -> None:
    sel = parse_selector(text)
    assert parse_selector(str(sel)) == sel


@settings(max_examples=200, deadline=None)
@given(_selector_text, _selector_text)
def test_selector_within_agrees_with_brute_force(inner_text: str, scope_text: str) -> None:
    inner, scope = parse_selector(inner_text), parse_selector(scope_text)
    brute = all(scope.matches(lbl) for lbl in _ALL_LABELS if inner.matches(lbl))
    assert selector_within(inner, scope) is brute
