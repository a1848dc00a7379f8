"""A real control plane on loopback with a small fleet, and a real headless Chromium.

The fleet is enrolled through the real device protocol (`edgewise.agent.DeviceClient`:
Ed25519 keys, signed requests), reports pipeline timelines and uploads telemetry
windows, so every console page has something to draw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent import DeviceClient, DeviceKey
from edgewise.control import Settings, create_app, open_store
from edgewise.protocol import PipelineReport, Report, TelemetryBatch, TelemetryRecord
from edgewise.web import mount_console

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
SITES = ("lab", "store-1", "store-2")
LATENCY_BOUNDS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]


@dataclass
class Console:
    """The running control plane and what the tests need to drive it."""

    url: str
    app: Any
    admin: str
    operator: str = ""
    viewer: str = ""
    devices: list[str] = field(default_factory=list)  # scripted, 12
    sim_devices: list[str] = field(default_factory=list)  # the simulator's
    deployment: str = "digits-sim"  # what rollouts move

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token or self.admin}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def route_exists(app: Any, path: str) -> bool:
    """Whether the app routes `path` (asked in process: a GET without credentials)."""

    async def probe() -> bool:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
            r = await client.get(path)
        if r.status_code != 404:
            return True
        return bool(r.json().get("error", {}).get("message") != "Not Found")

    # In a thread of its own: the caller may already run an event loop (Playwright's).
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def reference_of(bundle: Path) -> dict[str, Any]:
    """The `reference` block of a bundle's manifest."""
    with zipfile.ZipFile(bundle) as z:
        return dict(json.loads(z.read("manifest.json"))["reference"])


def window(
    model: str, version: str, end: float, rng: random.Random, reference: dict[str, Any]
) -> dict[str, Any]:
    """A telemetry window as agents send it (`edgewise.agent.telemetry` format).

    Feature 20 is shifted against the reference, so the drift page has a mover to show.
    """
    ok = rng.randint(80, 120)
    latency = [0, rng.randint(20, 40), rng.randint(30, 60), rng.randint(5, 15), 1, 0, 0, 0]
    features = []
    for i, feat in enumerate(reference["features"]):
        freqs = list(feat["frequencies"])
        if i == 20:
            freqs = freqs[::-1]
        features.append([round(100 * f) for f in freqs])
    return {
        "pipeline": "digits",
        "model": model,
        "version": version,
        "deployment": "digits",
        "start": end - 60,
        "end": end,
        "counts": {"ok": ok, "failed": rng.randint(0, 3)},
        "latency": {
            "bounds": LATENCY_BOUNDS,
            "stages": {"total": {"counts": latency, "sum": 2.5 * sum(latency)}},
        },
        "confidence": {
            "edges": reference["confidence"]["bin_edges"],
            "counts": [0, 0, 0, 0, 0, 1, 1, 2, rng.randint(3, 8), rng.randint(60, 100)],
        },
        "drift": {"score": rng.uniform(0.0, 0.2), "sufficient": True, "samples": ok},
        "features": {
            "features": features,
            "confidence": [0, 0, 0, 0, 0, 1, 1, 2, 5, 90],
            "classes": [rng.randint(5, 15) for _ in range(10)],
        },
    }


def _enroll(con: Console, index: int, rng: random.Random, reference: dict[str, Any]) -> str:
    r = con.api("POST", "/api/v1/enroll-tokens", json={"labels": {"site": SITES[index % 3]}})
    assert r.status_code == 201, r.text
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hw = "cpu-large" if index % 2 else "cpu-small"
    caps = {
        "arch": "x86_64",
        "cores": 4,
        "memory_mb": 4096,
        "runtimes": {"onnxruntime": "1.20.0"},
        "execution_providers": ["CPUExecutionProvider"],
        "accelerators": [],
        "power": "mains",
    }
    with httpx.Client(base_url=con.url, timeout=30) as http:
        client = DeviceClient(http)
        answer = client.enroll(r.json()["token"], base64.b64encode(pub).decode(), {"hw": hw}, caps)
        device_id = str(answer["device_id"])
        client.key = DeviceKey(device_id, key)
        poll = client.desired()
        revision = poll.signed.document.revision if poll.signed else 1
        now = time.time()
        steps = ["downloading", "verifying", "installing", "health_checking", "active"]
        timeline = [
            {"state": s, "reason": f"{s} digits-mlp@1.0.0", "at": now - 50 + 10 * i}
            for i, s in enumerate(steps)
        ]
        status = "failed" if index == 5 else "active"
        if status == "failed":
            timeline[-1] = {"state": "failed", "reason": "health check: output mismatch", "at": now}
        pipe = PipelineReport.model_validate(
            {
                "model": "digits-mlp",
                "version": "1.0.0",
                "slot": "a",
                "status": status,
                "reason": timeline[-1]["reason"],
                "timeline": timeline,
            }
        )
        client.report(Report(revision=revision, pipelines={"digits": pipe}))
        records = [
            TelemetryRecord(
                seq=i + 1,
                cls="metric",
                ts=now - 600 + 60 * i,
                kind="window",
                data=window("digits-mlp", "1.0.0", now - 600 + 60 * i, rng, reference),
            )
            for i in range(10)
        ]
        records.append(
            TelemetryRecord(seq=11, cls="event", ts=now, kind="install.succeeded", data={})
        )
        client.telemetry(TelemetryBatch(records=records))
    return device_id


SIM_DEVICES = 8
SIM_DEPLOYMENT = "digits-sim"
SIM_LABELS = "site=sim-a,sim-b;hw=cpu-small"


class SimFleet:
    """The fleet simulator (`edgewise.sim.Fleet`) running in a thread of its own."""

    def __init__(self, url: str, admin: str) -> None:
        self.url, self.admin = url, admin
        self.loop = asyncio.new_event_loop()
        self.fleet: Any = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, ref: str, timeout: float = 90.0) -> None:
        """Enroll the simulated devices and wait until all of them run `ref`."""
        from edgewise.sim import Fleet

        async def go() -> bool:
            self.fleet = Fleet(
                self.url,
                SIM_DEVICES,
                seed=11,
                labels=SIM_LABELS,
                admin_token=self.admin,
                time_scale=0.05,
            )
            await self.fleet.start()
            return bool(
                await self.fleet.run_until(
                    lambda f: f.count_running(ref) == SIM_DEVICES, timeout=timeout
                )
            )

        assert self.call(go(), timeout + 30), f"simulated devices did not reach {ref}"

    def stop(self) -> None:
        if self.fleet is not None:
            self.call(self.fleet.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A control plane (uvicorn, loopback): models, a deployment, 12 scripted devices and a
    simulated fleet (`edgewise.sim`) running beside them for the whole session."""
    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    root = tmp_path_factory.mktemp("console")
    bundles = build_examples(root / "examples")
    pub = public_key_to_b64(load_public_key(root / "examples" / "examples.pub"))
    (root / "data").mkdir()
    settings = Settings(data_dir=root / "data", watch_interval_s=0.2)
    store = open_store(settings.database_url)
    app = create_app(settings, store)
    mount_console(app)  # a no-op once the control plane mounts it itself
    admin = app.state.plane.bootstrap_admin()
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "control plane did not start"
    con = Console(f"http://127.0.0.1:{port}", app, admin)
    try:
        assert (
            con.api("POST", "/api/v1/publisher-keys", json={"public_key": pub}).status_code == 201
        )
        for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
            r = con.api(
                "POST",
                "/api/v1/models",
                content=bundles[ref].read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code in (200, 201), r.text
        r = con.api(
            "POST",
            "/api/v1/deployments",
            json={
                "name": "digits",
                "selector": "",
                "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
            },
        )
        assert r.status_code in (200, 201), r.text
        # The simulated devices get their own layer: rollouts move only them (the
        # scripted devices above never install anything new).
        r = con.api(
            "POST",
            "/api/v1/deployments",
            json={
                "name": SIM_DEPLOYMENT,
                "selector": "site in (sim-a,sim-b)",
                "priority": 10,
                "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
            },
        )
        assert r.status_code in (200, 201), r.text
        for role in ("operator", "viewer"):
            r = con.api("POST", "/api/v1/tokens", json={"name": role, "role": role})
            assert r.status_code == 201, r.text
            setattr(con, role, r.json()["token"])
        rng = random.Random(7)
        reference = reference_of(bundles["digits-mlp@1.0.0"])
        con.devices = [_enroll(con, i, rng, reference) for i in range(12)]
        sim = SimFleet(con.url, admin)
        try:
            sim.start("digits-mlp@1.0.0")
            con.sim_devices = [d.device_id for d in sim.fleet.devices]
            yield con
        finally:
            sim.stop()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():
        reason = "needs Debian's chromium package (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI must run the browser tests, never skip them
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
