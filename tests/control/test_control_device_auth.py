"""Signed device requests: what is refused and with which code."""

from __future__ import annotations

import gzip
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.protocol import sign_request

from .conftest import Device, Plane, pubkey_b64


def _code(r: object) -> str:
    return str(r.json()["error"]["code"])  # type: ignore[attr-defined]


def test_unsigned_request_is_refused(sqlite_plane: Plane) -> None:
    r = sqlite_plane.client.get("/device/v1/desired")
    assert r.status_code == 401 and _code(r) == "unsigned"


def test_request_signed_with_another_key_is_refused(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    impostor = Device(dev.client, dev.clock, dev.id, Ed25519PrivateKey.generate())
    r = impostor.get("/device/v1/desired")
    assert r.status_code == 401 and _code(r) == "bad_signature"


def test_unknown_device_is_refused(sqlite_plane: Plane) -> None:
    ghost = Device(
        sqlite_plane.client, sqlite_plane.clock, "dev-ghost", Ed25519PrivateKey.generate()
    )
    r = ghost.get("/device/v1/desired")
    assert r.status_code == 401 and _code(r) == "unknown_device"


def test_decommissioned_device_is_refused(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    assert dev.get("/device/v1/desired").status_code == 200
    r = sqlite_plane.api("POST", f"/api/v1/devices/{dev.id}/decommission")
    assert r.status_code == 200
    r = dev.get("/device/v1/desired")
    assert r.status_code == 401 and _code(r) == "decommissioned"


def test_replayed_nonce_is_refused(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    headers = dev.headers("GET", "/device/v1/desired")
    assert sqlite_plane.client.get("/device/v1/desired", headers=headers).status_code == 200
    r = sqlite_plane.client.get("/device/v1/desired", headers=headers)
    assert r.status_code == 401 and _code(r) == "replayed_nonce"


def test_stale_timestamp_is_refused(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    headers = sign_request(
        dev.key, dev.id, "GET", "/device/v1/desired", b"", sqlite_plane.clock() - 3600
    )
    r = sqlite_plane.client.get("/device/v1/desired", headers=headers)
    assert r.status_code == 401 and _code(r) == "stale_timestamp"


def test_signature_covers_the_query_string(sqlite_plane: Plane) -> None:
    dev = sqlite_plane.enroll()
    headers = dev.headers("GET", "/device/v1/desired?wait=0")
    r = sqlite_plane.client.get("/device/v1/desired?wait=1", headers=headers)
    assert r.status_code == 401 and _code(r) == "bad_signature"


def test_enrollment_refuses_bad_used_up_tokens_and_reused_keys(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    key = Ed25519PrivateKey.generate()
    r = p.client.post("/device/v1/enroll", json={"token": "nope", "public_key": pubkey_b64(key)})
    assert r.status_code == 401 and _code(r) == "bad_enroll_token"
    tok = p.api("POST", "/api/v1/enroll-tokens", json={"max_uses": 1}).json()["token"]
    body = {"token": tok, "public_key": pubkey_b64(key)}
    assert p.client.post("/device/v1/enroll", json=body).status_code == 201
    r = p.client.post("/device/v1/enroll", json=body)
    assert r.status_code == 401 and "used up" in r.json()["error"]["message"]
    tok2 = p.api("POST", "/api/v1/enroll-tokens", json={}).json()["token"]
    r = p.client.post("/device/v1/enroll", json={**body, "token": tok2})
    assert r.status_code == 409
    r = p.client.post("/device/v1/enroll", json={"token": tok2, "public_key": "short"})
    assert r.status_code == 400


def test_enrollment_returns_trust_root_and_token_labels_win(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    tok = p.api("POST", "/api/v1/enroll-tokens", json={"labels": {"site": "s1"}}).json()["token"]
    key = Ed25519PrivateKey.generate()
    r = p.client.post(
        "/device/v1/enroll",
        json={
            "token": tok,
            "public_key": pubkey_b64(key),
            "labels": {"site": "evil", "hw": "x"},
            "capabilities": {"arch": "x86_64"},
        },
    )
    assert r.status_code == 201
    body = r.json()
    assert set(body["trust_root"]) == {"publishers", "control_plane"}
    assert body["settings"]["poll_wait_s"] > 0
    dev = p.api("GET", f"/api/v1/devices/{body['device_id']}").json()
    assert dev["labels"] == {"site": "s1", "hw": "x"}


def test_report_and_telemetry_are_idempotent(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    dev = p.enroll()
    report = {
        "revision": 1,
        "pipelines": {
            "digits": {
                "model": "digits-mlp",
                "version": "1.0.0",
                "slot": "a",
                "status": "active",
                "reason": "",
                "timeline": [{"state": "downloading", "reason": "", "at": 1.0, "progress": 0.5}],
            }
        },
        "errors": [],
        "agent": {},
    }
    for _ in range(2):
        r = dev.post("/device/v1/report", report)
        assert r.status_code == 200 and r.json() == {"ok": True}
    shown = p.api("GET", f"/api/v1/devices/{dev.id}").json()
    assert shown["pipelines"]["digits"]["timeline"][0]["progress"] == 0.5
    assert shown["online"] is True
    batch = {
        "records": [
            {"seq": i, "cls": "event", "ts": 1.0, "kind": "k", "data": {}} for i in (1, 2, 3)
        ],
        "dropped": {"event": 0, "metric": 0, "sample": 0},
    }
    body = gzip.compress(json.dumps(batch).encode())
    r = dev.post("/device/v1/telemetry", body, **{"content-encoding": "gzip"})
    assert r.json() == {"accepted": 3, "duplicates": 0, "acked_seq": 3}
    r = dev.post("/device/v1/telemetry", body, **{"content-encoding": "gzip"})
    assert r.json() == {"accepted": 0, "duplicates": 3, "acked_seq": 3}
    r = dev.post("/device/v1/report", {"revision": "x"})
    assert r.status_code == 422 and "error" in r.json()


def test_a_report_that_arrives_after_a_newer_one_does_not_replace_it(sqlite_plane: Plane) -> None:
    # The device's reported state feeds the rollout gates: a report delayed behind a
    # newer one (a slow retry, or a replay to another replica within the signature's
    # window) must not put an older state back.
    p = sqlite_plane
    dev = p.enroll()

    def report(status: str, sent_at: float | None = None) -> dict[str, Any]:
        pipes = {"digits": {"model": "digits-mlp", "version": "1.0.0", "status": status}}
        body: dict[str, Any] = {"revision": 1, "pipelines": pipes}
        if sent_at is not None:
            body["sent_at"] = sent_at
        return body

    def status() -> str:
        shown = p.api("GET", f"/api/v1/devices/{dev.id}").json()
        return str(shown["pipelines"]["digits"]["status"])

    now = p.clock()
    assert dev.post("/device/v1/report", report("failed", now - 0.1)).status_code == 200
    assert dev.post("/device/v1/report", report("active", now - 0.2)).status_code == 200
    assert status() == "failed"
    assert dev.post("/device/v1/report", report("active", now)).status_code == 200
    assert status() == "active"
    assert p.api("GET", f"/api/v1/devices/{dev.id}").json()["report_sent_at"] == now
    # Without sent_at (older agents) the request's signed timestamp orders reports.
    body = json.dumps(report("failed")).encode()
    signed = sign_request(dev.key, dev.id, "POST", "/device/v1/report", body, now - 5)
    headers = {**signed, "content-type": "application/json"}
    r = p.client.post("/device/v1/report", content=body, headers=headers)
    assert r.status_code == 200
    assert status() == "active"
    # A sent_at later than the request that carries it was signed is refused.
    r = dev.post("/device/v1/report", report("active", now + 60))
    assert r.status_code == 422 and "sent_at" in r.json()["error"]["message"]


def test_device_list_filters_by_selector_and_online_state(sqlite_plane: Plane) -> None:
    p = sqlite_plane
    seen = p.enroll(labels={"site": "a"})
    p.enroll(labels={"site": "b"})
    assert seen.get("/device/v1/desired").status_code == 200

    def ids(query: str) -> set[str]:
        return {d["id"] for d in p.api("GET", f"/api/v1/devices?{query}").json()}

    assert len(ids("")) == 2
    assert ids("selector=site%3Da") == {seen.id}
    assert ids("online=true") == {seen.id}
    assert seen.id not in ids("online=false")
    p.clock.now += 3600
    assert ids("online=true") == set()


def test_device_hot_routes_answer_bad_input_like_the_rest_of_the_api(sqlite_plane: Plane) -> None:
    # /desired, /report, /telemetry and /artifacts skip FastAPI's routing (`_direct`):
    # their refusals must still be the API's JSON envelope, and be counted per route.
    dev = sqlite_plane.enroll()
    r = dev.get("/device/v1/desired?wait=soon")
    assert r.status_code == 422 and _code(r) == "invalid_request"
    r = dev.get("/device/v1/desired?wait=-1")
    assert r.status_code == 400 and _code(r) == "bad_wait"
    r = dev.get("/device/v1/artifacts/" + "0" * 64)
    assert r.status_code == 404 and _code(r) == "not_found"
    r = dev.get("/device/v1/artifacts/not-a-digest")
    assert r.status_code == 404 and _code(r) == "not_found"
    r = dev.post("/device/v1/report", {"revision": "many"})
    assert r.status_code == 422 and _code(r) == "invalid_request"
    r = dev.post("/device/v1/telemetry", b"not gzip", **{"content-encoding": "gzip"})
    assert r.status_code in (400, 422) and "error" in r.json()
    assert sqlite_plane.client.delete("/device/v1/report").status_code == 405  # via FastAPI
    metrics = sqlite_plane.client.get("/metrics").text
    assert 'route="/device/v1/artifacts/{sha256}",status="404"' in metrics
    assert 'route="/device/v1/report",status="422"' in metrics


def test_numbers_no_store_or_float_holds_are_client_errors_on_the_device_routes(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    # Each of these answered 500: a float overflow, a BIGINT overflow, a NULL timestamp,
    # int() of thousands of digits or of a non-ASCII digit, a recursion limit.
    p = sqlite_plane
    dev = p.enroll()
    headers = dev.headers("GET", "/device/v1/desired")
    for stamp in (
        "1" + "0" * 400,
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660".encode(),
        "1_700_000_000",
    ):
        for extra in ({}, {"if-none-match": '"1"'}):  # the full route and the fast path
            r = p.client.get(
                "/device/v1/desired", headers={**headers, "X-Edgewise-Timestamp": stamp, **extra}
            )
            assert (r.status_code, _code(r)) == (401, "malformed"), (stamp, r.text)
    body = b"{}"
    r = p.client.post(
        "/device/v1/report",
        content=body,
        headers={
            **dev.headers("POST", "/device/v1/report", body),
            "X-Edgewise-Timestamp": "9" * 400,
        },
    )
    assert (r.status_code, _code(r)) == (401, "malformed")
    for report in ({"revision": 2**63}, {"revision": 0, "agent": {"buffer_depth": -1}}):
        r = dev.post("/device/v1/report", report)
        assert (r.status_code, _code(r)) == (422, "invalid_request"), r.text
    nan = b'{"records":[{"seq":1,"cls":"event","ts":NaN,"kind":"x","data":{}}]}'
    deep = (
        b'{"records":[{"seq":1,"cls":"event","ts":1,"kind":"x","data":{"a":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}}]}"
    )
    for raw in (nan, deep):
        r = dev.post("/device/v1/telemetry", gzip.compress(raw), **{"content-encoding": "gzip"})
        assert r.status_code == 422 and "error" in r.json(), r.text
    # An entity tag no revision has is no match (the document is sent), not an error.
    for tag in ('"' + "9" * 4301 + '"', b'"\xb2"'):
        r = dev.get("/device/v1/desired", **{"if-none-match": tag})  # type: ignore[dict-item]
        assert r.status_code == 200 and r.json()["document"]["revision"] == 1, tag
    p.trust(examples["pub"])
    sha = p.push(examples["bundles"]["digits-logreg@1.0.0"]).json()["sha256"]
    for rng in ("bytes=0-" + "9" * 5000, "bytes=" + "9" * 5000 + "-"):
        r = dev.get(f"/device/v1/artifacts/{sha}", range=rng)
        assert (r.status_code, _code(r)) == (416, "bad_range"), rng
    assert dev.get("/device/v1/desired").status_code == 200  # and the device still works
