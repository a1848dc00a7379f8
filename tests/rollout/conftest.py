"""Fixtures for rollouts and the fleet simulator: real control planes in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# The console script of this venv: the control plane runs as users run it.
EDGEWISE = [str(Path(sys.executable).with_name("edgewise"))]


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ControlPlaneProcess:
    """`edgewise server` in a subprocess: start, kill -9, start again on the same data."""

    def __init__(
        self, data: Path, db: str = "", admin: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.data = data
        self.db = db
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / f"{data.name}-{self.port}.log"
        self.admin = admin or self._init()

    def _db_args(self) -> list[str]:
        return ["--db", self.db] if self.db else []

    def _init(self) -> str:
        out = subprocess.run(
            [*EDGEWISE, "server", "init", "--data", str(self.data), *self._db_args()],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def start(self) -> ControlPlaneProcess:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [
                    *EDGEWISE,
                    "server",
                    "--data",
                    str(self.data),
                    *self._db_args(),
                    "--port",
                    str(self.port),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("control plane did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(
            method,
            self.url + path,
            timeout=60,
            headers={"authorization": f"Bearer {self.admin}"},
            **kw,
        )
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def push(self, bundle: Path) -> None:
        r = httpx.post(
            self.url + "/api/v1/models",
            content=bundle.read_bytes(),
            timeout=60,
            headers={
                "authorization": f"Bearer {self.admin}",
                "content-type": "application/octet-stream",
            },
        )
        assert r.status_code in (200, 201), r.text

    def deploy(self, name: str, selector: str, model: str, priority: int = 0) -> Any:
        return self.api(
            "POST",
            "/api/v1/deployments",
            json={
                "name": name,
                "selector": selector,
                "priority": priority,
                "pipelines": {"digits": {"model": model}},
            },
        )


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Signed example bundles and their publisher key (base64)."""
    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    out = tmp_path_factory.mktemp("examples")
    bundles = build_examples(out)
    pub = public_key_to_b64(load_public_key(out / "examples.pub"))
    return {"bundles": bundles, "pub": pub, "dir": out}


def prepared_plane(data: Path, examples: dict[str, Any], db: str = "") -> ControlPlaneProcess:
    """A started control plane that trusts the example key and holds the digits models."""
    plane = ControlPlaneProcess(data, db).start()
    plane.api("POST", "/api/v1/publisher-keys", json={"public_key": examples["pub"], "name": "ex"})
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-mlp@2.0.0"):
        plane.push(examples["bundles"][ref])
    return plane


@pytest.fixture(scope="module")
def shared_plane(
    tmp_path_factory: pytest.TempPathFactory, examples: dict[str, Any]
) -> Iterator[ControlPlaneProcess]:
    """One control plane for a test module (tests keep apart by label selectors)."""
    plane = prepared_plane(tmp_path_factory.mktemp("cp") / "data", examples)
    yield plane
    plane.kill()


@pytest.fixture
def world(tmp_path: Path, examples: dict[str, Any]) -> Iterator[Any]:
    """An in-process control plane (SQLite) whose rollout driver the test steps."""
    from .inproc import make_world

    yield from make_world(tmp_path, examples)
