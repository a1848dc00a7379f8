"""Upgrades, rollbacks and start-up faults of the control plane's database.

Old databases are built with `migrate(engine, "000N")` and filled with plain SQL in the
shape that revision's code wrote; then the current code upgrades them and serves them.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, MetaData, Table, insert, inspect, select, text

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from edgewise.control import Settings, create_app, migrate, open_store
from edgewise.control._auditchain import GENESIS, record_hash
from edgewise.control._identity import hash_token
from edgewise.control._migrate import head_revision, known_revisions
from edgewise.control._store import _engine
from edgewise.protocol import sign_request, vocabulary_digest

from .conftest import pubkey_b64

EDGEWISE = str(Path(sys.executable).parent / "edgewise")
OLD = sorted(r for r in known_revisions() if r != head_revision())
ADMIN = "ewo_0123456789ab_" + "s" * 43
ENROLL = "ewe_abcdef012345_" + "e" * 43
TERMS = ["preprocess:resize", "postprocess:top_k", "source:camera"]


# ---------------------------------------------------------------- old databases
def _table(conn: Any, name: str) -> Table:
    """The table as this revision has it (reflected: a column it lacks is an error)."""
    return Table(name, MetaData(), autoload_with=conn)


def _put(conn: Any, name: str, *rows: dict[str, Any]) -> None:
    conn.execute(insert(_table(conn, name)), list(rows))


def _audit_rows(now: float, n: int) -> tuple[list[dict[str, Any]], str]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        rec = {
            "id": seq,
            "at": now + seq,
            "actor": "bootstrap" if seq == 1 else "token:admin(0123456789ab)",
            "action": "token.create" if seq == 1 else "device.label",
            "object": f"object:{seq}",
            "request_digest": "d" * 64,
            "result": "ok",
        }
        h = record_hash(prev, rec)
        rows.append(
            {**{k: v for k, v in rec.items() if k != "id"}, "seq": seq}
            | {
                "prev_hash": prev,
                "hash": h,
            }
        )
        prev = h
    return rows, prev


def _rollout_document(devices: list[str], now: float) -> dict[str, Any]:
    """A running rollout as the 0002-era engine stored it (the shape 0488a90 wrote).

    Canary `devices[0]` notified, the wave `devices[1]` pending.
    """
    gates = {
        "success_pct": 90.0,
        "error_pct": 10.0,
        "min_reporting": 1,
        "max_latency_ratio": None,
        "max_error_rate_delta": None,
        "max_confidence_shift": None,
        "confidence_metric": "js",
        "max_input_drift": None,
        "min_inferences": 100,
    }
    spec = {
        "canary": 1,
        "waves": [100],
        "strata_keys": ["hw", "site"],
        "gates": gates,
        "soak_s": 0,
        "on_breach": "rollback",
        "require_approval": [],
        "rate_per_min": None,
        "rate_ramp": 1.0,
        "device_timeout_s": 600.0,
        "gate_timeout_s": None,
    }
    reporting = {
        "name": "reporting",
        "value": 0.0,
        "threshold": 1.0,
        "outcome": "insufficient",
        "detail": "0/1 reported",
    }
    return {
        "id": "ro-000000000001",
        "deployment": "dep-000000000001",
        "from_revision": 1,
        "to_revision": 2,
        "spec": spec,
        "phases": [[devices[0]], [devices[1]]],
        "state": "running",
        "phase_index": 0,
        "phase_states": ["soaking", "pending"],
        "devices": {
            devices[0]: ["notified", 0, now, now, "notified"],
            devices[1]: ["pending", 1, None, None, ""],
        },
        "created_at": now,
        "phase_started_at": now,
        "soak_deadline": now,
        "gates": [reporting],
        "reason": "",
        "history": [
            {"at": now, "kind": "rollout.created", "actor": "engine", "detail": {"devices": 2}},
        ],
    }


def fill_old(engine: Engine, revision: str, keys: list[Ed25519PrivateKey]) -> dict[str, Any]:
    """Rows as the code of `revision` wrote them; returns what the test checks."""
    now = time.time()
    devices = [f"dev-{i:016x}" for i in range(len(keys))]
    audit, audit_head = _audit_rows(now, 3)
    vocab_digest = vocabulary_digest(TERMS)
    with engine.begin() as c:
        _put(c, "meta", {"key": "bootstrap", "value": str(now)})
        _put(
            c,
            "tokens",
            {
                "id": "0123456789ab",
                "name": "admin",
                "role": "admin",
                "scope": None,
                "token_hash": hash_token(ADMIN),
                "created_at": now,
                "created_by": "bootstrap",
                "revoked_at": None,
            },
        )
        _put(
            c,
            "enroll_tokens",
            {
                "id": "abcdef012345",
                "token_hash": hash_token(ENROLL),
                "labels": {"site": "a"},
                "expires_at": now + 86400,
                "max_uses": 10,
                "uses": 0,
                "created_at": now,
                "created_by": "token:admin(0123456789ab)",
                "revoked": False,
            },
        )
        agent: dict[str, Any] = {"version": "0.1.0", "uptime_s": 5.0, "buffer_depth": 0}
        if revision == "0006":  # terms inline, as between 547e256 and 0007
            agent |= {"spec_digest": vocab_digest, "spec_vocabulary": TERMS}
        elif revision >= "0007":
            agent |= {"spec_digest": vocab_digest}
            vocab = {"digest": vocab_digest, "terms": TERMS, "first_seen": now}
            _put(
                c, "agent_vocabularies", vocab | ({"last_seen": now} if revision >= "0008" else {})
            )
        for device_id, key in zip(devices, keys, strict=True):
            row = {
                "id": device_id,
                "public_key": pubkey_b64(key),
                "labels": {"site": "a", "hw": "small"},
                "capabilities": {"arch": "x86_64"},
                "status": "active",
                "enrolled_at": now,
                "last_seen": now,
                "changed_at": now,
                "desired_revision": 0,
                "desired_hash": "",
                "desired_signed": None,
                "report_revision": 0,
                "report_errors": [],
                "report_agent": agent,
                "reported_at": now,
                "telemetry_acked": 2,
            }
            if revision >= "0006":
                row["report_sent_at"] = now
            _put(c, "devices", row)
        deployment = {
            "id": "dep-000000000001",
            "name": "base",
            "selector": "site=a",
            "priority": 0,
            "pipelines": {},
            "content_hash": "c" * 64,
            "created_at": now,
            "created_by": "token:admin(0123456789ab)",
        }
        if revision >= "0004":
            deployment["egress"] = None
        _put(c, "deployments", deployment)
        if revision >= "0002":
            rev = {
                "deployment_id": "dep-000000000001",
                "revision": 1,
                "pipelines": {},
                "content_hash": "c" * 64,
                "note": "created",
                "created_at": now,
                "created_by": "token:admin(0123456789ab)",
            }
            _put(c, "deployment_revisions", rev | ({"egress": None} if revision >= "0004" else {}))
            _put(c, "deployment_revisions", rev | {"revision": 2, "note": ""})
            doc = _rollout_document(devices, now)
            rollout = {
                "id": doc["id"],
                "deployment_id": "dep-000000000001",
                "active_key": "dep-000000000001",
                "from_revision": 1,
                "to_revision": 2,
                "state": "running",
                "document": doc,
                "version": 1,
                "wake_at": now + 600,
                "lease_owner": None,
                "lease_expires": None,
                "created_at": now,
                "created_by": "token:admin(0123456789ab)",
                "updated_at": now,
            }
            _put(c, "rollouts", rollout)
            moved = {"rollout_id": doc["id"], "device_id": devices[0], "revision": 2}
            _put(
                c,
                "rollout_assignments",
                moved | {"deployment_id": "dep-000000000001", "updated_at": now},
            )
            _put(c, "rollout_notifications", moved | {"kind": "notify", "at": now})
        _put(c, "audit", *audit)
        _put(c, "audit_head", {"id": 1, "seq": len(audit), "hash": audit_head})
        _put(
            c,
            "telemetry",
            *[
                {
                    "device_id": devices[0],
                    "seq": seq,
                    "cls": "event",
                    "ts": now,
                    "kind": "install.succeeded",
                    "data": {"pipeline": "digits"},
                    "received_at": now,
                }
                for seq in (1, 2)
            ],
        )
        if revision >= "0003":
            _put(
                c,
                "telemetry_devices",
                {
                    "device_id": devices[0],
                    "last_received": now,
                    "last_window_end": None,
                    "dropped": {},
                },
            )
        if revision >= "0009":
            _put(
                c,
                "outbox",
                {
                    "topic": "rollout.paused",
                    "payload": {"rollout": {"id": "ro-1"}},
                    "created_at": now,
                    "due_at": now + 3600,
                    "attempts": 0,
                    "state": "pending",
                },
            )
    return {"devices": devices, "audit": len(audit)}


@pytest.fixture
def keys() -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(2)]


@pytest.fixture
def served(store_url: str, tmp_path: Path) -> Iterator[Any]:
    """`served()`: the current code's app (TestClient) over the database at store_url."""
    opened: list[Any] = []

    def start() -> TestClient:
        store = open_store(store_url)
        app = create_app(Settings(data_dir=tmp_path / "data"), store, background=False)
        client = TestClient(app, raise_server_exceptions=False)
        opened.append((client.__enter__(), store))
        return opened[-1][0]

    yield start
    for client, store in opened:
        client.__exit__(None, None, None)
        store.close()


def _signed_get(client: TestClient, key: Ed25519PrivateKey, device_id: str, path: str) -> Any:
    return client.get(path, headers=sign_request(key, device_id, "GET", path, b"", time.time()))


# ---------------------------------------------------------------- (a) data survives
@pytest.mark.parametrize("revision", OLD)
def test_data_written_at_an_old_revision_is_served_after_the_upgrade(
    store_url: str, served: Any, keys: list[Ed25519PrivateKey], revision: str
) -> None:
    engine = _engine(store_url)
    migrate(engine, revision)
    old = fill_old(engine, revision, keys)
    engine.dispose()

    client = served()
    admin = {"authorization": f"Bearer {ADMIN}"}
    verified = client.get("/api/v1/audit/verify", headers=admin).json()
    assert (verified["records"], verified["ok"]) == (old["audit"], True)
    listed = client.get("/api/v1/devices", headers=admin).json()
    assert sorted(d["id"] for d in listed) == old["devices"]
    assert all(d["labels"] == {"site": "a", "hw": "small"} for d in listed)
    for device_id, key in zip(old["devices"], keys, strict=True):
        r = _signed_get(client, key, device_id, "/device/v1/desired")
        assert r.status_code == 200, r.text
        assert r.json()["document"]["device_id"] == device_id
    detail = client.get(f"/api/v1/devices/{old['devices'][0]}", headers=admin).json()
    assert "spec_vocabulary" not in detail["agent"]
    if revision >= "0006":
        assert detail["agent"]["spec_terms"] == len(TERMS)  # 0006's inline terms moved
    revisions = client.get("/api/v1/deployments/base/revisions", headers=admin)
    assert revisions.status_code == 200, revisions.text
    assert revisions.json()["stable_revision"] == 1

    if revision >= "0002":  # the rollout under way goes on: view, pause, resume
        view = client.get("/api/v1/rollouts/ro-000000000001", headers=admin)
        assert view.status_code == 200, view.text
        assert view.json()["state"] == "running" and view.json()["to_revision"] == 2
        for action, state in (("pause", "paused"), ("resume", "running")):
            r = client.post(f"/api/v1/rollouts/ro-000000000001/{action}", headers=admin)
            assert r.status_code == 200 and r.json()["state"] == state, r.text

    # The old enrollment token still enrols, and the chain goes on from the old head.
    new_key = Ed25519PrivateKey.generate()
    body = {"token": ENROLL, "public_key": pubkey_b64(new_key), "labels": {}, "capabilities": {}}
    assert client.post("/device/v1/enroll", json=body).status_code == 201
    r = client.post("/api/v1/tokens", headers=admin, json={"name": "ci", "role": "viewer"})
    assert r.status_code == 201, r.text
    verified = client.get("/api/v1/audit/verify", headers=admin).json()
    assert verified["ok"] is True and verified["records"] > old["audit"]
    engine = _engine(store_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM telemetry")).scalar() == 2
    engine.dispose()


def test_an_outbox_built_by_the_first_0009_gets_its_url_column(store_url: str, served: Any) -> None:
    # 0009 as first released (60dc9cd) had no `url`; the database says 0009 all the same.
    engine = _engine(store_url)
    migrate(engine, "0008")
    serial = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    with engine.begin() as c:
        c.execute(
            text(
                f"CREATE TABLE outbox (id {serial} PRIMARY KEY, topic VARCHAR(64) NOT NULL, "
                "payload JSON NOT NULL, created_at FLOAT NOT NULL, due_at FLOAT NOT NULL, "
                "attempts INTEGER NOT NULL, state VARCHAR(16) NOT NULL, done_at FLOAT, "
                "last_error VARCHAR(500))"
            )
        )
        c.execute(text("CREATE INDEX ix_outbox_state_due ON outbox (state, due_at)"))
        c.execute(
            text(
                "INSERT INTO outbox (topic, payload, created_at, due_at, attempts, state) "
                "VALUES ('rollout.paused', '{\"rollout\": {}}', 1.0, 1.0, 0, 'pending')"
            )
        )
        c.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    engine.dispose()

    store = open_store(store_url)
    try:
        from edgewise.control._outbox import enqueue

        with store.engine.begin() as c:
            enqueue(c, "alert.firing", {"alert": {}}, 2.0, url="http://127.0.0.1:9/hook")
        with store.engine.connect() as c:
            rows = c.execute(text("SELECT id, url FROM outbox ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, None), (2, "http://127.0.0.1:9/hook")]
    finally:
        store.close()


# ---------------------------------------------------------------- (b) newer database
def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEWISE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_database_a_newer_edgewise_migrated_is_refused_and_left_alone(
    store_url: str, tmp_path: Path
) -> None:
    store = open_store(store_url)
    with store.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        c.execute(text("CREATE TABLE newer_feature (id INTEGER PRIMARY KEY)"))
    store.close()
    data = tmp_path / "data"
    for command in (["server", "--port", "1"], ["server", "migrate"], ["server", "init"]):
        out = _run(*command, "--data", str(data), "--db", store_url)
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
        assert "revision 0042" in out.stderr and head_revision() in out.stderr
        assert "newer edgewise" in out.stderr and "restore the backup" in out.stderr
    engine = _engine(store_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0042"
        assert c.execute(text("SELECT count(*) FROM tokens")).scalar() == 0  # no admin made
    assert "newer_feature" in inspect(engine).get_table_names()
    engine.dispose()


def test_migrate_check_names_the_revision_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    engine = _engine(f"sqlite:///{db}")
    migrate(engine, "0004")
    engine.dispose()
    args = ("server", "migrate", "--data", str(tmp_path / "d"), "--db", f"sqlite:///{db}")
    check = _run(*args, "--check")
    assert check.returncode == 1 and "revision 0004" in check.stdout
    assert head_revision() in check.stdout
    upgraded = _run(*args)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"from revision 0004 to {head_revision()}" in upgraded.stdout
    assert _run(*args, "--check").returncode == 0


# ---------------------------------------------------------------- (c) start-up faults
@pytest.mark.parametrize("other_alembic", [False, True])
def test_a_database_that_is_not_edgewise_is_refused_untouched(
    store_url: str, tmp_path: Path, other_alembic: bool
) -> None:
    engine = _engine(store_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)"))
        c.execute(text("INSERT INTO customers VALUES (1, 'acme')"))
        if other_alembic:  # another application that migrates with Alembic too
            c.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            c.execute(text("INSERT INTO alembic_version VALUES ('ae1027a6acf')"))
    engine.dispose()
    out = _run("server", "--data", str(tmp_path / "d"), "--db", store_url, "--port", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert "not an edgewise database" in out.stderr
    assert ("ae1027a6acf" if other_alembic else "customers") in out.stderr
    engine = _engine(store_url)
    tables = {"customers", "alembic_version"} if other_alembic else {"customers"}
    assert set(inspect(engine).get_table_names()) == tables
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test", "cannot use PostgreSQL"),
        ("postgres//nowhere", "bad database URL"),
        ("mysql://db/edgewise", "bad database URL"),
        ("sqlite:////nonexistent-dir/edgewise.db", "cannot write SQLite database"),
    ],
)
def test_an_unusable_database_url_is_one_clear_line(
    tmp_path: Path, url: str, expected: str
) -> None:
    out = _run("server", "--data", str(tmp_path / "d"), "--db", url, "--port", "1")
    assert out.returncode == 1, out
    assert out.stderr.startswith(f"error: {expected}") and len(out.stderr.splitlines()) == 1
    assert "hunter2" not in out.stderr


def test_a_postgres_that_never_answers_is_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as hung:  # accepts connections, never says a word
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{hung.getsockname()[1]}/test"
        out = _run("server", "migrate", "--data", str(tmp_path / "d"), "--db", url)
    assert out.returncode == 1, out
    assert out.stderr.startswith("error: cannot use PostgreSQL database") and (
        "timeout" in out.stderr
    )
    assert len(out.stderr.splitlines()) == 1


def test_a_read_only_or_foreign_sqlite_file_is_one_clear_line(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    engine = _engine(f"sqlite:///{old}")
    migrate(engine, "0003")
    engine.dispose()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    cases = [
        (f"sqlite:///file:{old}?mode=ro&uri=true", "cannot write SQLite database"),
        (f"sqlite:///{junk}", "is not a SQLite database"),
    ]
    for url, expected in cases:
        out = _run("server", "--data", str(tmp_path / "d"), "--db", url, "--port", "1")
        assert out.returncode == 1 and expected in out.stderr, out
        assert len(out.stderr.splitlines()) == 1
    with sqlite3.connect(old) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0003",)


@pytest.mark.slow
def test_a_locked_sqlite_file_is_one_clear_line_once_the_busy_timeout_ends(
    tmp_path: Path,
) -> None:
    db = tmp_path / "cp.db"
    engine = _engine(f"sqlite:///{db}")
    migrate(engine, "0003")
    engine.dispose()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing, for longer than its busy timeout
    try:
        out = _run("server", "migrate", "--data", str(tmp_path / "d"), "--db", f"sqlite:///{db}")
    finally:
        holder.rollback()
        holder.close()
    assert out.returncode == 1 and "is locked by another process" in out.stderr, out
    assert len(out.stderr.splitlines()) == 1


# ---------------------------------------------------------------- (e) half-way failures
def test_a_migration_failing_half_way_leaves_the_old_revision_for_the_next_start(
    store_url: str, keys: list[Ed25519PrivateKey], served: Any
) -> None:
    engine = _engine(store_url)
    migrate(engine, "0001")
    old = fill_old(engine, "0001", keys)
    with engine.begin() as c:  # something in the way of migration 0007
        c.execute(text("CREATE TABLE agent_vocabularies (x INTEGER)"))
    with pytest.raises(Exception, match="agent_vocabularies"):
        migrate(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    tables = set(inspect(engine).get_table_names())
    assert "rollouts" not in tables and not any(t.startswith("_alembic") for t in tables)
    with engine.begin() as c:
        c.execute(text("DROP TABLE agent_vocabularies"))
    engine.dispose()

    client = served()  # the next start finishes the upgrade
    listed = client.get("/api/v1/devices", headers={"authorization": f"Bearer {ADMIN}"})
    assert sorted(d["id"] for d in listed.json()) == old["devices"]


_KILL_AT = """
import os, signal, sys
from sqlalchemy import event
from edgewise.control import migrate
from edgewise.control._store import _engine

engine = _engine(sys.argv[1])
calls = [0]

def tick():
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return 0

@event.listens_for(engine, "connect")
def _progress(dbapi_conn, _record):
    dbapi_conn.set_progress_handler(tick, 200)

migrate(engine)
"""


def test_sqlite_upgrade_killed_at_any_point_is_finished_by_the_next_start(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    db = tmp_path / "cp.db"
    url = f"sqlite:///{db}"
    engine = _engine(url)
    migrate(engine, "0001")
    old = fill_old(engine, "0001", keys)
    engine.dispose()
    kills, finished, at = 0, False, 1
    while not finished:
        proc = subprocess.run(
            [sys.executable, "-c", _KILL_AT, url, str(at)], capture_output=True, timeout=120
        )
        if proc.returncode == 0:
            finished = True
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
        with sqlite3.connect(db) as conn:  # all or nothing: still 0001, no leftovers
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert "rollouts" not in names and not any(n.startswith("_alembic") for n in names)
        at = at * 2
    assert kills >= 3  # the sweep did kill inside the upgrade
    store = open_store(url)
    try:
        with store.engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
                head_revision()
            )
        assert sorted(d["id"] for d in store.list_devices()) == old["devices"]
    finally:
        store.close()


def _pg_admin(url: str) -> Any:
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_upgrade_killed_half_way_is_finished_by_the_next_start(
    pg_url: str, keys: list[Ed25519PrivateKey], tmp_path: Path
) -> None:
    engine = _engine(pg_url)
    migrate(engine, "0001")
    old = fill_old(engine, "0001", keys)
    engine.dispose()
    with _pg_admin(pg_url) as blocker:
        blocker.autocommit = False
        blocker.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")  # 0006 alters it
        proc = subprocess.Popen(
            [EDGEWISE, "server", "migrate", "--data", str(tmp_path / "d"), "--db", pg_url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with _pg_admin(pg_url) as watch:
            while not watch.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = 'devices' AND NOT l.granted"
            ).fetchone()[0]:
                assert proc.poll() is None
                time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # 0002-0005 done in its transaction, 0006 waiting
        proc.wait()
        blocker.rollback()
    with _pg_admin(pg_url) as watch:  # the orphaned backend notices and rolls back
        while watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchone()[0]:
            time.sleep(0.05)
        assert watch.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
    out = _run("server", "migrate", "--data", str(tmp_path / "d"), "--db", pg_url)
    assert out.returncode == 0, out.stderr
    store = open_store(pg_url, run_migrations=False)
    try:
        assert sorted(d["id"] for d in store.list_devices()) == old["devices"]
    finally:
        store.close()


# ---------------------------------------------------------------- (d) replicas at once
@pytest.mark.postgres
@pytest.mark.slow
def test_replicas_starting_at_once_on_an_old_database_migrate_it_once(
    pg_url: str, keys: list[Ed25519PrivateKey], tmp_path: Path
) -> None:
    from .test_control_replicas import _free_port, _wait_healthy

    engine = _engine(pg_url)
    migrate(engine, "0003")
    old = fill_old(engine, "0003", keys)
    # A replica of the old version keeps serving through the upgrade: its writes (in
    # 0003's shape) go on working against the new schema.
    stop, old_errors, old_writes = threading.Event(), [], [0]

    def old_replica() -> None:
        seq = 100
        while not stop.is_set():
            seq += 1
            try:
                with engine.begin() as c:
                    c.execute(
                        text(
                            "INSERT INTO telemetry (device_id, seq, cls, ts, kind, data, "
                            "received_at) VALUES (:d, :s, 'event', 1.0, 'k', '{}', 1.0)"
                        ),
                        {"d": old["devices"][1], "s": seq},
                    )
                    c.execute(text("UPDATE devices SET last_seen = :t"), {"t": time.time()})
                old_writes[0] += 1
            except Exception as exc:
                old_errors.append(exc)

    writer = threading.Thread(target=old_replica)
    writer.start()
    data = tmp_path / "data"
    procs, bases = [], []
    try:
        for _ in range(3):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [EDGEWISE, "server", "--data", str(data), "--db", pg_url, "--port", str(port)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs, strict=True):
            _wait_healthy(base, proc)
        import httpx

        for base in bases:
            r = httpx.get(f"{base}/api/v1/devices", headers={"authorization": f"Bearer {ADMIN}"})
            assert (
                sorted(d["id"] for d in r.json() if d["id"] in old["devices"]) == (old["devices"])
            )
    finally:
        stop.set()
        writer.join()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
    assert old_errors == [] and old_writes[0] > 0
    with engine.connect() as c:
        versions = c.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        tokens = c.execute(select(text("count(*)")).select_from(text("tokens"))).scalar()
    assert versions == [head_revision()]
    assert tokens == 1  # the old admin only: no replica took the database for a fresh one
    engine.dispose()
