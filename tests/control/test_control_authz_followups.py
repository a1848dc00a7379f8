"""Follow-ups to the authorization review: what scope reveals, the last admin, a busy store.

- A scoped token learns nothing of objects outside its scope: another site's deployment
  answers every route as a name nobody created would (404 `not_found`), and an alert
  names only the caller's devices.
- Revoking the last two unscoped admin tokens at once, from two replicas, leaves one.
- A store that cannot be had in bounded time answers 503 `store_busy`, never a 500 and
  never after 30 s; a PostgreSQL connect has a bounded timeout however the store opens.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from edgewise.control import SqlStore, open_store
from edgewise.control._migrate import migrate
from edgewise.control._plane import ApiError, ControlPlane
from edgewise.control._rbac import Role
from edgewise.control._store import BUSY_TIMEOUT_S, PG_CONNECT_TIMEOUT_S, LastAdminError
from edgewise.protocol import TelemetryBatch, TelemetryRecord, encode_batch, sign_request

from .conftest import Device, Plane, TestClient, make_plane

DIGITS = {"digits": {"model": "digits-mlp@1.0.0"}}


def _not_found(ref: str) -> dict[str, Any]:
    return {"error": {"code": "not_found", "message": f"no deployment {ref}"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, examples: dict[str, Any]) -> Iterator[Any]:
    """Two sites, a deployment each plus a fleet-wide one, and tokens scoped to site a."""
    tmp = tmp_path_factory.mktemp("followups")
    store = open_store(f"sqlite:///{tmp / 'cp.db'}")
    app, clock, settings = make_plane(store, tmp / "data")
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        p = Plane(client, admin, clock, settings)
        p.trust(examples["pub"])
        assert p.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
        a = p.enroll(token_labels={"site": "a"})
        b = p.enroll(token_labels={"site": "b"})
        for name, selector in (("base", ""), ("site-a", "site=a"), ("site-b", "site=b")):
            body = {"name": name, "selector": selector, "pipelines": DIGITS}
            assert p.api("POST", "/api/v1/deployments", json=body).status_code == 201
        yield {
            "p": p,
            "a": a,
            "b": b,
            "op": p.token("operator", scope="site=a", name="op-a"),
            "viewer": p.token("viewer", scope="site=a", name="viewer-a"),
        }
    store.close()


# ----------------------------------------------------- another site's deployment
def _deployment_requests(ref: str) -> list[tuple[str, str, dict[str, Any]]]:
    revise = {"pipelines": {"second": {"model": "digits-mlp@1.0.0"}}}
    return [
        ("GET", f"/api/v1/deployments/{ref}", {}),
        ("DELETE", f"/api/v1/deployments/{ref}", {}),
        ("GET", f"/api/v1/deployments/{ref}/revisions", {}),
        ("POST", f"/api/v1/deployments/{ref}/revisions", {"json": revise}),
        ("POST", "/api/v1/rollouts", {"json": {"deployment": ref, "to_revision": 2}}),
        ("GET", "/api/v1/rollouts", {"params": {"deployment": ref}}),
    ]


@pytest.mark.parametrize("index", range(len(_deployment_requests("x"))))
def test_another_sites_deployment_answers_every_route_as_an_unknown_name_does(
    world: Any, index: int
) -> None:
    p: Plane = world["p"]
    answers = {}
    for ref in ("site-b", "never-created"):
        method, path, kw = _deployment_requests(ref)[index]
        r = p.api(method, path, token=world["op"], **kw)
        answers[ref] = (r.status_code, r.json())
    assert answers["site-b"] == (404, _not_found("site-b"))
    assert answers["never-created"] == (404, _not_found("never-created"))
    assert p.api("GET", "/api/v1/deployments/site-b").status_code == 200  # still there


def test_a_deployment_the_scope_sees_but_may_not_change_stays_403_out_of_scope(
    world: Any,
) -> None:
    p: Plane = world["p"]
    revise = {"pipelines": {"second": {"model": "digits-mlp@1.0.0"}}}
    for method, path, kw in (
        ("POST", "/api/v1/deployments/base/revisions", {"json": revise}),
        ("POST", "/api/v1/rollouts", {"json": {"deployment": "base", "to_revision": 2}}),
        ("GET", "/api/v1/rollouts", {"params": {"deployment": "base"}}),
        ("DELETE", "/api/v1/deployments/base", {}),
    ):
        r = p.api(method, path, token=world["op"], **kw)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "out_of_scope"), path
    r = p.api("POST", "/api/v1/deployments/site-a/revisions", token=world["op"], json=revise)
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------ scoped alerts
def _upload(device: Device, seq: int, end: float, failed: int) -> None:
    record = TelemetryRecord(
        seq=seq,
        cls="metric",
        ts=end,
        kind="window",
        data={
            "pipeline": "p",
            "model": "digits-mlp",
            "version": "1.0.0",
            "start": end - 60,
            "end": end,
            "counts": {"ok": 200 - failed, "failed": failed},
            "latency": {"bounds": [1.0, 5.0], "stages": {"total": {"counts": [100, 100, 0]}}},
        },
    )
    body = encode_batch(TelemetryBatch(records=[record]))
    path = "/device/v1/telemetry"
    headers = sign_request(device.key, device.id, "POST", path, body, device.clock())
    headers.update({"content-type": "application/json", "content-encoding": "gzip"})
    r = device.client.post(path, content=body, headers=headers)
    assert r.status_code == 200, r.text


def test_a_scoped_token_sees_only_its_devices_in_an_alert_covering_two_sites(
    world: Any,
) -> None:
    p: Plane = world["p"]
    a, b = world["a"], world["b"]
    for seq, device in enumerate((a, b), start=1):
        _upload(device, seq, p.clock() - 30, failed=100)
    rule = {"kind": "burn_rate", "burn_rate": 2.0, "min_requests": 1, "group_by": "model"}
    assert p.api("PUT", "/api/v1/alert-rules/fleet-slo", json=rule).status_code == 200
    by_site = {**rule, "group_by": "label:site"}
    assert p.api("PUT", "/api/v1/alert-rules/site-slo", json=by_site).status_code == 200

    # Evaluated by the scoped operator: its answer names site a's device alone.
    changes = p.api("POST", "/api/v1/alerts/evaluate", token=world["op"]).json()
    assert {(c["rule"], c["scope"]) for c in changes} == {
        ("fleet-slo", "digits-mlp@1.0.0"),
        ("site-slo", "site=a"),
    }
    assert all(c["devices"] == [a.id] for c in changes), changes

    seen = p.api("GET", "/api/v1/alerts", token=world["viewer"]).json()
    assert {(x["rule"], x["scope"]) for x in seen} == {
        ("fleet-slo", "digits-mlp@1.0.0"),
        ("site-slo", "site=a"),
    }
    assert all(x["devices"] == [a.id] for x in seen), seen
    everything = p.api("GET", "/api/v1/alerts").json()  # the unscoped admin: all of it
    fleet = next(x for x in everything if x["rule"] == "fleet-slo")
    assert sorted(fleet["devices"]) == sorted([a.id, b.id])
    assert ("site-slo", "site=b") in {(x["rule"], x["scope"]) for x in everything}


# ------------------------------------------------------------------- last admin
def _root_admins(store: SqlStore) -> list[str]:
    return [
        r["id"]
        for r in store.list_tokens()
        if r["role"] == Role.ADMIN and not r["scope"] and r["revoked_at"] is None
    ]


def test_two_revokes_of_the_last_two_admin_tokens_at_once_leave_one(
    store_url: str, tmp_path: Path, in_threads: Callable[..., list[BaseException]]
) -> None:
    """Two threads of one server on SQLite; two replicas (stores) on PostgreSQL."""
    postgres = store_url.startswith("postgresql")
    stores = [open_store(store_url) for _ in range(2 if postgres else 1)]
    owners = stores if postgres else stores * 2
    try:
        planes = [
            ControlPlane(make_plane(s, tmp_path / f"d{i}")[2], s) for i, s in enumerate(owners)
        ]
        pair: list[str] = []
        survivors: list[int] = []

        def next_round() -> None:
            # Run by one thread while both wait: count what the last round left, then
            # leave exactly two unrevoked unscoped admin tokens for this one.
            left = _root_admins(stores[0])
            survivors.append(len(left))
            pair.clear()
            for i in range(2):
                row, _ = planes[0].create_token(f"admin{i}", Role.ADMIN, None, "test")
                pair.append(row["id"])
            for token_id in left:
                stores[0].revoke_token(token_id, 0.0)

        start = threading.Barrier(2, action=next_round)

        def revoker(k: int) -> Callable[[int], None]:
            def work(_: int) -> None:
                try:
                    start.wait()
                    planes[k].revoke_token(pair[k], f"replica{k}")
                except ApiError as exc:
                    assert (exc.status, exc.code) == (409, "last_admin"), exc
                except BaseException:
                    start.abort()  # the other thread must not wait for this one
                    raise

            return work

        planes[0].bootstrap_admin()
        errors = in_threads(revoker(0), revoker(1), rounds=40)
        survivors.append(len(_root_admins(stores[0])))
        assert errors == []
        assert survivors == [1] * 41  # the bootstrap admin, then one of each pair
    finally:
        for s in stores:
            s.close()


def test_the_store_refuses_only_the_last_admin_and_says_unknown_ids_are_unknown(
    store: SqlStore, tmp_path: Path
) -> None:
    plane = ControlPlane(make_plane(store, tmp_path / "d")[2], store)
    plane.bootstrap_admin()
    (root,) = _root_admins(store)
    scoped = plane.create_token("scoped", Role.ADMIN, "site=a", "test")[0]["id"]
    with pytest.raises(LastAdminError):
        store.revoke_token(root, 1.0, keep_root_admin=True)
    assert store.revoke_token(scoped, 1.0, keep_root_admin=True)  # not a root admin
    assert not store.revoke_token("missing", 1.0, keep_root_admin=True)
    second = plane.create_token("second", Role.ADMIN, None, "test")[0]["id"]
    assert store.revoke_token(root, 1.0, keep_root_admin=True)
    assert store.revoke_token(root, 2.0, keep_root_admin=True)  # already: still fine
    assert _root_admins(store) == [second]


# -------------------------------------------------------------------- the store
def test_postgresql_connections_of_any_store_have_a_bounded_connect_timeout(
    pg_url: str,
) -> None:
    for url, expected in ((pg_url, PG_CONNECT_TIMEOUT_S), (f"{pg_url}?connect_timeout=3", 3)):
        store = open_store(url)
        try:
            with store.engine.connect() as c:
                params = c.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert int(params["connect_timeout"]) == expected
        finally:
            store.close()


def test_sqlite_waits_a_bounded_time_for_the_write_lock(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        with store.engine.connect() as c:
            busy = c.execute(text("PRAGMA busy_timeout")).scalar()
        assert busy == int(BUSY_TIMEOUT_S * 1000) and BUSY_TIMEOUT_S <= 10
    finally:
        store.close()


def test_a_write_to_a_sqlite_database_another_process_holds_answers_503_store_busy(
    sqlite_plane: Plane, tmp_path: Path
) -> None:
    p = sqlite_plane
    holder = sqlite3.connect(tmp_path / "cp.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
    try:
        r = p.api("POST", "/api/v1/tokens", json={"name": "x", "role": "viewer"})
        assert p.api("GET", "/api/v1/whoami").status_code == 200  # reads go on
    finally:
        holder.rollback()
        holder.close()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_busy"
    assert int(r.headers["retry-after"]) >= 1
    again = p.api("POST", "/api/v1/tokens", json={"name": "x", "role": "viewer"})
    assert again.status_code == 201, again.text


def test_a_request_that_gets_no_postgresql_connection_from_the_pool_answers_503(
    pg_url: str, tmp_path: Path
) -> None:
    engine = create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    migrate(engine)
    store = SqlStore(engine)
    app, _, _ = make_plane(store, tmp_path / "data")
    admin = app.state.plane.bootstrap_admin()
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            headers = {"authorization": f"Bearer {admin}"}
            with engine.connect():  # the pool's only connection, held elsewhere
                r = client.get("/api/v1/whoami", headers=headers)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_busy"
            assert "retry-after" in r.headers
            assert client.get("/api/v1/whoami", headers=headers).status_code == 200
    finally:
        store.close()
