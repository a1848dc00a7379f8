"""Trust root documents built to hurt whoever checks them: what verification must survive."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import key_id
from edgewise.protocol import (
    TrustRootError,
    advance_trust_root,
    sign_trust_root,
    trust_root_document,
    verify_trust_root,
)

ROOT, NEXT, OTHER = (Ed25519PrivateKey.generate() for _ in range(3))


def _doc(version: int, root: Ed25519PrivateKey = ROOT) -> dict[str, Any]:
    return trust_root_document(version, [root.public_key()], 1, [OTHER.public_key()], 1.0)


def test_a_document_nested_past_the_encoder_is_refused_not_raised_through() -> None:
    # Before: RecursionError escaped verify_trust_root (it caught TypeError and
    # ValueError only), so whoever checked such a document crashed instead of refusing.
    doc = _doc(1)
    nested: Any = {}
    for _ in range(5000):
        nested = {"n": nested}
    doc["notes"] = nested
    signed = {"document": doc, "signatures": [{"key_id": key_id(ROOT), "signature": "AAAA"}]}
    with pytest.raises(TrustRootError, match="nested too deeply"):
        verify_trust_root(signed, None)
    assert advance_trust_root([signed], None) == (
        None,
        "document is not canonical JSON: nested too deeply",
    )


def test_signatures_are_kept_as_plain_pairs_one_per_key_and_nothing_else() -> None:
    # Before: the signatures were kept as received (extra fields, repeats, entries of
    # any size), and every holder passed them on: the control plane into every device's
    # desired document, the device into trust.json.
    v1 = sign_trust_root(_doc(1), [ROOT])
    padded = copy.deepcopy(v1)
    padded["signatures"][0]["padding"] = "x" * 10_000
    padded["signatures"] += [
        {"key_id": key_id(OTHER), "signature": "AAAA", "more": [[[]]]},
        {"key_id": "someone", "signature": "QUJD" * 100},
        {"key_id": "k" * 5000, "signature": padded["signatures"][0]["signature"]},
        dict(v1["signatures"][0]),
    ]
    held = verify_trust_root(padded, None)
    assert held.signed == v1
    assert verify_trust_root(held.signed, None).version == 1


def test_a_holder_of_no_version_passes_on_the_signatures_older_roots_need() -> None:
    # A control plane restored without its chain checks v2 against nothing: the
    # signature of v1's root key (which it cannot check) must still reach devices that
    # hold v1, or none of them could take v2.
    doc2 = trust_root_document(2, [NEXT.public_key()], 1, [OTHER.public_key()], 2.0)
    v2 = sign_trust_root(doc2, [ROOT, NEXT])
    fresh = verify_trust_root(v2, None)
    assert fresh.signed == v2
    device_holds = verify_trust_root(sign_trust_root(_doc(1), [ROOT]), None)
    assert verify_trust_root(fresh.signed, device_holds).version == 2
    assert advance_trust_root([fresh.signed], device_holds)[1] == ""
