"""Long-poll against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.control import Settings, create_app, open_store
from edgewise.protocol import sign_request

from .conftest import pubkey_b64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, examples: dict[str, Any]) -> Iterator[dict[str, Any]]:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    app = create_app(Settings(data_dir=tmp_path / "data"), store)
    admin = app.state.plane.bootstrap_admin()
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", backlog=2048, timeout_keep_alive=30
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    h = {"authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=base, headers=h) as c:
        c.post("/api/v1/publisher-keys", json={"public_key": examples["pub"], "name": "ex"})
        for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
            c.post("/api/v1/models", content=examples["bundles"][ref].read_bytes())
    try:
        yield {"base": base, "admin": h}
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        store.close()


def _enroll(base: str, admin: dict[str, str], n: int) -> list[tuple[str, Ed25519PrivateKey]]:
    out = []
    with httpx.Client(base_url=base, headers=admin) as c:
        tok = c.post("/api/v1/enroll-tokens", json={"max_uses": n}).json()["token"]
        for _ in range(n):
            key = Ed25519PrivateKey.generate()
            r = c.post("/device/v1/enroll", json={"token": tok, "public_key": pubkey_b64(key)})
            out.append((r.json()["device_id"], key))
    return out


async def _poll(
    client: httpx.AsyncClient, dev: str, key: Ed25519PrivateKey, etag: str, wait: float
) -> httpx.Response:
    path = f"/device/v1/desired?wait={wait:g}"
    headers = sign_request(key, dev, "GET", path, b"", time.time())
    headers["if-none-match"] = etag
    return await client.get(path, headers=headers, timeout=wait + 30)


def _deploy(base: str, admin: dict[str, str], name: str, ref: str) -> None:
    with httpx.Client(base_url=base, headers=admin) as c:
        r = c.post(
            "/api/v1/deployments",
            json={"name": name, "priority": int(ref[-3]), "pipelines": {"digits": {"model": ref}}},
        )
        assert r.status_code == 201, r.text


def test_a_change_wakes_a_waiting_request(server: dict[str, Any]) -> None:
    ((dev, key),) = _enroll(server["base"], server["admin"], 1)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server["base"]) as client:
            waiting = asyncio.create_task(_poll(client, dev, key, '"1"', 120))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await asyncio.to_thread(
                _deploy, server["base"], server["admin"], "d", "digits-mlp@1.0.0"
            )
            return await waiting

    r = asyncio.run(scenario())
    assert r.status_code == 200
    assert r.headers["etag"] == '"2"'
    assert r.json()["document"]["pipelines"]["digits"]["model"]["version"] == "1.0.0"


def test_unchanged_poll_times_out_with_304(server: dict[str, Any]) -> None:
    ((dev, key),) = _enroll(server["base"], server["admin"], 1)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server["base"]) as client:
            return await _poll(client, dev, key, '"1"', 0.3)

    r = asyncio.run(scenario())
    assert r.status_code == 304 and r.headers["etag"] == '"1"'


@pytest.mark.slow
def test_a_thousand_waiting_requests_are_held_and_all_woken(server: dict[str, Any]) -> None:
    devices = _enroll(server["base"], server["admin"], 50)
    n = 1000

    async def scenario() -> list[httpx.Response]:
        # Many small clients: one httpx pool with 1,000 connections does O(n) work per
        # request, which would measure the client rather than the server.
        clients = [httpx.AsyncClient(base_url=server["base"]) for _ in range(n // 50)]
        try:
            tasks = [
                asyncio.create_task(
                    _poll(clients[i % len(clients)], *devices[i % len(devices)], '"1"', 120)
                )
                for i in range(n)
            ]
            waiting = 0.0
            for _ in range(600):
                await asyncio.sleep(0.1)
                text = (await clients[0].get("/metrics")).text
                m = re.search(r"^edgewise_longpoll_waiting (\S+)$", text, re.M)
                waiting = float(m.group(1)) if m else 0.0
                if waiting >= n:
                    break
            assert waiting == n
            assert not any(t.done() for t in tasks)
            await asyncio.to_thread(
                _deploy, server["base"], server["admin"], "d", "digits-mlp@1.0.0"
            )
            return await asyncio.gather(*tasks)
        finally:
            for c in clients:
                await c.aclose()

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * n
    assert {r.headers["etag"] for r in responses} == {'"2"'}
