"""Audit chain: every mutation is recorded; tampering in the database is detected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from .conftest import Plane


def _populate(p: Plane) -> None:
    p.token("viewer", name="v1")
    p.token("operator", name="o1")
    p.enroll(labels={"site": "a"})
    p.token("publisher", name="p1")


def _engine(p: Plane) -> Any:
    return p.client.app.state.plane.store.engine  # type: ignore[attr-defined]


def _edit(conn: Any) -> None:
    conn.execute(text("UPDATE audit SET actor = 'mallory' WHERE seq = 3"))


def _delete(conn: Any) -> None:
    conn.execute(text("DELETE FROM audit WHERE seq = 3"))


def _reorder(conn: Any) -> None:
    conn.execute(text("UPDATE audit SET seq = -1 WHERE seq = 2"))
    conn.execute(text("UPDATE audit SET seq = 2 WHERE seq = 3"))
    conn.execute(text("UPDATE audit SET seq = 3 WHERE seq = -1"))


def _edit_result(conn: Any) -> None:
    conn.execute(text("UPDATE audit SET result = 'tampered' WHERE seq = 4"))


def test_mutations_are_recorded_and_the_chain_verifies(plane: Plane) -> None:
    _populate(plane)
    records = plane.api("GET", "/api/v1/audit").json()
    actions = [r["action"] for r in records]
    assert actions[:1] == ["token.create"] and "device.enroll" in actions
    assert all(r["request_digest"] is not None for r in records)
    assert plane.api("GET", "/api/v1/audit/verify").json()["ok"] is True


@pytest.mark.parametrize(
    ("tamper", "first_broken"), [(_edit, 3), (_delete, 4), (_reorder, 2), (_edit_result, 4)]
)
def test_tampering_is_detected_and_names_the_first_broken_record(
    plane: Plane, tamper: Callable[[Any], None], first_broken: int
) -> None:
    _populate(plane)
    with _engine(plane).begin() as conn:
        tamper(conn)
    result = plane.api("GET", "/api/v1/audit/verify").json()
    assert result["ok"] is False
    assert result["first_broken_id"] == first_broken


def test_deleting_the_newest_record_is_detected(plane: Plane) -> None:
    _populate(plane)
    with _engine(plane).begin() as conn:
        conn.execute(text("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)"))
    result = plane.api("GET", "/api/v1/audit/verify").json()
    assert result["ok"] is False
