"""Service endpoints and error envelopes: sizes, unknown routes, bad JSON, metrics."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from edgewise.control import SqlStore
from edgewise.control._schema import metadata

from .conftest import Plane


def test_migrations_build_exactly_the_declared_schema(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_healthz_metrics_and_openapi(sqlite_plane: Plane) -> None:
    c = sqlite_plane.client
    assert c.get("/healthz").json() == {"ok": True}
    c.get("/api/v1/devices")
    metrics = c.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    assert 'edgewise_http_requests_total{method="GET",route="/api/v1/devices",status="401"}' in (
        metrics.text
    )
    paths = c.get("/openapi.json").json()["paths"]
    assert "/device/v1/desired" in paths and "/api/v1/deployments" in paths


def test_errors_are_json_envelopes(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    cases = [
        (p.client.get("/nope"), 404),
        (p.client.put("/healthz"), 405),
        (
            p.api(
                "POST",
                "/api/v1/tokens",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            422,
        ),
        (p.api("POST", "/api/v1/tokens", json={"name": "x", "role": "root"}), 400),
        (
            p.api(
                "POST", "/api/v1/tokens", json={"name": "x", "role": "viewer", "scope": "a in ("}
            ),
            400,
        ),
        (p.api("POST", "/api/v1/tokens", json=["list"]), 422),
        (p.api("GET", "/api/v1/devices?selector=%21%21"), 400),
        (p.api("GET", "/api/v1/models/none/1.0.0"), 404),
        (p.api("GET", "/api/v1/audit?limit=0"), 422),
        (p.api("GET", "/api/v1/audit?after=36893488147419103233"), 422),  # 2**65 + 1
        (p.client.post("/device/v1/enroll", content=b"\xff\xfe"), 422),
        (p.api("POST", "/api/v1/publisher-keys", json={"public_key": "@@@"}), 400),
    ]
    for r, status in cases:
        assert r.status_code == status, (r.request.url, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}


def test_oversized_bodies_are_refused_with_413(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    big = b"x" * (p.settings.max_body_bytes + 1)
    r = p.api("POST", "/api/v1/tokens", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks() -> object:
        for _ in range(p.settings.max_body_bytes // 65536 + 2):
            yield b"y" * 65536

    r = p.client.post("/device/v1/enroll", content=chunks())  # type: ignore[arg-type]
    assert r.status_code == 413


def test_values_the_database_cannot_hold_are_4xx_on_both_stores(plane: Plane) -> None:
    p = plane
    tok = p.api("POST", "/api/v1/enroll-tokens", json={"max_uses": 5}).json()["token"]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .conftest import pubkey_b64

    key = pubkey_b64(Ed25519PrivateKey.generate())
    body = f'{{"token": "{tok}", "public_key": "{key}", "capabilities": {{"memory_mb": NaN}}}}'
    r = p.client.post(
        "/device/v1/enroll", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    dev = p.enroll()
    report = {
        "revision": 1,
        "pipelines": {"p" * 300: {"model": "m", "version": "1", "status": "active"}},
        "errors": [],
        "agent": {},
    }
    r = dev.post("/device/v1/report", report)
    assert r.status_code == 422, r.text
    # Numbers JSON cannot carry, as literals, strings or overflowing exponents.
    timeline = '{"state": "active", "at": %s}'
    for bad in (
        '{"revision": 1, "agent": {"uptime_s": NaN}}',
        '{"revision": 1, "agent": {"uptime_s": "inf"}}',
        '{"revision": 1, "pipelines": {"p": {"model": "m", "version": "1", "status": "active",'
        ' "timeline": [%s]}}}' % (timeline % "1e400"),
        '{"revision": 1, "pipelines": {"p": {"model": "m", "version": "1", "status": "active",'
        ' "timeline": [%s]}}}' % (timeline % '"-Infinity"'),
    ):
        r = dev.post("/device/v1/report", bad.encode())
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
    assert dev.post("/device/v1/report", {"revision": 1}).status_code == 200
