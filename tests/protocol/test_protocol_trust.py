"""The signed trust root: versions chained by root keys, never back, never forged (pure)."""

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

ROOT_A, ROOT_B, ROOT_C, ATTACKER = (Ed25519PrivateKey.generate() for _ in range(4))
PUB_1, PUB_2, PUB_3 = (Ed25519PrivateKey.generate() for _ in range(3))


def _root(
    version: int,
    roots: list[Ed25519PrivateKey],
    publishers: list[Ed25519PrivateKey],
    signers: list[Ed25519PrivateKey],
    threshold: int = 1,
) -> dict[str, Any]:
    doc = trust_root_document(
        version,
        [k.public_key() for k in roots],
        threshold,
        [k.public_key() for k in publishers],
        1_700_000_000.0 + version,
    )
    return sign_trust_root(doc, signers)


V1 = _root(1, [ROOT_A], [PUB_1], [ROOT_A])


def test_a_first_version_is_taken_on_its_own_root_keys() -> None:
    root = verify_trust_root(V1, None)
    assert (root.version, set(root.publishers)) == (1, {key_id(PUB_1)})


def test_a_new_version_signed_by_the_held_root_changes_the_publishers() -> None:
    v1 = verify_trust_root(V1, None)
    v2 = verify_trust_root(_root(2, [ROOT_A], [PUB_2, PUB_3], [ROOT_A]), v1)
    assert set(v2.publishers) == {key_id(PUB_2), key_id(PUB_3)}  # PUB_1 revoked


def test_root_keys_rotate_only_with_the_old_and_the_new_signing() -> None:
    v1 = verify_trust_root(V1, None)
    with pytest.raises(TrustRootError, match="root keys of version 1"):
        verify_trust_root(_root(2, [ROOT_B], [PUB_2], [ROOT_B]), v1)  # a new root alone
    with pytest.raises(TrustRootError, match="its own root keys"):
        verify_trust_root(_root(2, [ROOT_B], [PUB_2], [ROOT_A]), v1)  # the old alone
    v2 = verify_trust_root(_root(2, [ROOT_B], [PUB_2], [ROOT_A, ROOT_B]), v1)
    v3 = verify_trust_root(_root(3, [ROOT_B], [PUB_3], [ROOT_B]), v2)  # ROOT_A retired
    assert v3.version == 3 and set(v3.root_keys) == {key_id(ROOT_B)}


def test_a_threshold_counts_distinct_valid_signatures() -> None:
    v1 = verify_trust_root(_root(1, [ROOT_A, ROOT_B, ROOT_C], [PUB_1], [ROOT_A, ROOT_B], 2), None)
    one = _root(2, [ROOT_A, ROOT_B, ROOT_C], [PUB_2], [ROOT_A], 2)
    one["signatures"] = one["signatures"] * 2  # the same signature twice is one signer
    with pytest.raises(TrustRootError, match="signed by 2"):
        verify_trust_root(one, v1)
    two = _root(2, [ROOT_A, ROOT_B, ROOT_C], [PUB_2], [ROOT_B, ROOT_C], 2)
    assert verify_trust_root(two, v1).version == 2


def test_versions_never_go_back_and_a_repeat_must_match() -> None:
    v1 = verify_trust_root(V1, None)
    v2 = verify_trust_root(_root(2, [ROOT_A], [PUB_2], [ROOT_A]), v1)
    with pytest.raises(TrustRootError, match="older"):
        verify_trust_root(V1, v2)  # a captured old version, replayed
    with pytest.raises(TrustRootError, match="other content"):
        verify_trust_root(_root(2, [ROOT_A], [PUB_3], [ROOT_A]), v2)
    assert verify_trust_root(copy.deepcopy(v2.signed), v2) is v2  # delivered again: a no-op


def test_a_document_changed_after_signing_is_refused() -> None:
    forged = copy.deepcopy(V1)
    attacker = trust_root_document(1, [], 1, [ATTACKER.public_key()], 0)["publishers"]
    forged["document"]["publishers"].update(attacker)
    with pytest.raises(TrustRootError, match="not signed"):
        verify_trust_root(forged, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["document"].update(type="other"), "document.type"),
        (lambda s: s["document"].update(version=0), "document.version"),
        (lambda s: s["document"].update(version=True), "document.version"),
        (lambda s: s["document"].update(version=2.0), "document.version"),
        (lambda s: s["document"]["root"].update(threshold=2), "threshold"),
        (lambda s: s["document"]["root"].update(threshold=0), "threshold"),
        (lambda s: s["document"].update(publishers={}), "empty"),
        (lambda s: s["document"].update(publishers=[]), "object"),
        (lambda s: s["document"]["publishers"].update({"00ff": "AAAA"}), "not a base64"),
        (lambda s: s["document"]["root"].update(keys={"x" * 16: "@@"}), "not a base64"),
        (
            lambda s: s["document"]["publishers"].update(
                {"0" * 16: s["document"]["root"]["keys"][key_id(ROOT_A)]}
            ),
            "not its key's id",
        ),
        (
            lambda s: s["document"]["publishers"].update({f"k{i}": "x" for i in range(65)}),
            "at most",
        ),
        (lambda s: s["document"].update(control_plane={}), "control_plane is empty"),
        (lambda s: s["document"].update(control_plane={"ab": "x"}), "control_plane"),
        (lambda s: s.update(signatures=[]), "signatures"),
        (lambda s: s.update(signatures=[{"key_id": "a"}]), "signature"),
        (lambda s: s.update(signatures=[{"key_id": "a", "signature": "%%"}]), "signature"),
        (lambda s: s.pop("document"), "document.type"),
        (lambda s: s["document"].update(issued_at=float("nan")), "canonical"),
    ],
)
def test_malformed_trust_roots_are_refused_with_the_reason(change: Any, message: str) -> None:
    bad = copy.deepcopy(V1)
    change(bad)
    with pytest.raises(TrustRootError, match=message):
        verify_trust_root(bad, None)


@pytest.mark.parametrize("junk", [None, [], "x", 1, {"document": "x", "signatures": []}])
def test_things_that_are_no_trust_root_at_all_are_refused(junk: Any) -> None:
    with pytest.raises(TrustRootError):
        verify_trust_root(junk, None)


def test_a_device_behind_two_rotations_walks_the_chain_to_the_newest() -> None:
    v2 = _root(2, [ROOT_B], [PUB_2], [ROOT_A, ROOT_B])
    v3 = _root(3, [ROOT_C], [PUB_3], [ROOT_B, ROOT_C])
    v1 = verify_trust_root(V1, None)
    held, problem = advance_trust_root([v3, V1, v2], v1)  # any order
    assert held is not None and (held.version, problem) == (3, "")
    assert set(held.publishers) == {key_id(PUB_3)}
    fresh, problem = advance_trust_root([v3, V1, v2], None)  # no trust root yet: from v1
    assert fresh is not None and (fresh.version, problem) == (3, "")


def test_a_forged_link_stops_the_walk_at_the_last_good_version() -> None:
    v1 = verify_trust_root(V1, None)
    v2 = _root(2, [ROOT_A], [PUB_2], [ROOT_A])
    forged = _root(3, [ATTACKER], [ATTACKER], [ATTACKER])  # a control plane broken into
    held, problem = advance_trust_root([V1, v2, forged], v1)
    assert held is not None and held.version == 2 and "root keys of version 2" in problem
    assert key_id(ATTACKER) not in held.publishers
    same, problem = advance_trust_root("not a list" * 10, v1)  # type: ignore[arg-type]
    assert same is v1 and problem


def test_a_trust_root_may_name_the_control_plane_keys() -> None:
    cp_old, cp_new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    doc = trust_root_document(
        1, [ROOT_A.public_key()], 1, [PUB_1.public_key()], 0.0,
        control_plane=[cp_old.public_key(), cp_new.public_key()],
    )  # fmt: skip
    root = verify_trust_root(sign_trust_root(doc, [ROOT_A]), None)
    assert set(root.control_plane) == {key_id(cp_old), key_id(cp_new)}
    assert verify_trust_root(V1, None).control_plane == {}  # not named: devices keep theirs
