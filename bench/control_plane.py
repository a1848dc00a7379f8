"""Control-plane device API load: desired-state polls (ETag hit -> 304) and reports.

Starts a real `edgewise server` process per store (SQLite, then PostgreSQL), enrolls
devices with real Ed25519 keys, and drives it with load-generator processes that speak the
real device protocol (signed requests, fresh nonce each) over keep-alive HTTP/1.1.
Throughput is per server process; `*_per_core` divides by the CPU seconds the server
process used, so the figure is what one core buys whatever else runs on the machine.

    .venv/bin/python bench/control_plane.py [--seconds 8] [--devices 200] [--conns 64]

Then it measures long-poll wake latency (`--wake-n` label changes per store, each waking
one waiting `GET /device/v1/desired?wait=30`) two ways: from sending the change request
to the poll's answer, and from the new revision's signing (just before its commit) to
the answer, which isolates the commit plus the wake path from the request handling.

Last line: one JSON object with polls_per_s_sqlite, polls_per_s_postgres,
reports_per_s_sqlite, reports_per_s_postgres, server_cores (and per-core figures,
longpoll_wake_ms_* and longpoll_commit_to_answer_ms_*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.protocol import sign_request

EDGEWISE = str(Path(sys.executable).parent / "edgewise")
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _pub_b64(key: Ed25519PrivateKey) -> str:
    import base64

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _drive(
    port: int,
    devices: list[tuple[str, bytes, int]],
    kind: str,
    start_at: float,
    stop_at: float,
    conns: int,
) -> dict[int, int]:
    keys = [(d, Ed25519PrivateKey.from_private_bytes(k), rev) for d, k, rev in devices]
    counts: dict[int, int] = {}

    async def worker(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        i = offset
        try:
            while time.time() < stop_at:
                dev, key, rev = keys[i % len(keys)]
                i += conns
                if kind == "poll":
                    path = "/device/v1/desired"
                    h = sign_request(key, dev, "GET", path, b"", time.time())
                    head = f'GET {path} HTTP/1.1\r\nHost: bench\r\nIf-None-Match: "{rev}"\r\n'
                    body = b""
                else:
                    path = "/device/v1/report"
                    body = json.dumps(
                        {
                            "revision": rev,
                            "pipelines": {
                                "digits": {
                                    "model": "digits-mlp",
                                    "version": "1.0.0",
                                    "slot": "a",
                                    "status": "active",
                                    "reason": "",
                                    "timeline": [
                                        {"state": "active", "reason": "", "at": time.time()}
                                    ],
                                }
                            },
                            "errors": [],
                            "agent": {"version": "bench", "uptime_s": 1.0},
                        }
                    ).encode()
                    h = sign_request(key, dev, "POST", path, body, time.time())
                    head = (
                        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n"
                    )
                head += "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
                status = await _one(reader, writer, head.encode() + body)
                if time.time() <= stop_at:
                    counts[status] = counts.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(conns)))
    return counts


def _client(
    args: tuple[int, list[tuple[str, bytes, int]], str, float, float, int],
) -> dict[int, int]:
    return asyncio.run(_drive(*args))


def _start_server(db: str, data: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    init = subprocess.run(
        [EDGEWISE, "server", "init", "--data", str(data), "--db", db],
        capture_output=True,
        text=True,
        check=True,
    )
    admin = init.stdout.strip().splitlines()[-1]
    port = _free_port()
    proc = subprocess.Popen(
        [EDGEWISE, "server", "--data", str(data), "--db", db, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base, admin
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _enroll(base: str, admin: str, n: int) -> list[tuple[str, bytes, int]]:
    auth = {"authorization": f"Bearer {admin}"}
    out = []
    with httpx.Client(base_url=base, timeout=60) as c:
        tok = c.post("/api/v1/enroll-tokens", headers=auth, json={"max_uses": n}).json()["token"]
        for _ in range(n):
            key = Ed25519PrivateKey.generate()
            r = c.post("/device/v1/enroll", json={"token": tok, "public_key": _pub_b64(key)})
            dev = r.json()["device_id"]
            out.append((dev, _raw(key), 1))
    return out


def _phase(
    proc: psutil.Process,
    port: int,
    devices: list[tuple[str, bytes, int]],
    kind: str,
    seconds: float,
    conns: int,
    clients: int,
) -> dict[str, float]:
    # Warm the server's device cache so the measured polls are the steady state.
    _client((port, devices, kind, 0.0, time.time() + 1.0, min(conns, len(devices))))
    shards = [devices[i::clients] for i in range(clients)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(clients) as pool:
        # Load generators start together once spawned; measure only the window.
        start_at = time.time() + 3.0
        stop_at = start_at + seconds
        pending = pool.map_async(
            _client, [(port, s, kind, start_at, stop_at, conns // clients) for s in shards]
        )
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = sum(proc.cpu_times()[:2])
        time.sleep(max(0.0, stop_at - time.time()))
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        results = pending.get()
    wall = seconds
    counts: dict[int, int] = {}
    for r in results:
        for k, v in r.items():
            counts[k] = counts.get(k, 0) + v
    ok = counts.get(304 if kind == "poll" else 200, 0)
    return {
        "ok": ok,
        "errors": sum(v for k, v in counts.items() if k >= 400),
        "per_s": ok / wall,
        "per_core": ok / cpu if cpu > 0 else 0.0,
        "cores": cpu / wall,
        "statuses": counts,
    }  # type: ignore[dict-item]


def _wake_latency(
    base: str,
    admin: str,
    devices: list[tuple[str, bytes, int]],
    bundle: dict[str, Any],
    n: int,
) -> tuple[list[float], list[float]]:
    """Long-poll wake latency in milliseconds, two ways, per label change.

    Returns:
        (total, wake): total runs from sending the label change to the waiting poll's
        answer (the operator's view: request, write, recompute, sign, commit, wake);
        wake runs from the new document's `issued_at` (stamped by the server just before
        it signs and commits the new revision) to the poll's answer arriving, i.e. the
        commit plus the wake path itself. Server and bench share one machine clock.
    """
    from concurrent.futures import ThreadPoolExecutor

    auth = {"authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
        c.post("/api/v1/publisher-keys", json={"public_key": bundle["pub"], "name": "bench"})
        c.post("/api/v1/models", content=bundle["raw"])
        c.post(
            "/api/v1/deployments",
            json={
                "name": "wake",
                "selector": "wake=yes",
                "pipelines": {"digits": {"model": bundle["ref"]}},
            },
        ).raise_for_status()
    total: list[float] = []
    wake: list[float] = []
    path = "/device/v1/desired?wait=30"
    with (
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=base, timeout=60) as dc,
        httpx.Client(base_url=base, headers=auth, timeout=60) as oc,
    ):
        for dev, raw, rev in devices[:n]:
            key = Ed25519PrivateKey.from_private_bytes(raw)

            def wait(
                key: Ed25519PrivateKey = key, dev: str = dev, rev: int = rev
            ) -> tuple[float, float, float]:
                h = sign_request(key, dev, "GET", path, b"", time.time())
                r = dc.get(path, headers={**h, "if-none-match": f'"{rev}"'})
                got_perf, got_wall = time.perf_counter(), time.time()
                assert r.status_code == 200, r.text
                return got_perf, got_wall, float(r.json()["document"]["issued_at"])

            waiting = pool.submit(wait)
            time.sleep(0.2)
            sent = time.perf_counter()
            oc.post(
                f"/api/v1/devices/{dev}/labels", json={"set": {"wake": "yes"}}
            ).raise_for_status()
            got_perf, got_wall, issued = waiting.result()
            total.append((got_perf - sent) * 1000)
            wake.append((got_wall - issued) * 1000)
    return total, wake


def _example_bundle() -> dict[str, Any]:
    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    out = Path(tempfile.mkdtemp(prefix="ew-bench-examples-"))
    bundles = build_examples(out)
    ref = "digits-mlp@1.0.0"
    return {
        "ref": ref,
        "raw": bundles[ref].read_bytes(),
        "pub": public_key_to_b64(load_public_key(out / "examples.pub")),
    }


def _run_backend(
    name: str, db: str, args: argparse.Namespace, bundle: dict[str, Any]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"ew-bench-{name}-") as tmp:
        proc, base, admin = _start_server(db, Path(tmp) / "data")
        try:
            port = int(base.rsplit(":", 1)[1])
            devices = _enroll(base, admin, args.devices)
            ps = psutil.Process(proc.pid)
            polls = _phase(ps, port, devices, "poll", args.seconds, args.conns, args.clients)
            reports = _phase(ps, port, devices, "report", args.seconds, args.conns, args.clients)
            total, wake = _wake_latency(base, admin, devices, bundle, args.wake_n)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"polls": polls, "reports": reports, "wake_ms": sorted(total), "commit_ms": sorted(wake)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--wake-n", type=int, default=60, help="long-poll wake samples per store")
    ap.add_argument("--skip-postgres", action="store_true")
    args = ap.parse_args()

    results: dict[str, dict[str, Any]] = {}
    bundle = _example_bundle()
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = _run_backend("sqlite", f"sqlite:///{tmp}/bench.db", args, bundle)
    if not args.skip_postgres:
        import psycopg

        dbname = f"ew_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        try:
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
            results["postgres"] = _run_backend("postgres", url, args, bundle)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    print(f"{'store':<10} {'phase':<8} {'ok/s':>9} {'ok/cpu-s':>9} {'srv cores':>9} {'errors':>7}")
    for store, r in results.items():
        for phase in ("polls", "reports"):
            x = r[phase]
            print(
                f"{store:<10} {phase:<8} {x['per_s']:>9.0f} {x['per_core']:>9.0f} "
                f"{x['cores']:>9.2f} {x['errors']:>7}"
            )
    for store, r in results.items():
        for what, key in (("change request sent", "wake_ms"), ("change committed", "commit_ms")):
            w = r[key]
            print(
                f"{store:<10} long-poll answer after {what}: median {w[len(w) // 2]:.1f} ms, "
                f"p95 {w[int(len(w) * 0.95)]:.1f} ms, max {w[-1]:.1f} ms, "
                f"over 100 ms {sum(x > 100 for x in w)}/{len(w)}"
            )
    pg = results.get("postgres", {})
    summary = {
        "polls_per_s_sqlite": round(results["sqlite"]["polls"]["per_s"], 1),
        "polls_per_s_postgres": round(pg["polls"]["per_s"], 1) if pg else None,
        "reports_per_s_sqlite": round(results["sqlite"]["reports"]["per_s"], 1),
        "reports_per_s_postgres": round(pg["reports"]["per_s"], 1) if pg else None,
        "polls_per_core_s_sqlite": round(results["sqlite"]["polls"]["per_core"], 1),
        "polls_per_core_s_postgres": round(pg["polls"]["per_core"], 1) if pg else None,
        "server_cores": round(max(r["polls"]["cores"] for r in results.values()), 2),
        "machine_cores": os.cpu_count(),
        "longpoll_wake_ms_median": round(
            max(r["wake_ms"][len(r["wake_ms"]) // 2] for r in results.values()), 1
        ),
        "longpoll_wake_ms_max": round(max(max(r["wake_ms"]) for r in results.values()), 1),
        "longpoll_commit_to_answer_ms_median": round(
            max(r["commit_ms"][len(r["commit_ms"]) // 2] for r in results.values()), 1
        ),
        "longpoll_commit_to_answer_ms_max": round(
            max(max(r["commit_ms"]) for r in results.values()), 1
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
