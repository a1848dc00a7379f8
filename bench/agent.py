"""Agent footprint and swap latency against a real control plane, on this machine.

Runs `edgewise server` and `edgewise agent` as subprocesses and measures:
  rss_idle_mb     agent RSS enrolled, polling, no pipeline
  idle_cpu_pct    agent CPU over --cpu-window seconds idle (60 s is the goal's window;
                  the default is shorter to keep the run modest: said in the output)
  rss_digits_mb   agent RSS with the digits pipeline serving, read after 2,000 requests
                  through its local inference API (so the code serving uses is resident)
  uss_*_mb        (context) the same moments' unique set size: pages no other process
                  maps. Here the control plane maps the same libraries, so USS leaves
                  out what the two share; on a device the agent is alone with them.
  swap_s_digits   desired-state change -> new model active, download excluded
  swap_s_10mb     the same for a ~10 MB model
The last line is one JSON object with those keys.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agent._harness import AgentProc, ControlPlaneProc, wait_for


def big_bundle(src: Path, out_dir: Path, version: str, seed: int, key: Path, pub: Path) -> Path:
    """A signed ~10 MB bundle: the digits MLP plus 10 MB of weights that feed its output."""
    import onnx
    from onnx import helper, numpy_helper

    from edgewise.bundle import extract, load_public_key, pack, sign

    work = out_dir / f"big-{version}"
    extract(src, work, [load_public_key(pub)])
    model = onnx.load(str(work / "model.onnx"))
    g = model.graph
    weights = np.random.default_rng(seed).uniform(-1, 1, 2_600_000).astype(np.float32)
    g.initializer.append(numpy_helper.from_array(weights, "big_w"))
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "big_zero"))
    for node in g.node:
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
    g.node.extend(
        [
            helper.make_node("ReduceSum", ["big_w"], ["big_s"], keepdims=0),
            helper.make_node("Mul", ["big_s", "big_zero"], ["big_z"]),
            helper.make_node("Add", ["probabilities_raw", "big_z"], ["probabilities"]),
        ]
    )
    onnx.save(model, str(work / "model.onnx"))
    manifest = json.loads((work / "manifest.json").read_text())
    manifest.update(name="digits-big", version=version)
    (work / "manifest.json").write_text(json.dumps(manifest))
    out = out_dir / f"digits-big-{version}.ewb"
    pack(work, out)
    sign(out, key)
    return out


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1024 * 1024)


def uss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().uss / (1024 * 1024)


def serve_digits(agent: AgentProc, x: np.ndarray, n: int) -> None:
    """`n` requests through the agent's local inference API, each checked."""
    url = f"http://127.0.0.1:{agent.port}/v1/pipelines/digits/infer"
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            r = client.post(url, json={"inputs": x[i % len(x) : i % len(x) + 1].tolist()})
            assert r.status_code == 200, r.text


def swap_seconds(cp: ControlPlaneProc, dev: str, pipeline: str, since: float) -> float:
    """Deploy-to-active from the reported timeline, minus the time spent downloading."""
    timeline = cp.device(dev)["pipelines"][pipeline]["timeline"]
    start = max(i for i, e in enumerate(timeline) if e["state"] == "pending")
    entries = timeline[start:]  # the install this change started
    active = max(e["at"] for e in entries if e["state"] == "active")
    downloads = [e["at"] for e in entries if e["state"] == "downloading"]
    verifying = [e["at"] for e in entries if e["state"] == "verifying"]
    download_s = (min(verifying) - min(downloads)) if downloads else 0.0
    steps = []
    for a, b in itertools.pairwise(entries):
        steps.append(f"{a['state']} {b['at'] - a['at']:.3f}s")
    first = min(e["at"] for e in entries)
    print(f"  {pipeline}: desired->pending {first - since:.3f}s; " + ", ".join(steps))
    return active - since - download_s


def wait_active(cp: ControlPlaneProc, dev: str, pipeline: str, version: str) -> None:
    def ok() -> bool:
        p = cp.device(dev).get("pipelines", {}).get(pipeline) or {}
        return p.get("status") == "active" and p.get("version") == version

    wait_for(ok, 180, f"{pipeline} {version} active")


def deploy(cp: ControlPlaneProc, name: str, pipelines: dict[str, Any], priority: int) -> float:
    t0 = time.time()
    body = {"name": name, "priority": priority, "pipelines": pipelines}
    cp.api("POST", "/deployments", json=body)
    return t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu-window", type=float, default=20.0, help="idle CPU window (s)")
    args = ap.parse_args()

    from edgewise.examples import build_examples, load_split

    tmp = Path(tempfile.mkdtemp(prefix="ew-bench-agent-"))
    cp: ControlPlaneProc | None = None
    agent: AgentProc | None = None
    try:
        bundles = build_examples(tmp / "ex")
        key, pub = tmp / "ex" / "examples.key", tmp / "ex" / "examples.pub"
        big1 = big_bundle(bundles["digits-mlp@1.0.0"], tmp, "1.0.0", 1, key, pub)
        big2 = big_bundle(bundles["digits-mlp@1.0.0"], tmp, "1.1.0", 2, key, pub)
        cp = ControlPlaneProc(tmp / "cp")
        cp.start()
        cp.trust(pub)
        for b in (bundles["digits-mlp@1.0.0"], bundles["digits-mlp@1.1.0"], big1, big2):
            cp.push(b)
        agent = AgentProc(tmp / "dev", cp.url, cp.enroll_token())
        agent.start(None, "--poll-wait", "30")
        agent.wait_up()
        dev = agent.device_id()
        wait_for(lambda: agent.status()["revision"] is not None, 60, "first poll")
        time.sleep(3)
        assert agent.proc is not None
        pid = agent.proc.pid
        rss_idle, uss_idle = rss_mb(pid), uss_mb(pid)
        proc = psutil.Process(pid)
        c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(args.cpu_window)
        idle_cpu = 100.0 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)

        deploy(cp, "digits", {"digits": {"model": "digits-mlp@1.0.0"}}, 0)
        wait_active(cp, dev, "digits", "1.0.0")
        serve_digits(agent, load_split().x_test, 2000)
        time.sleep(2)
        rss_digits, uss_digits = rss_mb(pid), uss_mb(pid)
        since = deploy(cp, "digits-int8", {"digits": {"model": "digits-mlp@1.1.0"}}, 10)
        wait_active(cp, dev, "digits", "1.1.0")
        swap_digits = swap_seconds(cp, dev, "digits", since)

        deploy(cp, "big", {"big": {"model": "digits-big@1.0.0"}}, 0)
        wait_active(cp, dev, "big", "1.0.0")
        since = deploy(cp, "big-2", {"big": {"model": "digits-big@1.1.0"}}, 10)
        wait_active(cp, dev, "big", "1.1.0")
        swap_big = swap_seconds(cp, dev, "big", since)
        big_mb = big2.stat().st_size / 1e6

        rows = [
            ("agent RSS idle (no pipelines)", f"{rss_idle:.1f} MB", "<= 60 MB"),
            ("agent RSS, digits serving", f"{rss_digits:.1f} MB", "<= 100 MB"),
            ("agent USS idle / digits (context)", f"{uss_idle:.1f} / {uss_digits:.1f} MB", "-"),
            (
                f"idle CPU over {args.cpu_window:g} s (goal window 60 s)",
                f"{idle_cpu:.3f} %",
                "<= 0.5 %",
            ),
            ("swap digits 1.0.0 -> 1.1.0 (download excluded)", f"{swap_digits:.3f} s", "<= 1 s"),
            (f"swap {big_mb:.1f} MB model (download excluded)", f"{swap_big:.3f} s", "<= 1 s"),
        ]
        for name, value, goal in rows:
            print(f"{name:<52} {value:>12}   goal {goal}")
        print(
            json.dumps(
                {
                    "rss_idle_mb": round(rss_idle, 1),
                    "rss_digits_mb": round(rss_digits, 1),
                    "idle_cpu_pct": round(idle_cpu, 3),
                    "idle_cpu_window_s": args.cpu_window,
                    "swap_s_digits": round(swap_digits, 3),
                    "swap_s_10mb": round(swap_big, 3),
                    "uss_idle_mb": round(uss_idle, 1),
                    "uss_digits_mb": round(uss_digits, 1),
                }
            )
        )
    finally:
        if agent is not None:
            agent.kill()
        if cp is not None:
            cp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
