"""The real processes of the demo: one control plane and the device agents.

Both run as users run them, through the `edgewise` command, each in its own process
group under `Processes` (so nothing outlives the demo).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from edgewise.demo._api import DemoError
from edgewise.demo._procs import Child, Processes, edgewise_argv, free_port

__all__ = ["AgentProc", "ControlPlaneProc"]


async def _wait_http(url: str, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if not child.alive():
                raise DemoError(f"{child.name} exited: {child.tail()}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise DemoError(f"{child.name} did not answer {url} within {timeout:.0f}s")


class ControlPlaneProc:
    """`edgewise server` on a loopback port with SQLite under `data`."""

    def __init__(self, procs: Processes, data: Path, port: int = 0) -> None:
        self.procs = procs
        self.data = data
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None

    @property
    def db(self) -> Path:
        """The SQLite file."""
        return self.data / "edgewise.db"

    async def init(self) -> str:
        """Create the database and key; returns the one-time admin token."""
        argv = [*edgewise_argv(), "server", "init", "--data", str(self.data)]
        out = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise DemoError(f"edgewise server init failed: {out.stderr.strip()[-500:]}")
        return out.stdout.strip().splitlines()[-1]

    async def start(self) -> None:
        """Serve and wait until `/healthz` answers."""
        argv = [*edgewise_argv(), "server", "--data", str(self.data), "--port", str(self.port)]
        self.child = self.procs.spawn("control-plane", argv)
        await _wait_http(self.url + "/healthz", self.child, 60)


class AgentProc:
    """One `edgewise agent` process with its local API on a free loopback port."""

    def __init__(
        self, procs: Processes, name: str, data: Path, server: str, labels: dict[str, str]
    ) -> None:
        self.procs = procs
        self.name = name
        self.data = data
        self.server = server
        self.labels = labels
        self.child: Child | None = None
        self.local_url = ""
        self.device_id = ""
        self.starts = 0
        self.facts: dict[str, str] = {}  # what the live table shows
        self.http = httpx.AsyncClient(timeout=5.0)

    async def start(self, enroll_token: str | None = None, crash_at: str | None = None) -> None:
        """Start the agent (again) and wait for its local API."""
        local = self.data / "local.json"
        local.unlink(missing_ok=True)
        argv = [
            *edgewise_argv(), "agent", "--data", str(self.data), "--server", self.server,
            "--labels", ",".join(f"{k}={v}" for k, v in self.labels.items()),
            "--local-port", "0", "--poll-wait", "3", "--metrics-interval", "1",
        ]  # fmt: skip
        if enroll_token:
            argv += ["--enroll-token", enroll_token]
        env = {"EDGEWISE_CRASH_AT": crash_at} if crash_at else {"EDGEWISE_CRASH_AT": ""}
        self.starts += 1
        self.child = self.procs.spawn(f"agent-{self.name}", argv, env)
        deadline = time.monotonic() + 60
        while not local.exists():
            if not self.child.alive():
                raise DemoError(f"agent {self.name} exited: {self.child.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"agent {self.name} did not start its local API")
            await asyncio.sleep(0.1)
        self.local_url = f"http://127.0.0.1:{json.loads(local.read_text())['port']}"
        status = await self.status()
        self.device_id = str(status.get("device_id") or "")

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.child is not None and self.child.alive()

    async def status(self) -> dict[str, Any]:
        """The agent's `/status` ({} when it does not answer)."""
        try:
            r = await self.http.get(self.local_url + "/status")
            data: dict[str, Any] = r.json()
            return data
        except (httpx.HTTPError, ValueError):
            return {}

    async def inferences(self, pipeline: str) -> int:
        """Requests the runtime completed for `pipeline` (0 when not serving)."""
        try:
            r = await self.http.get(f"{self.local_url}/v1/pipelines/{pipeline}/stats")
            if r.status_code != 200:
                return 0
            return int(r.json().get("nv_inference_request_success", 0))
        except (httpx.HTTPError, ValueError, TypeError):
            return 0

    async def serving(self, pipeline: str) -> str | None:
        """The version the agent serves in `pipeline`, if it serves it and is active."""
        p = (await self.status()).get("pipelines", {}).get(pipeline) or {}
        if p.get("serving") and p.get("status") == "active":
            return str(p.get("version"))
        return None

    async def close(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()
