"""Web console page cost at fleet scale: server time per page.

Builds a control plane (SQLite) with 1,000 devices (labels, capabilities, reported
pipelines with timelines, telemetry windows), three deployments, two model versions and
20 rollouts over the whole fleet, inserted directly through the store. Each console page
is then requested over loopback HTTP (a real uvicorn server, signed-in cookie) several
times; an outermost ASGI wrapper measures server time from the request's arrival to the
last byte of the response. The median per page is reported.

Rollouts are started through the control plane's `/api/v1/rollouts` (one per deployment
layer of two sites, to revision 2 = digits-mlp 1.1.0; the driver runs them while the
pages are timed).

    .venv/bin/python bench/console.py [--devices 1000] [--rollouts 20] [--repeat 3]

Last line: one JSON object with slowest_page_ms (goal < 1000) and per-page medians.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import insert

from edgewise.control import Settings, create_app, open_store
from edgewise.control import _schema as schema

SITES = [f"store-{i}" for i in range(40)]
HW = ["cpu-small", "cpu-large", "jetson-orin"]


class Timer:
    """Outermost ASGI wrapper: server time per request path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.samples: dict[str, list[float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                key = scope["path"] + (
                    "?" + scope["query_string"].decode() if scope["query_string"] else ""
                )
                self.samples.setdefault(key, []).append((time.perf_counter() - start) * 1000)

        await self.app(scope, receive, timed_send)


def window(
    version: str, end: float, rng: random.Random, reference: dict[str, Any]
) -> dict[str, Any]:
    """A telemetry window in the agent's format (counts, latency, confidence, drift, features)."""
    ok = rng.randint(80, 120)
    latency = [0, rng.randint(20, 40), rng.randint(30, 60), rng.randint(5, 15), 1, 0, 0, 0]
    return {
        "pipeline": "digits",
        "model": "digits-mlp",
        "version": version,
        "deployment": "digits",
        "start": end - 60,
        "end": end,
        "counts": {"ok": ok, "failed": rng.randint(0, 3)},
        "latency": {
            "bounds": [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0],
            "stages": {"total": {"counts": latency, "sum": 2.5 * sum(latency)}},
        },
        "confidence": {
            "edges": reference["confidence"]["bin_edges"],
            "counts": [0, 0, 0, 0, 0, 1, 1, 2, 5, 90],
        },
        "drift": {"score": rng.uniform(0, 0.2), "sufficient": True, "samples": ok},
        "features": {
            "features": [
                [round(100 * f) for f in feat["frequencies"]] for feat in reference["features"]
            ],
            "confidence": [0, 0, 0, 0, 0, 1, 1, 2, 5, 90],
            "classes": [rng.randint(5, 15) for _ in range(10)],
        },
    }


def populate(
    store: Any, n: int, rng: random.Random, reference: dict[str, Any]
) -> list[tuple[str, dict[str, str]]]:
    now = time.time()
    devices = []
    telemetry = []
    for i in range(n):
        device_id = f"dev-{i:06d}"
        labels = {"site": rng.choice(SITES), "hw": rng.choice(HW)}
        store.insert_device(
            {
                "id": device_id,
                "public_key": base64.b64encode(os.urandom(32)).decode(),
                "labels": labels,
                "capabilities": {
                    "arch": "x86_64",
                    "cores": 4,
                    "memory_mb": 4096,
                    "runtimes": {"onnxruntime": "1.20.0"},
                    "accelerators": [],
                },
                "status": "active",
                "enrolled_at": now - 86400,
            }
        )
        version = "1.1.0" if i % 4 == 0 else "1.0.0"
        timeline = [
            {"state": s, "reason": s, "at": now - 300 + 10 * k, "progress": None}
            for k, s in enumerate(
                ["downloading", "verifying", "installing", "health_checking", "active"]
            )
        ]
        pipes = {
            "digits": {
                "model": "digits-mlp",
                "version": version,
                "slot": "a",
                "status": "active",
                "reason": "",
                "timeline": timeline,
            }
        }
        store.save_report(device_id, {"revision": 1, "pipelines": pipes}, now - rng.uniform(0, 200))
        for k in range(10):
            ts = now - 600 + 60 * k
            telemetry.append(
                {
                    "device_id": device_id,
                    "seq": k + 1,
                    "cls": "metric",
                    "ts": ts,
                    "kind": "window",
                    "received_at": ts,
                    "data": window(version, ts, rng, reference),
                }
            )
        devices.append((device_id, labels))
    with store.engine.begin() as c:
        c.execute(insert(schema.telemetry), telemetry)
    return devices


def seed_rollouts(api: httpx.Client, auth: dict[str, str], n: int) -> None:
    """Start `n` rollouts through the real API: revision 2 (1.1.0) of each site layer."""
    for k in range(n):
        name = f"sites-{k:02d}"
        r = api.post(
            f"/api/v1/deployments/{name}/revisions",
            json={"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}},
            headers=auth,
        )
        r.raise_for_status()
        spec = {"canary": 2, "waves": [50, 100], "soak_s": 600.0}
        body = {"deployment": name, "to_revision": r.json()["revision"], "spec": spec}
        api.post("/api/v1/rollouts", json=body, headers=auth).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    root = Path(tempfile.mkdtemp(prefix="ew-console-bench-"))
    bundles = build_examples(root / "examples")
    pub = public_key_to_b64(load_public_key(root / "examples" / "examples.pub"))
    (root / "data").mkdir()
    settings = Settings(data_dir=root / "data")
    store = open_store(settings.database_url)
    t0 = time.perf_counter()
    with zipfile.ZipFile(bundles["digits-mlp@1.0.0"]) as z:
        reference = json.loads(z.read("manifest.json"))["reference"]
    devices = populate(store, args.devices, random.Random(1), reference)
    fill_s = time.perf_counter() - t0
    app: FastAPI = create_app(settings, store)
    admin = app.state.plane.bootstrap_admin()
    timer = Timer(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(timer, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    auth = {"authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, timeout=60) as api:
        api.post(
            "/api/v1/publisher-keys", json={"public_key": pub}, headers=auth
        ).raise_for_status()
        for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
            api.post(
                "/api/v1/models",
                content=bundles[ref].read_bytes(),
                headers={**auth, "content-type": "application/octet-stream"},
            ).raise_for_status()
        layers = [("digits", "", 0), ("digits-orin", "hw=jetson-orin", 5)]
        # One deployment per pair of sites (50 devices each): what the rollouts move.
        sites = [f"site in ({SITES[2 * k]},{SITES[2 * k + 1]})" for k in range(args.rollouts)]
        layers += [(f"sites-{k:02d}", sel, 10) for k, sel in enumerate(sites)]
        for name, selector, prio in layers:
            body = {
                "name": name,
                "selector": selector,
                "priority": prio,
                "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
            }
            api.post("/api/v1/deployments", json=body, headers=auth).raise_for_status()
        seed_rollouts(api, auth, args.rollouts)
        listed = api.get("/api/v1/rollouts", headers=auth).json()
        assert len(listed) == args.rollouts, listed
        rollout_id = listed[0]["id"]
    setup_s = time.perf_counter() - t0
    pages = [
        "/",
        "/devices",
        "/devices?selector=site%3Dstore-1",
        f"/devices/{devices[0][0]}",
        "/models",
        "/models/digits-mlp/1.0.0",
        "/deployments",
        "/deployments/digits",
        "/rollouts",
        f"/rollouts/{rollout_id}",
        f"/rollouts/{rollout_id}/progress",
        "/drift",
        "/drift/digits-mlp/1.0.0",
    ]
    with httpx.Client(base_url=url, timeout=60) as browser:
        r = browser.post("/login", data={"token": admin}, headers={"origin": url})
        assert r.status_code == 303, r.text
        for page in pages:
            for _ in range(args.repeat):
                resp = browser.get(page)
                assert resp.status_code == 200, (page, resp.status_code, resp.text[:300])
    server.should_exit = True
    thread.join(timeout=10)
    store.close()
    medians = {p: statistics.median(timer.samples[p]) for p in pages}
    print(
        f"{args.devices} devices, {args.rollouts} rollouts, {args.repeat} requests per page "
        f"(store filled in {fill_s:.1f} s, all set up in {setup_s:.1f} s)"
    )
    print(f"{'page':<40} {'median ms':>10} {'max ms':>10}")
    for p in pages:
        print(f"{p:<40} {medians[p]:>10.1f} {max(timer.samples[p]):>10.1f}")
    slowest = max(medians, key=lambda p: medians[p])
    print(
        json.dumps(
            {
                "slowest_page_ms": round(medians[slowest], 1),
                "slowest_page": slowest,
                "devices": args.devices,
                "rollouts": args.rollouts,
            }
        )
    )


if __name__ == "__main__":
    main()
