"""The audit chain: each record holds the hash of the one before it.

A record is a mapping with the fields `id` (consecutive integers), `at`, `actor`,
`action`, `object`, `request_digest`, `result` (JSON values: store `at` as an ISO-8601
string or a number, so it reads back from any database unchanged), plus `prev_hash`
and `hash`. Appending::

    prev = last["hash"] if last else GENESIS
    rec = {"id": n, "at": ..., "actor": ..., ...}
    rec["prev_hash"] = prev
    rec["hash"] = record_hash(prev, rec)

Editing any field, deleting, reordering or inserting records breaks the chain at (or
right after) the tampered position, and `verify_chain` names the first broken index.
Deleting records from the *end* leaves a valid shorter chain; pass the head hash kept
elsewhere (e.g. in the latest signed state) as `head` to catch that too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from edgewise.bundle import canonical_json

__all__ = ["GENESIS", "HASHED_FIELDS", "record_hash", "verify_chain"]

GENESIS = "0" * 64
HASHED_FIELDS = ("id", "at", "actor", "action", "object", "request_digest", "result")


def _canonical(obj: Any) -> bytes:
    # The same canonical form as bundle manifests (RFC 8785 style), so the chain can be
    # re-verified by any JCS implementation, not only this one.
    try:
        return canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"audit record fields must be plain JSON values: {exc}") from None


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a record's hashed fields chained to the previous hash.

    Args:
        prev_hash: The previous record's `hash`, or `GENESIS` for the first record.
        record: The record; fields other than `HASHED_FIELDS` are ignored and missing
            ones hash as null.

    Raises:
        TypeError: if a hashed field is not a plain JSON value (e.g. a datetime).
    """
    body = {name: record.get(name) for name in HASHED_FIELDS}
    body["prev_hash"] = prev_hash
    return hashlib.sha256(_canonical(body)).hexdigest()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def verify_chain(
    records: Sequence[Mapping[str, Any]],
    *,
    start_hash: str = GENESIS,
    head: str | None = None,
    appended_since_head: bool = False,
) -> int | None:
    """Find the first broken record of a chain, in stored order.

    A record is broken when its `prev_hash` is not the previous record's `hash` (or
    `start_hash` for the first), when its `hash` does not match its content, or when
    its `id` does not follow the previous id by exactly one.

    Args:
        records: The records in id order, as stored.
        start_hash: The hash before the first record (`GENESIS` for a whole chain; the
            preceding record's hash when verifying a suffix).
        head: The expected hash of the last record, if known; a mismatch with an
            otherwise valid chain reports `len(records)` (records missing at the end).
        appended_since_head: `head` was read before `records`, while writers may have
            appended: `head` must then be the hash of *some* record (the records after
            it are newer appends, checked by their links), not necessarily the last.

    Returns:
        The index of the first broken record, or None when the chain holds.
    """
    prev_hash = start_hash
    prev_id: int | None = None
    head_seen = head == start_hash
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            return index
        rec_id = _as_int(record.get("id"))
        if rec_id is None or (prev_id is not None and rec_id != prev_id + 1):
            return index
        if record.get("prev_hash") != prev_hash:
            return index
        try:
            expected = record_hash(prev_hash, record)
        except TypeError:
            return index
        if record.get("hash") != expected:
            return index
        prev_hash, prev_id = expected, rec_id
        head_seen = head_seen or expected == head
    if head is not None and prev_hash != head and not (appended_since_head and head_seen):
        return len(records)
    return None
