"""Two real server processes on one PostgreSQL database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.protocol import sign_request

from .conftest import pubkey_b64

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EDGEWISE = [str(Path(sys.executable).parent / "edgewise")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(base: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''!r}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    data = tmp_path / "data"
    out = subprocess.run(
        [*EDGEWISE, "server", "init", "--data", str(data), "--db", pg_url],
        capture_output=True,
        text=True,
        check=True,
    )
    admin = out.stdout.strip().splitlines()[-1]
    procs, bases = [], []
    try:
        for _ in range(2):
            port = _free_port()
            proc = subprocess.Popen(
                [*EDGEWISE, "server", "--data", str(data), "--db", pg_url, "--port", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            procs.append(proc)
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs, strict=True):
            _wait_healthy(base, proc)
        yield {"bases": bases, "admin": {"authorization": f"Bearer {admin}"}}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


def test_replicas_agree_on_one_object_and_one_desired_state(
    replicas: dict[str, Any], examples: dict[str, Any]
) -> None:
    a, b = replicas["bases"]
    admin = replicas["admin"]
    httpx.post(
        f"{a}/api/v1/publisher-keys",
        headers=admin,
        json={"public_key": examples["pub"], "name": "ex"},
    ).raise_for_status()
    raw = examples["bundles"]["digits-mlp@1.0.0"].read_bytes()

    def push(base: str) -> int:
        return httpx.post(
            f"{base}/api/v1/models", headers=admin, content=raw, timeout=60
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        pushes = list(pool.map(push, [a, b] * 4))
    assert sorted(pushes) == [200] * 7 + [201]
    body = {"name": "base", "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}}

    def create(base: str) -> int:
        return httpx.post(
            f"{base}/api/v1/deployments", headers=admin, json=body, timeout=60
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        creates = list(pool.map(create, [a, b] * 4))
    assert sorted(creates) == [200] * 7 + [201]
    for base in (a, b):
        assert len(httpx.get(f"{base}/api/v1/deployments", headers=admin).json()) == 1
        assert len(httpx.get(f"{base}/api/v1/models", headers=admin).json()) == 1

    tok = httpx.post(f"{a}/api/v1/enroll-tokens", headers=admin, json={}).json()["token"]
    key = Ed25519PrivateKey.generate()
    dev = httpx.post(
        f"{b}/device/v1/enroll", json={"token": tok, "public_key": pubkey_b64(key)}
    ).json()["device_id"]

    def desired(base: str, etag: str | None = None, wait: float = 0) -> httpx.Response:
        path = f"/device/v1/desired?wait={wait:g}"
        headers = sign_request(key, dev, "GET", path, b"", time.time())
        if etag:
            headers["if-none-match"] = etag
        return httpx.get(base + path, headers=headers, timeout=wait + 30)

    ra, rb = desired(a), desired(b)
    assert ra.status_code == rb.status_code == 200
    assert ra.json() == rb.json()
    assert ra.json()["document"]["pipelines"]["digits"]["model"]["version"] == "1.0.0"
    assert httpx.get(f"{a}/api/v1/audit/verify", headers=admin).json()["ok"] is True

    # A change made through one replica wakes a long-poll held by the other.
    etag = ra.headers["etag"]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(desired, b, etag, 60)
        time.sleep(0.5)
        r = httpx.post(
            f"{a}/api/v1/devices/{dev}/labels", headers=admin, json={"set": {"site": "x"}}
        )
        assert r.status_code == 200
        httpx.post(
            f"{a}/api/v1/deployments",
            headers=admin,
            json={
                "name": "x",
                "selector": "site=x",
                "priority": 5,
                "pipelines": {"digits": {"model": "digits-mlp@1.0.0", "priority": "critical"}},
            },
        ).raise_for_status()
        woke = waiting.result(timeout=60)
    assert woke.status_code == 200
    assert woke.json()["document"]["revision"] > ra.json()["document"]["revision"]
