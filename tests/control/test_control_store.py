"""One contract suite for the store, run against SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import inspect

from edgewise.control import ConflictError, SqlStore, open_store
from edgewise.control._auditchain import GENESIS
from edgewise.control._schema import metadata


def _device(store: SqlStore, device_id: str = "dev-1", key: str = "k1") -> None:
    store.insert_device(
        {
            "id": device_id,
            "public_key": key,
            "labels": {"site": "a"},
            "capabilities": {},
            "status": "active",
            "enrolled_at": 1.0,
        }
    )


def test_migrated_schema_has_every_table(store: SqlStore) -> None:
    tables = set(inspect(store.engine).get_table_names())
    assert set(metadata.tables) <= tables
    assert "alembic_version" in tables


def test_meta_is_set_once(store: SqlStore) -> None:
    assert store.put_meta_if_absent("bootstrap", "1")
    assert not store.put_meta_if_absent("bootstrap", "2")
    assert store.get_meta("bootstrap") == "1"


def test_tokens_are_found_by_hash_and_revoked(store: SqlStore) -> None:
    store.insert_token(
        {
            "id": "t1",
            "name": "n",
            "role": "viewer",
            "scope": None,
            "token_hash": "h1",
            "created_at": 1.0,
            "created_by": "x",
            "revoked_at": None,
        }
    )
    assert store.token_by_hash("h1")["id"] == "t1"  # type: ignore[index]
    assert store.token_by_hash("nope") is None
    assert store.revoke_token("t1", 2.0)
    assert store.token_by_hash("h1")["revoked_at"] == 2.0  # type: ignore[index]
    assert not store.revoke_token("missing", 2.0)


def test_publisher_key_is_idempotent_and_conflicts_on_rebinding(store: SqlStore) -> None:
    assert store.add_publisher_key("kid", "AAA", "n", 1.0)
    assert not store.add_publisher_key("kid", "AAA", "n", 1.0)
    with pytest.raises(ConflictError):
        store.add_publisher_key("kid", "BBB", "n", 1.0)
    assert store.publisher_keys() == {"kid": "AAA"}


def test_enroll_token_uses_are_bounded_and_expire(store: SqlStore) -> None:
    store.insert_enroll_token(
        {
            "id": "e1",
            "token_hash": "eh",
            "labels": {"a": "b"},
            "expires_at": 100.0,
            "max_uses": 2,
            "uses": 0,
            "created_at": 1.0,
            "created_by": "x",
            "revoked": False,
        }
    )
    assert store.use_enroll_token("eh", 10.0)[0] is not None
    assert store.use_enroll_token("eh", 10.0)[0] is not None
    assert store.use_enroll_token("eh", 10.0) == (None, "used up")
    assert store.use_enroll_token("zz", 10.0) == (None, "unknown")
    store.insert_enroll_token(
        {
            "id": "e2",
            "token_hash": "eh2",
            "labels": {},
            "expires_at": 5.0,
            "max_uses": 2,
            "uses": 0,
            "created_at": 1.0,
            "created_by": "x",
            "revoked": False,
        }
    )
    assert store.use_enroll_token("eh2", 10.0) == (None, "expired")


def test_device_key_is_unique(store: SqlStore) -> None:
    _device(store)
    with pytest.raises(ConflictError):
        _device(store, "dev-2", "k1")
    assert store.device_ids() == ["dev-1"]


def test_desired_compare_and_set_refuses_a_stale_writer(store: SqlStore) -> None:
    _device(store)
    assert store.cas_desired("dev-1", "", 1, "h1", {"document": {}}, 2.0)
    assert not store.cas_desired("dev-1", "", 1, "h-other", {"document": {}}, 2.0)
    row = store.get_device("dev-1")
    assert row is not None
    assert (row["desired_revision"], row["desired_hash"]) == (1, "h1")
    assert ("dev-1", 2.0) in store.changed_since(1.5)


def test_change_stamps_round_trip_exactly(store: SqlStore) -> None:
    # The resync compares these with the stamps cache entries were built from: a float
    # that came back changed would drop every entry on every pass.
    _device(store)
    _device(store, "dev-2", "k2")
    stamp = 1_780_000_000.123456789
    assert store.set_labels("dev-2", {"a": "b"}, stamp)
    stamps = store.change_stamps()
    assert stamps["dev-2"] == stamp
    assert set(stamps) == {"dev-1", "dev-2"}
    row = store.get_device("dev-2")
    assert row is not None and row["changed_at"] == stamp


def test_labels_status_and_last_seen(store: SqlStore) -> None:
    _device(store)
    assert store.set_labels("dev-1", {"site": "b"}, 3.0)
    assert store.set_status("dev-1", "decommissioned", 4.0)
    store.touch_last_seen({"dev-1": 5.0})
    store.touch_last_seen({"dev-1": 4.0})  # older times never move last_seen back
    row = store.get_device("dev-1")
    assert row is not None
    assert (row["labels"], row["status"], row["last_seen"]) == (
        {"site": "b"},
        "decommissioned",
        5.0,
    )
    assert store.device_ids() == []


def test_report_replaces_pipelines_idempotently(store: SqlStore) -> None:
    _device(store)
    report = {
        "revision": 2,
        "pipelines": {
            "p": {
                "model": "m",
                "version": "1",
                "slot": "a",
                "status": "active",
                "reason": "",
                "timeline": [{"state": "active", "at": 1.0}],
            }
        },
        "errors": [],
        "agent": {},
    }
    store.save_report("dev-1", report, 9.0)
    store.save_report("dev-1", report, 9.0)
    rows = store.device_pipelines("dev-1")
    assert [(r["pipeline"], r["status"]) for r in rows] == [("p", "active")]


def _report(revision: int, status: str, pipelines: tuple[str, ...] = ("p",)) -> dict:
    return {
        "revision": revision,
        "pipelines": {
            name: {"model": "m", "version": str(revision), "slot": "a", "status": status,
                   "reason": "", "timeline": []}
            for name in pipelines
        },
        "errors": [f"e{revision}"],
        "agent": {"version": "x"},
    }  # fmt: skip


def test_save_reports_in_one_batch_keeps_each_devices_latest(store: SqlStore) -> None:
    _device(store, "dev-1", "k1")
    _device(store, "dev-2", "k2")
    store.save_report("dev-2", _report(1, "active", ("old", "p")), 5.0)
    store.save_reports(
        [
            ("dev-1", _report(3, "downloading"), 10.0),
            ("dev-2", _report(4, "failed"), 11.0),
            ("dev-1", _report(4, "active"), 12.0),  # later in the batch: wins
        ]
    )
    one, two = store.get_device("dev-1"), store.get_device("dev-2")
    assert one is not None and two is not None
    assert (one["report_revision"], one["reported_at"], one["report_errors"]) == (4, 12.0, ["e4"])
    assert (two["report_revision"], two["reported_at"], two["last_seen"]) == (4, 11.0, 11.0)
    rows = store.device_pipelines("dev-1")
    assert [(r["pipeline"], r["status"], r["version"]) for r in rows] == [("p", "active", "4")]
    # the batch replaced dev-2's pipelines: the one it no longer reports is gone
    assert [(r["pipeline"], r["status"]) for r in store.device_pipelines("dev-2")] == [
        ("p", "failed")
    ]
    store.save_reports([])  # nothing to do


def test_a_report_built_before_the_stored_one_is_ignored(store: SqlStore) -> None:
    # A slow retry, or a replay to another replica inside the signature's window, must
    # not put an older state back over a newer one (a rollout gate reads this state).
    _device(store)

    def state() -> tuple[int, float | None, list[tuple[str, str]]]:
        row = store.get_device("dev-1")
        assert row is not None
        pipes = [(r["pipeline"], r["status"]) for r in store.device_pipelines("dev-1")]
        return row["report_revision"], row["report_sent_at"], pipes

    store.save_report("dev-1", {**_report(2, "failed"), "sent_at": 10.5}, 11.0)
    store.save_report("dev-1", {**_report(1, "active", ("q",)), "sent_at": 10.25}, 12.0)
    assert state() == (2, 10.5, [("p", "failed")])
    store.save_report("dev-1", {**_report(3, "failed"), "sent_at": 10.5}, 13.0)  # a resend
    assert state() == (3, 10.5, [("p", "failed")])
    store.save_report("dev-1", _report(4, "active"), 14.0)  # no time: it never blocks
    assert state() == (4, 10.5, [("p", "active")])
    # In one batch the newest wins whatever the order it arrived in.
    store.save_reports(
        [
            ("dev-1", {**_report(6, "active"), "sent_at": 20.0}, 15.0),
            ("dev-1", {**_report(5, "failed"), "sent_at": 19.0}, 15.0),
        ]
    )
    assert state() == (6, 20.0, [("p", "active")])


def test_spec_vocabularies_are_stored_once_per_agent_build_and_rows_keep_the_digest(
    store: SqlStore,
) -> None:
    from edgewise.protocol import vocabulary_digest

    for i in range(1, 4):
        _device(store, f"dev-{i}", f"k{i}")
    old, new = ["model", "name"], ["batching", "model", "name"]

    def report(revision: int, terms: list[str] | None, digest: str | None = None) -> dict:
        digest = vocabulary_digest(terms or []) if digest is None else digest
        agent = {"version": "x", "spec_digest": digest, "spec_vocabulary": terms}
        return {**_report(revision, "active"), "agent": agent}

    store.save_reports(
        [
            ("dev-1", report(1, old), 1.0),
            ("dev-2", report(1, old), 1.0),  # the same build: one row
            ("dev-3", report(1, new), 1.0),
        ]
    )
    store.save_report("dev-1", report(2, old), 2.0)  # sent again (a restart): kept once
    row = store.get_device("dev-1")
    assert row is not None
    assert row["report_agent"] == {"version": "x", "spec_digest": vocabulary_digest(old)}
    found = store.vocabularies([vocabulary_digest(old), vocabulary_digest(new), "", "nope"])
    assert found == {vocabulary_digest(old): frozenset(old), vocabulary_digest(new): frozenset(new)}
    assert store.count("agent_vocabularies") == 2
    # Terms under a digest that is not theirs are not kept: a device cannot change what
    # the other devices of a build are judged by.
    store.save_report("dev-2", report(3, ["name"], digest=vocabulary_digest(new)), 3.0)
    assert store.vocabularies([vocabulary_digest(new)])[vocabulary_digest(new)] == frozenset(new)
    assert store.count("agent_vocabularies") == 2
    # A report older than the stored one (the device's clock went back) is not its
    # state, but what it says the agent knows still holds.
    store.save_report("dev-3", {**report(4, new), "sent_at": 50.0}, 4.0)
    upgraded = [*new, "sinks"]
    store.save_report("dev-3", {**report(5, upgraded), "sent_at": 10.0}, 5.0)
    row = store.get_device("dev-3")
    assert row is not None and row["report_revision"] == 4
    assert vocabulary_digest(upgraded) in store.vocabularies([vocabulary_digest(upgraded)])


def test_vocabularies_no_device_reports_are_forgotten_once_not_sent_for_a_while(
    store: SqlStore,
) -> None:
    from edgewise.protocol import vocabulary_digest

    _device(store, "dev-1", "k1")
    _device(store, "dev-2", "k2")

    def report(revision: int, terms: list[str]) -> dict:
        agent = {"spec_digest": vocabulary_digest(terms), "spec_vocabulary": terms}
        return {**_report(revision, "active"), "agent": agent}

    kept, made_up = ["model", "name"], [[f"made.up.{i}"] for i in range(5)]
    store.save_report("dev-1", {**report(1, kept), "sent_at": 50.0}, 10.0)
    # dev-2 makes up a vocabulary per report: only the one it reports last is its own.
    for i, terms in enumerate(made_up):
        store.save_report("dev-2", report(i + 1, terms), 10.0 + i)
    assert store.count("agent_vocabularies") == 6
    assert store.prune_vocabularies(before=5.0) == 0  # none old enough
    assert store.prune_vocabularies(before=100.0) == 4
    left = store.vocabularies([vocabulary_digest(t) for t in [kept, *made_up]])
    assert set(left) == {vocabulary_digest(kept), vocabulary_digest(made_up[-1])}
    # Sent again by another device (an agent restarted) keeps a vocabulary a while,
    # though no stored report names it (that device's report is older than its own).
    store.save_report("dev-2", report(9, made_up[0]), 200.0)
    store.save_report("dev-2", report(10, kept), 201.0)
    store.save_report("dev-1", {**report(2, made_up[0]), "sent_at": 1.0}, 300.0)
    assert store.prune_vocabularies(before=250.0) == 1  # made_up[-1]; made_up[0] was sent at 300
    assert store.prune_vocabularies(before=400.0) == 1  # made_up[0]: nobody names it
    assert set(store.vocabularies([vocabulary_digest(t) for t in [kept, *made_up]])) == {
        vocabulary_digest(kept)
    }


def test_capabilities_a_report_carries_replace_the_enrollments_in_arrival_order(
    store: SqlStore,
) -> None:
    # An upgraded agent or runtime: the device has other capabilities than it enrolled
    # with. Sent once per agent start, so the last to arrive is the newest process's,
    # even from a device whose clock went back.
    _device(store, "dev-1", "k1")
    _device(store, "dev-2", "k2")
    store.save_report("dev-1", {**_report(1, "active"), "sent_at": 50.0}, 1.0)
    newer = {"runtimes": {"onnxruntime": "1.21.0"}, "memory_mb": 4096}
    store.save_reports(
        [
            ("dev-1", {**_report(2, "active"), "sent_at": 10.0, "capabilities": newer}, 2.0),
            ("dev-2", {**_report(1, "active"), "capabilities": None}, 2.0),
        ]
    )
    one, two = store.get_device("dev-1"), store.get_device("dev-2")
    assert one is not None and two is not None
    assert one["capabilities"] == newer and one["report_revision"] == 1  # state: older
    assert two["capabilities"] == {}  # a report without them changes nothing


def test_newer_report_rule() -> None:
    from edgewise.control._store import newer_report

    assert newer_report(2.0, 1.0) and newer_report(1.0, 1.0)
    assert not newer_report(0.5, 1.0)
    assert newer_report(None, 1.0) and newer_report(0.5, None) and newer_report(None, None)


def test_batch_writers_of_the_same_devices_in_opposite_orders_never_deadlock(
    store: SqlStore, in_threads: Callable[..., list[BaseException]]
) -> None:
    # A replica's last-seen flush and another's report batch touch the same device rows.
    # Locked in arrival order they deadlock on PostgreSQL and one transaction is lost.
    ids = [f"dev-{i:03d}" for i in range(60)]
    for i, device_id in enumerate(ids):
        _device(store, device_id, f"k{i}")

    def flush_seen(round_: int) -> None:
        order = ids if round_ % 2 else ids[::-1]
        store.touch_last_seen({device_id: 100.0 + round_ for device_id in order})

    def save_batch(round_: int) -> None:
        order = ids[::-1] if round_ % 2 else ids
        store.save_reports([(device_id, _report(round_, "active"), 50.0) for device_id in order])

    assert in_threads(flush_seen, save_batch) == []
    row = store.get_device(ids[0])
    assert row is not None and row["report_revision"] == 14


def test_model_versions_are_immutable(store: SqlStore) -> None:
    row = {
        "name": "m",
        "version": "1.0.0",
        "sha256": "a" * 64,
        "size": 1,
        "manifest": {},
        "signers": [],
        "yanked": False,
        "pushed_at": 1.0,
        "pushed_by": "x",
    }
    assert store.insert_model(row) == "created"
    assert store.insert_model(row) == "same"
    with pytest.raises(ConflictError):
        store.insert_model({**row, "sha256": "b" * 64})
    assert store.set_yanked("m", "1.0.0", True)
    assert store.get_model("m", "1.0.0")["yanked"] is True  # type: ignore[index]
    assert store.yanked_among([("m", "1.0.0"), ("m", "9.9.9"), ("n", "1.0.0")]) == ["m@1.0.0"]
    assert store.yanked_among([]) == []
    assert store.set_yanked("m", "1.0.0", False)
    assert store.yanked_among([("m", "1.0.0")]) == []
    assert store.set_yanked("m", "1.0.0", True)
    assert store.model_by_sha("a" * 64) is not None


def test_deployment_create_is_idempotent_by_name_and_content(store: SqlStore) -> None:
    row = {
        "id": "d1",
        "name": "base",
        "selector": "",
        "priority": 0,
        "pipelines": {},
        "content_hash": "c1",
        "created_at": 1.0,
        "created_by": "x",
    }
    first, created = store.create_deployment(row)
    again, created_again = store.create_deployment({**row, "id": "d2"})
    assert created and not created_again and again["id"] == first["id"] == "d1"
    with pytest.raises(ConflictError):
        store.create_deployment({**row, "id": "d3", "content_hash": "c2"})
    second, _ = store.create_deployment({**row, "id": "d4", "name": "next"})
    assert second["seq"] > first["seq"]
    assert store.delete_deployment("d1")
    assert [d["id"] for d in store.list_deployments()] == ["d4"]


def _audit_record(seq: int, prev: str) -> dict[str, object]:
    return {
        "seq": seq,
        "at": 1.0,
        "actor": "a",
        "action": "x",
        "object": "o",
        "request_digest": "",
        "result": "ok",
        "prev_hash": prev,
        "hash": f"h{seq}",
    }


def test_audit_appends_chain_from_the_head(store: SqlStore) -> None:
    store.append_audit(_audit_record, GENESIS)
    store.append_audit(_audit_record, GENESIS)
    rows = store.list_audit()
    assert [(r["seq"], r["prev_hash"]) for r in rows] == [(1, GENESIS), (2, "h1")]


def test_two_stores_on_one_database_append_audit_records_as_one_chain(
    store_url: str, in_threads: Callable[..., list[BaseException]]
) -> None:
    """The CLI and a server (or two replicas) append at once: none is lost or refused."""

    one, two = open_store(store_url), open_store(store_url, run_migrations=False)
    try:
        errors = in_threads(
            lambda _: one.append_audit(_audit_record, GENESIS),
            lambda _: two.append_audit(_audit_record, GENESIS),
            rounds=25,
        )
        rows = one.list_audit()
    finally:
        one.close()
        two.close()
    assert errors == []
    assert [r["seq"] for r in rows] == list(range(1, 51))
    assert [r["prev_hash"] for r in rows] == [GENESIS] + [f"h{i}" for i in range(1, 50)]


def test_telemetry_is_stored_once_and_acks_contiguously(store: SqlStore) -> None:
    _device(store)
    rec = {"cls": "event", "ts": 1.0, "kind": "k", "data": {}}
    assert store.insert_telemetry("dev-1", [{**rec, "seq": 1}, {**rec, "seq": 3}], 1.0) == (2, 0, 1)
    assert store.insert_telemetry("dev-1", [{**rec, "seq": 3}, {**rec, "seq": 2}], 1.0) == (1, 1, 3)
    assert [r["seq"] for r in store.telemetry("dev-1")] == [1, 2, 3]
