from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from edgewise.control._auditchain import GENESIS, record_hash, verify_chain


def build_chain(n: int) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = []
    prev = GENESIS
    for i in range(1, n + 1):
        rec: dict[str, Any] = {
            "id": i,
            "at": f"2026-11-25T15:{i:02d}:00Z",
            "actor": "token:ops" if i % 2 else "device:d7",
            "action": "deployment.create",
            "object": f"deployment/{i}",
            "request_digest": f"{i:064x}",
            "result": {"status": 201},
        }
        rec["prev_hash"] = prev
        rec["hash"] = prev = record_hash(prev, rec)
        chain.append(rec)
    return chain


def test_intact_chain_verifies() -> None:
    assert verify_chain(build_chain(6)) is None
    assert verify_chain([]) is None


def test_hash_depends_on_every_field_and_the_previous_hash() -> None:
    rec = build_chain(1)[0]
    base = record_hash(GENESIS, rec)
    assert len(base) == 64
    for field in ("id", "at", "actor", "action", "object", "request_digest", "result"):
        assert record_hash(GENESIS, {**rec, field: "changed"}) != base
    assert record_hash("1" * 64, rec) != base


def test_hash_ignores_key_order_and_unhashed_fields() -> None:
    rec = build_chain(1)[0]
    reordered = dict(reversed(list(rec.items())))
    assert record_hash(GENESIS, reordered) == record_hash(GENESIS, {**rec, "extra": 1})


@pytest.mark.parametrize("index", [0, 2, 5])
@pytest.mark.parametrize("field", ["actor", "at", "result", "id"])
def test_edit_is_detected_at_the_edited_record(index: int, field: str) -> None:
    chain = build_chain(6)
    chain[index][field] = 999 if field == "id" else "forged"
    assert verify_chain(chain) == index


def test_edit_with_recomputed_hash_is_detected_at_the_next_record() -> None:
    chain = build_chain(6)
    chain[2]["actor"] = "forged"
    chain[2]["hash"] = record_hash(chain[2]["prev_hash"], chain[2])
    assert verify_chain(chain) == 3


@pytest.mark.parametrize("index", [0, 3])
def test_delete_is_detected_where_the_gap_is(index: int) -> None:
    chain = build_chain(6)
    del chain[index]
    assert verify_chain(chain) == index


def test_delete_at_the_end_needs_the_head_hash() -> None:
    chain = build_chain(6)
    head = chain[-1]["hash"]
    truncated = chain[:-1]
    assert verify_chain(truncated) is None  # a chain alone cannot see its missing tail
    assert verify_chain(truncated, head=head) == 5
    assert verify_chain(chain, head=head) is None


@pytest.mark.parametrize(("i", "j"), [(0, 1), (2, 4), (4, 5)])
def test_reorder_is_detected_at_the_first_moved_record(i: int, j: int) -> None:
    chain = build_chain(6)
    chain[i], chain[j] = chain[j], chain[i]
    assert verify_chain(chain) == i


def test_insert_of_forged_record_is_detected() -> None:
    chain = build_chain(6)
    forged = {**chain[2], "actor": "intruder"}
    chain.insert(3, forged)
    assert verify_chain(chain) == 3


def test_insert_with_valid_links_is_detected_at_the_following_record() -> None:
    chain = build_chain(6)
    forged: dict[str, Any] = {**chain[2], "id": 4, "actor": "intruder"}
    forged["prev_hash"] = chain[2]["hash"]
    forged["hash"] = record_hash(forged["prev_hash"], forged)
    chain.insert(3, forged)
    assert verify_chain(chain) == 4  # the original record 4 no longer follows


def test_suffix_verifies_from_its_start_hash() -> None:
    chain = build_chain(6)
    assert verify_chain(chain[3:], start_hash=chain[2]["hash"]) is None
    assert verify_chain(chain[3:]) == 0


def test_non_json_fields_are_refused_and_reported_as_broken() -> None:
    rec = build_chain(1)[0]
    with pytest.raises(TypeError):
        record_hash(GENESIS, {**rec, "at": dt.datetime(2026, 1, 1)})
    assert verify_chain([{**rec, "at": dt.datetime(2026, 1, 1)}]) == 0


def test_non_integer_or_missing_id_is_broken() -> None:
    chain = build_chain(2)
    del chain[1]["id"]
    assert verify_chain(chain) == 1


def test_hash_is_sha256_of_canonical_json_with_prev_hash() -> None:
    import hashlib

    from edgewise.bundle import canonical_json

    rec = build_chain(1)[0]
    body = {k: rec[k] for k in ("id", "at", "actor", "action", "object", "request_digest")}
    body |= {"result": rec["result"], "prev_hash": GENESIS}
    assert record_hash(GENESIS, rec) == hashlib.sha256(canonical_json(body)).hexdigest()
