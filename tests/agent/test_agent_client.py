"""The device client (sync and asyncio) against a real control plane, and local API inputs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgewise.agent as agent_pkg
from edgewise._httpd import Deferred, Handler
from edgewise.agent import AsyncDeviceClient, DeviceAuthError, DeviceClient, DeviceKey, UplinkError
from edgewise.agent._identity import public_key_b64
from edgewise.agent._local import MAX_BODY, LocalServer, make_local_app
from edgewise.protocol import Report, TelemetryBatch, TelemetryRecord

from ._harness import ControlPlaneProc


def test_public_names_are_sorted_and_importable() -> None:
    def isort_style(name: str) -> tuple[int, str]:  # constants, classes, functions (RUF022)
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert agent_pkg.__all__ == sorted(set(agent_pkg.__all__), key=isort_style)
    for name in agent_pkg.__all__:
        assert getattr(agent_pkg, name) is not None


@pytest.mark.slow
def test_async_client_speaks_the_device_protocol(
    shared_cp: ControlPlaneProc, example_bundles: dict[str, Path]
) -> None:
    cp = shared_cp
    token = cp.enroll_token()
    key = Ed25519PrivateKey.generate()
    bundle = example_bundles["digits-mlp@1.0.0"].read_bytes()
    sha = hashlib.sha256(bundle).hexdigest()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=cp.url) as http:
            client = AsyncDeviceClient(http)
            answer = await client.enroll(token, public_key_b64(key), {"site": "a"}, {"arch": "x"})
            client.key = DeviceKey(answer["device_id"], key)
            first = await client.desired()
            assert first.signed is not None and first.etag
            unchanged = await client.desired(first.etag, 0)
            assert unchanged.signed is None
            await client.report(Report(revision=first.signed.document.revision))
            rec = TelemetryRecord(seq=1, cls="event", ts=0.0, kind="boot", data={})
            ack = await client.telemetry(TelemetryBatch(records=[rec]))
            assert ack.accepted == 1 and ack.acked_seq == 1
            again = await client.telemetry(TelemetryBatch(records=[rec]))
            assert again.duplicates == 1 and again.accepted == 0
            async with client.open(f"/device/v1/artifacts/{sha}", 100) as resp:
                assert resp.status_code == 206
                assert await resp.aread() == bundle[100:]

    asyncio.run(scenario())


@pytest.mark.slow
def test_sync_client_reports_auth_failures_as_device_auth_errors(
    shared_cp: ControlPlaneProc,
) -> None:
    with httpx.Client(base_url=shared_cp.url) as http:
        stranger = DeviceClient(http, DeviceKey("dev-unknown", Ed25519PrivateKey.generate()))
        with pytest.raises(DeviceAuthError):
            stranger.desired()
        with pytest.raises(UplinkError):
            DeviceClient(http).enroll(
                "not-a-token", public_key_b64(Ed25519PrivateKey.generate()), {}, {}
            )


def _call(app: Handler, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    async def run() -> tuple[int, bytes]:
        answer = app(method, path, {}, body)
        if isinstance(answer, Deferred):
            await answer.fut
            answer = answer.finish()
        return answer[0], answer[1]

    return asyncio.run(run())


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"records": "x"}',
        b'{"records": [{"cls": "bogus", "kind": "k"}]}',
        b'{"records": [{"cls": "event", "kind": ""}]}',
        b'{"records": [{"cls": "event", "kind": "k", "data": []}]}',
        b'{"records": [{"cls": "event", "kind": "k", "ts": "yesterday"}]}',
        pytest.param(b'{"records": [{"cls": "event", "kind": "k", "ts": NaN}]}', id="nan"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nesting-past-any-parser"),
        pytest.param(  # orjson reads 1,000 levels; the buffer's json.dumps recursed (a 500)
            b'{"records": [{"cls": "event", "kind": "k", "data": {"a": '
            + b"[" * 1000
            + b"]" * 1000
            + b"}}]}",
            id="data-nested-past-the-buffer",
        ),
    ],
)
def test_local_telemetry_endpoint_refuses_bad_records_with_400(body: bytes) -> None:
    stored: list[object] = []
    app = make_local_app(lambda: {}, lambda r: stored.append(r) or len(r), lambda: None)
    status, raw = _call(app, "POST", "/telemetry", body)
    assert status == 400 and b'"bad_request"' in raw
    assert stored == []


def test_local_endpoints_answer_health_status_and_unknown_routes() -> None:
    app = make_local_app(lambda: {"pipelines": {}}, lambda r: len(r), lambda: None)
    assert _call(app, "GET", "/healthz") == (200, b'{"ok": true}')
    assert _call(app, "GET", "/status")[0] == 200
    assert _call(app, "GET", "/telemetry")[0] == 405
    assert _call(app, "POST", "/v1/pipelines/x/infer")[0] == 404
    ok = b'{"records": [{"cls": "metric", "kind": "app.m", "data": {"v": 1}}]}'
    assert _call(app, "POST", "/telemetry", ok) == (200, b'{"stored": 1}')


def test_local_server_answers_over_http_and_bounds_what_it_reads() -> None:
    stored: list[object] = []

    def add(records: list[object]) -> int:
        if len(records) == 2:
            raise OSError("disk full")  # the buffer failing: a 500 with a JSON body
        stored.extend(records)
        return len(records)

    inference: list[Handler] = []
    app = make_local_app(
        lambda: {"pipelines": {}}, add, lambda: inference[0] if inference else None
    )
    server = LocalServer(app, 0)
    port = server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/healthz").json() == {"ok": True}
            assert http.get("/status").json() == {"pipelines": {}}
            one = {"records": [{"cls": "event", "kind": "app.e"}]}
            assert http.post("/telemetry", json=one).json() == {"stored": 1}
            failed = http.post("/telemetry", json={"records": one["records"] * 2})
            assert failed.status_code == 500 and "disk full" in failed.json()["error"]["message"]
            big = http.post("/telemetry", content=b" " * (MAX_BODY + 1))
            assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
            assert http.post("/v1/pipelines/x/infer", json=[1]).status_code == 404
            inference.append(lambda m, p, h, b: (200, b'{"inner": true}', ()))
            assert http.post("/v1/pipelines/x/infer", json=[1]).json() == {"inner": True}
        assert len(stored) == 1
    finally:
        server.stop()


@pytest.fixture
def fixed_answer() -> Iterator[tuple[str, list[bytes]]]:
    """A real loopback server answering every request 200 with the body put in the list."""
    body: list[bytes] = [b""]

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("ETag", '"7"')
            self.send_header("Content-Length", str(len(body[0])))
            self.end_headers()
            self.wfile.write(body[0])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", body
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"<html>", "not JSON"),
        (b'{"document": {"revision": "x"}, "key_id": "k", "signature": "s"}', "document."),
        (b'{"key_id": "k", "signature": "s"}', "document: Field required"),
        (b"[1, 2]", "document: Input should be"),
    ],
)
def test_an_answer_that_is_not_a_signed_document_is_malformed_not_raised(
    fixed_answer: tuple[str, list[bytes]], answer: bytes, said: str
) -> None:
    url, body = fixed_answer
    body[0] = answer
    with httpx.Client(base_url=url) as http:
        client = DeviceClient(http, DeviceKey("dev-1", Ed25519PrivateKey.generate()))
        poll = client.desired()
    assert poll.signed is None and poll.etag == '"7"'
    assert said in poll.malformed, poll.malformed
