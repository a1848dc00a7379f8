"""An in-process control plane with a rollout driver stepped by hand, and signed devices."""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from edgewise.control import Settings, create_app, open_store
from edgewise.control._rollout_driver import RolloutDriver
from edgewise.protocol import sign_request


@dataclass
class Clock:
    """A settable clock."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


class Dev:
    """A device speaking the signed protocol through the test client."""

    def __init__(
        self, world: World, device_id: str, key: Ed25519PrivateKey, labels: dict[str, str]
    ) -> None:
        self.world, self.id, self.key, self.labels = world, device_id, key, labels

    def _headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(self.key, self.id, method, path, body, self.world.clock())

    def desired(self) -> dict[str, Any]:
        path = "/device/v1/desired"
        r = self.world.client.get(path, headers=self._headers("GET", path))
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()["document"]
        return doc

    def version(self) -> str:
        return str(self.desired()["pipelines"]["digits"]["model"]["version"])

    def report(
        self, version: str, status: str, reason: str = "", agent: dict[str, Any] | None = None
    ) -> None:
        body = json.dumps(
            {
                "revision": self.desired()["revision"],
                "pipelines": {
                    "digits": {
                        "model": "digits-mlp",
                        "version": version,
                        "status": status,
                        "reason": reason,
                    }
                },
                "agent": agent or {},
            }
        ).encode()
        h = {**self._headers("POST", "/device/v1/report", body), "content-type": "application/json"}
        r = self.world.client.post("/device/v1/report", content=body, headers=h)
        assert r.status_code == 200, r.text


class World:
    """App + admin + driver + devices."""

    def __init__(self, client: TestClient, app: Any, admin: str, clock: Clock) -> None:
        self.client, self.app, self.admin, self.clock = client, app, admin, clock
        self.plane = app.state.plane
        self.driver = RolloutDriver(self.plane, owner="test-driver")

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"authorization": f"Bearer {token or self.admin}", **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.api(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def token(self, role: str, scope: str | None = None) -> str:
        return str(
            self.ok("POST", "/api/v1/tokens", json={"name": role, "role": role, "scope": scope})[
                "token"
            ]
        )

    def enroll(self, capabilities: dict[str, Any] | None = None, **labels: str) -> Dev:
        tok = self.ok("POST", "/api/v1/enroll-tokens", json={"labels": {}})["token"]
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        r = self.client.post(
            "/device/v1/enroll",
            json={
                "token": tok,
                "public_key": base64.b64encode(raw).decode(),
                "labels": labels,
                "capabilities": capabilities or {},
            },
        )
        assert r.status_code == 201, r.text
        return Dev(self, r.json()["device_id"], key, labels)

    def tick(self, n: int = 1) -> dict[str, Any] | None:
        for _ in range(n):
            self.driver.tick()
        return None

    def rollout(self, rollout_id: str, **params: str) -> dict[str, Any]:
        view: dict[str, Any] = self.ok("GET", f"/api/v1/rollouts/{rollout_id}", params=params)
        return view

    def audit(self, prefix: str = "") -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.ok("GET", "/api/v1/audit", params={"limit": 10000})
        return [r for r in rows if r["action"].startswith(prefix)]


def make_world(
    tmp: Path, examples: dict[str, Any], url: str | None = None, **settings: Any
) -> Iterator[World]:
    store = open_store(url or f"sqlite:///{tmp / 'cp.db'}")
    clock = Clock()
    app = create_app(
        Settings(data_dir=tmp / "data", **settings), store, clock=clock, background=False
    )
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        w = World(client, app, admin, clock)
        w.ok("POST", "/api/v1/publisher-keys", json={"public_key": examples["pub"], "name": "ex"})
        for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-mlp@2.0.0"):
            r = w.api(
                "POST",
                "/api/v1/models",
                content=examples["bundles"][ref].read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
        yield w
    store.close()
