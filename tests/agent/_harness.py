"""Real processes for agent integration tests: a control plane and agents, on loopback."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

EDGEWISE = str(Path(sys.executable).with_name("edgewise"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            last = None
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class ControlPlaneProc:
    """`edgewise server` in a subprocess with its own data dir and port."""

    def __init__(self, data: Path, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.env = {**os.environ, **(env or {})}
        out = subprocess.run(
            [EDGEWISE, "server", "init", "--data", str(data)],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
        )
        self.token = out.stdout.strip().splitlines()[-1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data / "server.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [EDGEWISE, "server", "--data", str(self.data), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        wait_for(
            lambda: httpx.get(self.url + "/api/v1/whoami", headers=self.auth).status_code == 200,
            60,
            "control plane up",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def api(self, method: str, path: str, **kw: Any) -> Any:
        headers = {**self.auth, **kw.pop("headers", {})}
        r = httpx.request(method, self.url + "/api/v1" + path, headers=headers, timeout=60, **kw)
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json()

    def trust(self, pub_pem: Path) -> None:
        from edgewise.bundle import load_public_key, public_key_to_b64

        key = public_key_to_b64(load_public_key(pub_pem))
        self.api("POST", "/publisher-keys", json={"public_key": key, "name": "examples"})

    def push(self, bundle: Path) -> dict[str, Any]:
        return self.api(  # type: ignore[no-any-return]
            "POST",
            "/models",
            content=bundle.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )

    def enroll_token(self, max_uses: int = 1, tag: str = "") -> str:
        body: dict[str, Any] = {"max_uses": max_uses}
        if tag:
            body["labels"] = {"t": tag}
        return str(self.api("POST", "/enroll-tokens", json=body)["token"])

    def deploy(
        self, name: str, model: str, priority: int = 0, tag: str = "", **spec: Any
    ) -> dict[str, Any]:
        """Deploy pipeline `digits`; with a tag, only to the agent enrolled with that tag."""
        body = {
            "name": f"{tag}-{name}" if tag else name,
            "selector": f"t={tag}" if tag else "",
            "priority": priority,
            "pipelines": {"digits": {"model": model, **spec}},
        }
        return self.api("POST", "/deployments", json=body)  # type: ignore[no-any-return]

    def device(self, device_id: str) -> dict[str, Any]:
        return self.api("GET", f"/devices/{device_id}")  # type: ignore[no-any-return]


class AgentProc:
    """`edgewise agent` in a subprocess."""

    def __init__(
        self, data: Path, server: str, token: str | None = None, *extra: str, tag: str = ""
    ) -> None:
        self.tag = tag
        self.data = data
        self.server = server
        self.token = token
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / f"{data.name}.log"

    def start(self, env: dict[str, str] | None = None, *extra: str) -> None:
        (self.data / "local.json").unlink(missing_ok=True)
        cmd = [
            EDGEWISE,
            "agent",
            "--server",
            self.server,
            "--data",
            str(self.data),
            "--local-port",
            "0",
            "--poll-wait",
            "2",
            *self.extra,
            *extra,
        ]
        if self.token:
            cmd += ["--enroll-token", self.token]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    @property
    def port(self) -> int:
        return int(json.loads((self.data / "local.json").read_text())["port"])

    def wait_up(self, timeout: float = 60) -> None:
        wait_for(lambda: self.local("GET", "/healthz").status_code == 200, timeout, "agent up")

    def local(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{self.port}{path}", timeout=30, **kw)

    def status(self) -> dict[str, Any]:
        return self.local("GET", "/status").json()  # type: ignore[no-any-return]

    def device_id(self) -> str:
        ident = json.loads((self.data / "identity.json").read_text())
        return str(ident["doc"]["device_id"])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def wait_exit(self, timeout: float = 120) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def infer(self, pipeline: str = "digits") -> dict[str, Any]:
        r = self.local("POST", f"/v1/pipelines/{pipeline}/infer", json={"inputs": [[0.0] * 64]})
        if r.status_code != 200:
            raise ValueError(r.text)  # wait_for retries on ValueError
        return r.json()  # type: ignore[no-any-return]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class TamperProxy:
    """A real HTTP proxy in front of the control plane that can replace desired-state answers.

    Everything is forwarded byte for byte (device signatures cover method, path and body,
    not the host), except `GET /device/v1/desired` while `replace` is set.
    """

    def __init__(self, upstream: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.upstream = upstream
        self.replace: tuple[bytes, str] | None = None
        self.last_desired: bytes | None = None
        self.down = False
        self.cut_artifact_after: int | None = None
        self.artifact_ranges: list[str | None] = []
        self.artifact_bytes_sent = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if proxy.down:
                    self.send_response(503)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                replace = proxy.replace
                if self.path.startswith("/device/v1/desired") and replace is not None:
                    doc, etag = replace
                    self.send_response(200)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(doc)))
                    self.end_headers()
                    self.wfile.write(doc)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = httpx.request(
                    self.command,
                    proxy.upstream + self.path,
                    headers=headers,
                    content=body,
                    timeout=120,
                )
                if self.path.startswith("/device/v1/desired") and r.status_code == 200:
                    proxy.last_desired = r.content
                content = r.content
                if self.path.startswith("/device/v1/artifacts/") and r.status_code < 300:
                    proxy.artifact_ranges.append(self.headers.get("Range"))
                    cut, proxy.cut_artifact_after = proxy.cut_artifact_after, None
                    if cut is not None:
                        self.send_response(r.status_code)
                        self.send_header("Content-Length", str(len(content)))
                        self.end_headers()
                        self.wfile.write(content[:cut])
                        self.wfile.flush()
                        proxy.artifact_bytes_sent += cut
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    proxy.artifact_bytes_sent += len(content)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = _forward
            do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
