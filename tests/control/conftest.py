"""Fixtures for the control plane: stores on SQLite and PostgreSQL, an app, devices."""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

with warnings.catch_warnings():
    # starlette nudges towards httpx2; the httpx-based TestClient is what is installed.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from edgewise.control import Settings, SqlStore, create_app, open_store
from edgewise.protocol import sign_request


@dataclass
class Clock:
    """A settable clock."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Signed example bundles and the publisher key that signed them."""
    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    out = tmp_path_factory.mktemp("examples")
    bundles = build_examples(out)
    pub = public_key_to_b64(load_public_key(out / "examples.pub"))
    return {"bundles": bundles, "pub": pub, "key": out / "examples.key", "dir": out}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL: SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    s = open_store(store_url)
    yield s
    s.close()


def pubkey_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


class Device:
    """A test device speaking the real signed protocol through a client."""

    def __init__(self, client: Any, clock: Any, device_id: str, key: Ed25519PrivateKey) -> None:
        self.client = client
        self.clock = clock
        self.id = device_id
        self.key = key

    def headers(self, method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(self.key, self.id, method, path_qs, body, self.clock())

    def get(self, path_qs: str, **headers: str) -> Any:
        return self.client.get(path_qs, headers={**self.headers("GET", path_qs), **headers})

    def post(self, path_qs: str, data: Any, **headers: str) -> Any:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        h = {**self.headers("POST", path_qs, body), "content-type": "application/json", **headers}
        return self.client.post(path_qs, content=body, headers=h)


class Plane:
    """A running app (TestClient) plus an admin token and helpers."""

    def __init__(self, client: TestClient, admin: str, clock: Clock, settings: Settings) -> None:
        self.client = client
        self.admin = admin
        self.clock = clock
        self.settings = settings

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.admin}"}

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {**self.auth(token), **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def token(self, role: str, scope: str | None = None, name: str = "t") -> str:
        r = self.api("POST", "/api/v1/tokens", json={"name": name, "role": role, "scope": scope})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def enroll(
        self,
        labels: dict[str, str] | None = None,
        caps: dict[str, Any] | None = None,
        token_labels: dict[str, str] | None = None,
    ) -> Device:
        r = self.api("POST", "/api/v1/enroll-tokens", json={"labels": token_labels or {}})
        assert r.status_code == 201, r.text
        key = Ed25519PrivateKey.generate()
        r = self.client.post(
            "/device/v1/enroll",
            json={
                "token": r.json()["token"],
                "public_key": pubkey_b64(key),
                "labels": labels or {},
                "capabilities": caps or {},
            },
        )
        assert r.status_code == 201, r.text
        return Device(self.client, self.clock, r.json()["device_id"], key)

    def trust(self, pub: str) -> None:
        r = self.api("POST", "/api/v1/publisher-keys", json={"public_key": pub, "name": "ex"})
        assert r.status_code == 201, r.text

    def push(self, path: Path, token: str | None = None) -> Any:
        return self.api(
            "POST",
            "/api/v1/models",
            token=token,
            content=path.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )

    def deploy_digits(self, examples: dict[str, Any], name: str, selector: str) -> None:
        """Trust the examples' key, push digits-mlp@1.0.0 and deploy it to `selector`."""
        self.trust(examples["pub"])
        assert self.push(examples["bundles"]["digits-mlp@1.0.0"]).status_code == 201
        pipelines = {"digits": {"model": "digits-mlp@1.0.0"}}
        body = {"name": name, "selector": selector, "pipelines": pipelines}
        r = self.api("POST", "/api/v1/deployments", json=body)
        assert r.status_code == 201, r.text


def make_plane(store: SqlStore, data_dir: Path, **settings: Any) -> tuple[Any, Clock, Settings]:
    clock = Clock()
    s = Settings(data_dir=data_dir, **settings)
    app = create_app(s, store, clock=clock, background=False)
    return app, clock, s


@pytest.fixture
def plane(store: SqlStore, tmp_path: Path) -> Iterator[Plane]:
    app, clock, settings = make_plane(store, tmp_path / "data")
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Plane(client, admin, clock, settings)


@pytest.fixture
def sqlite_plane(tmp_path: Path) -> Iterator[Plane]:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    app, clock, settings = make_plane(store, tmp_path / "data")
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Plane(client, admin, clock, settings)
    store.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real uvicorn server on loopback (in a thread) over SQLite."""
    import threading

    import uvicorn

    store = open_store(f"sqlite:///{tmp_path / 'live.db'}")
    app = create_app(Settings(data_dir=tmp_path / "live-data"), store)
    admin = app.state.plane.bootstrap_admin()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "admin": admin, "app": app}
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        store.close()
