"""Kubernetes label selectors: parse, match, print canonically, compare scopes.

Grammar (the Kubernetes one, without the numeric `<`/`>` operators)::

    selector    := "" | requirement ("," requirement)*
    requirement := "!" KEY | KEY | KEY ("=" | "==" | "!=") VALUE
                 | KEY ("in" | "notin") "(" VALUE ("," VALUE)* ")"

Commas inside parentheses belong to the value set. Whitespace around tokens is ignored.
An empty selector matches every label set. `k!=v` and `k notin (...)` also match label
sets that lack `k`, as in Kubernetes.

Example::

    >>> sel = parse_selector("site in (store-1, store-2), hw=jetson-orin, !retired")
    >>> sel.matches({"site": "store-2", "hw": "jetson-orin"})
    True
    >>> str(sel)
    'hw=jetson-orin,!retired,site in (store-1,store-2)'
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "LabelError",
    "Operator",
    "Requirement",
    "Selector",
    "SelectorError",
    "parse_selector",
    "selector_within",
    "validate_label_key",
    "validate_label_value",
    "validate_labels",
]

_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SPECIAL = frozenset(",()=!")


class SelectorError(ValueError):
    """A selector or label that does not follow the Kubernetes syntax."""


class LabelError(SelectorError):
    """An invalid label key or value (a kind of selector error, so one except catches both)."""


class Operator(enum.StrEnum):
    """Requirement operators; the value is how the canonical form prints them."""

    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!"


# Printing order inside one key, so that `str()` is canonical.
_OP_ORDER = {op: i for i, op in enumerate(Operator)}


def validate_label_key(key: str) -> None:
    """Check a label key: `[prefix/]name`, name <= 63 chars, prefix a DNS subdomain <= 253.

    Raises:
        LabelError: naming what is wrong with the key.
    """
    if not isinstance(key, str) or not key:
        raise LabelError("label key must be a non-empty string")
    prefix, sep, name = key.rpartition("/")
    if sep:
        if not prefix:
            raise LabelError(f"label key {key!r}: prefix before '/' is empty")
        if len(prefix) > 253:
            raise LabelError(f"label key {key!r}: prefix longer than 253 characters")
        if not all(_DNS_LABEL_RE.match(part) for part in prefix.split(".")):
            raise LabelError(f"label key {key!r}: prefix {prefix!r} is not a DNS subdomain")
    if not name:
        raise LabelError(f"label key {key!r}: name is empty")
    if len(name) > 63:
        raise LabelError(f"label key {key!r}: name longer than 63 characters")
    if not _NAME_RE.match(name):
        raise LabelError(
            f"label key {key!r}: name must be alphanumeric, '-', '_' or '.', "
            "starting and ending with an alphanumeric character"
        )


def validate_label_value(value: str) -> None:
    """Check a label value: empty, or <= 63 chars of [A-Za-z0-9._-] starting/ending alnum.

    Raises:
        LabelError: naming what is wrong with the value.
    """
    if not isinstance(value, str):
        raise LabelError(f"label value {value!r} must be a string")
    if value == "":
        return
    if len(value) > 63:
        raise LabelError(f"label value {value!r}: longer than 63 characters")
    if not _NAME_RE.match(value):
        raise LabelError(
            f"label value {value!r}: must be alphanumeric, '-', '_' or '.', "
            "starting and ending with an alphanumeric character"
        )


def validate_labels(labels: Mapping[str, str]) -> None:
    """Check every key and value of a label set.

    Raises:
        LabelError: for the first invalid key or value.
    """
    if not isinstance(labels, Mapping):
        raise LabelError("labels must be a mapping of strings to strings")
    for key, value in labels.items():
        validate_label_key(key)
        try:
            validate_label_value(value)
        except LabelError as exc:
            raise LabelError(f"label {key!r}: {exc}") from None


@dataclass(frozen=True)
class Requirement:
    """One condition of a selector; `values` is sorted and deduplicated."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set satisfies this requirement."""
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case Operator.EXISTS:
                return present
            case Operator.NOT_EXISTS:
                return not present
            case Operator.EQUALS | Operator.IN:
                return present and value in self.values
            case Operator.NOT_EQUALS | Operator.NOT_IN:
                return not present or value not in self.values
        raise AssertionError(self.operator)  # pragma: no cover

    def _sort_key(self) -> tuple[str, int, tuple[str, ...]]:
        return (self.key, _OP_ORDER[self.operator], self.values)

    def __str__(self) -> str:
        match self.operator:
            case Operator.EXISTS:
                return self.key
            case Operator.NOT_EXISTS:
                return f"!{self.key}"
            case Operator.EQUALS | Operator.NOT_EQUALS:
                return f"{self.key}{self.operator.value}{self.values[0]}"
            case _:
                return f"{self.key} {self.operator.value} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """A conjunction of requirements, kept sorted (so equal selectors compare equal)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label set satisfies every requirement (always true when empty)."""
        return all(req.matches(labels) for req in self.requirements)

    @property
    def is_empty(self) -> bool:
        """True for the selector that matches everything."""
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(req) for req in self.requirements)


# ----------------------------------------------------------------------------- lexer


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "=", "==", "!=", "!", "(", ")", ",", "end"
    text: str
    pos: int  # 1-based character position, for error messages

    def describe(self) -> str:
        return "end of selector" if self.kind == "end" else repr(self.text)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "(),":
            tokens.append(_Token(ch, ch, i + 1))
            i += 1
        elif ch == "=":
            op = "==" if text.startswith("==", i) else "="
            tokens.append(_Token(op, op, i + 1))
            i += len(op)
        elif ch == "!":
            op = "!=" if text.startswith("!=", i) else "!"
            tokens.append(_Token(op, op, i + 1))
            i += len(op)
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            tokens.append(_Token("ident", text[start:i], start + 1))
    tokens.append(_Token("end", "", n + 1))
    return tokens


# ---------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def fail(self, tok: _Token, expected: str) -> SelectorError:
        return SelectorError(f"position {tok.pos}: expected {expected}, found {tok.describe()}")

    def key(self) -> str:
        tok = self.take()
        if tok.kind != "ident":
            raise self.fail(tok, "a label key")
        try:
            validate_label_key(tok.text)
        except LabelError as exc:
            raise SelectorError(f"position {tok.pos}: {exc}") from None
        return tok.text

    def value(self) -> str:
        tok = self.peek()
        if tok.kind in {",", ")", "end"}:
            return ""  # `k=` selects the empty value, as in Kubernetes
        tok = self.take()
        if tok.kind != "ident":
            raise self.fail(tok, "a label value")
        try:
            validate_label_value(tok.text)
        except LabelError as exc:
            raise SelectorError(f"position {tok.pos}: {exc}") from None
        return tok.text

    def value_set(self, key: str) -> tuple[str, ...]:
        tok = self.take()
        if tok.kind != "(":
            raise self.fail(tok, f"'(' to open the value set of {key!r}")
        if self.peek().kind == ")":
            raise SelectorError(f"position {self.peek().pos}: empty value set for {key!r}")
        values = [self.value()]
        while True:
            tok = self.take()
            if tok.kind == ")":
                return tuple(sorted(set(values)))
            if tok.kind != ",":
                raise self.fail(tok, f"',' or ')' in the value set of {key!r}")
            values.append(self.value())

    def requirement(self) -> Requirement:
        if self.peek().kind == "!":
            self.take()
            return Requirement(self.key(), Operator.NOT_EXISTS)
        key = self.key()
        tok = self.peek()
        if tok.kind in {",", "end"}:
            return Requirement(key, Operator.EXISTS)
        self.take()
        if tok.kind in {"=", "=="}:
            return Requirement(key, Operator.EQUALS, (self.value(),))
        if tok.kind == "!=":
            return Requirement(key, Operator.NOT_EQUALS, (self.value(),))
        if tok.kind == "ident" and tok.text == "in":
            return Requirement(key, Operator.IN, self.value_set(key))
        if tok.kind == "ident" and tok.text == "notin":
            return Requirement(key, Operator.NOT_IN, self.value_set(key))
        raise self.fail(tok, f"an operator (=, ==, !=, in, notin) or ',' after key {key!r}")

    def selector(self) -> Selector:
        if self.peek().kind == "end":
            return Selector()
        reqs = {self.requirement()}
        while True:
            tok = self.take()
            if tok.kind == "end":
                break
            if tok.kind != ",":
                raise self.fail(tok, "',' between requirements")
            if self.peek().kind == "end":
                raise self.fail(self.peek(), "a requirement after ','")
            reqs.add(self.requirement())
        return Selector(tuple(sorted(reqs, key=Requirement._sort_key)))


def parse_selector(text: str) -> Selector:
    """Parse a selector string.

    Args:
        text: Kubernetes label-selector syntax; empty or blank selects everything.

    Returns:
        The selector, its requirements sorted and deduplicated.

    Raises:
        SelectorError: naming the 1-based position and the offending token.
    """
    if not isinstance(text, str):
        raise SelectorError("selector must be a string")
    return _Parser(text).selector()


# ------------------------------------------------------------------- scope containment


@dataclass(frozen=True)
class _Domain:
    """The states a requirement allows for one key: absent, and a value set.

    `values` is finite when `cofinite` is false, otherwise it lists the excluded values.
    Label sets are products over keys, so containment of conjunctions reduces to
    containment of these per-key domains, which is exact.
    """

    absent_ok: bool
    values: frozenset[str]
    cofinite: bool

    def __and__(self, other: _Domain) -> _Domain:
        absent = self.absent_ok and other.absent_ok
        if not self.cofinite and not other.cofinite:
            return _Domain(absent, self.values & other.values, False)
        if self.cofinite and other.cofinite:
            return _Domain(absent, self.values | other.values, True)
        finite, co = (other, self) if self.cofinite else (self, other)
        return _Domain(absent, finite.values - co.values, False)

    def is_empty(self) -> bool:
        return not self.absent_ok and not self.cofinite and not self.values

    def __le__(self, other: _Domain) -> bool:
        if self.absent_ok and not other.absent_ok:
            return False
        if not self.cofinite:
            if other.cofinite:
                return not (self.values & other.values)
            return self.values <= other.values
        # An infinite value set never fits in a finite one.
        return other.cofinite and other.values <= self.values


_EVERYTHING = _Domain(True, frozenset(), True)


def _domain(req: Requirement) -> _Domain:
    vals = frozenset(req.values)
    match req.operator:
        case Operator.EQUALS | Operator.IN:
            return _Domain(False, vals, False)
        case Operator.NOT_EQUALS | Operator.NOT_IN:
            return _Domain(True, vals, True)
        case Operator.EXISTS:
            return _Domain(False, frozenset(), True)
        case Operator.NOT_EXISTS:
            return _Domain(True, frozenset(), False)
    raise AssertionError(req.operator)  # pragma: no cover


def _domains(sel: Selector) -> dict[str, _Domain]:
    out: dict[str, _Domain] = {}
    for req in sel.requirements:
        out[req.key] = out.get(req.key, _EVERYTHING) & _domain(req)
    return out


def selector_within(inner: Selector, scope: Selector) -> bool:
    """Whether every label set matching `inner` also matches `scope`.

    Used to keep a scoped token's deployments inside its scope: an operator scoped to
    `site=store-12` may target `site=store-12,hw=x` but not `hw=x`. The check is exact
    for this grammar; an unsatisfiable `inner` (e.g. `a=1,a=2`) is within any scope.
    """
    inner_d, scope_d = _domains(inner), _domains(scope)
    if any(d.is_empty() for d in inner_d.values()):
        return True
    return all(inner_d.get(key, _EVERYTHING) <= dom for key, dom in scope_d.items())
