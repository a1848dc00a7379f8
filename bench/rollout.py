"""Staged rollouts on a simulated fleet: time to 100 %, exposure to a regressed model.

Run from the repo root::

    .venv/bin/python bench/rollout.py                 # 10,000 devices
    .venv/bin/python bench/rollout.py --devices 2000  # quicker

One control plane (`edgewise server`, SQLite) in a subprocess; the simulated fleet in
this process. Setup: every device enrolls and installs digits-mlp 1.0.0 (the stable
revision). Then:

1. converge: a rollout to 1.1.0 (int8) in 3 phases (1 % canary, 50 %, 100 %), no soak,
   install and quality gates on; `converge_s` is the time from the start until every
   online device runs 1.1.0 and the rollout is completed;
2. regressed: a rollout to 2.0.0 (regressed: worse error rate and confidence), same
   plan; the quality gates breach in the canary and the rollout rolls back.
   `exposure_pct` is the percent of devices that ever ran 2.0.0; `rollback_s` the
   seconds from the breach (the audit time of `phase.breached`) until every device
   runs 1.1.0 again.

The simulated fleet (the arbitrary parameters, and why these values):

- `--time-scale 0.1`: simulated time runs 10x faster than real time, so a 4 s median
  install takes 0.4 s; network, control plane and gates run in real time.
- `--window-s 600` (simulated, = 60 s real): each device uploads one telemetry window
  per real minute, the upload rate a real fleet on the default 60 s window gives the
  control plane; a shorter simulated window would load the control plane with more
  telemetry than the fleet it stands for.
- first window 5 simulated seconds after a model switch (a real agent's window
  aggregator restarts with the model): at 2 inferences/s a 1 % canary of 10,000 devices
  yields about 1,000 new-model inferences at once, over `--min-inferences 200`, so the
  quality gates judge the canary on its first windows rather than a minute later.
- long-poll wait 60 s (the agent's own default is the control plane's 30 s; the wait
  only bounds how often an idle device re-polls).

Also printed: the control plane's CPU seconds and peak RSS over the two rollouts, the
slowest answer of the rollout status view the bench polls (`status_view_max_s`: what
an operator watching the rollout waits at worst) and the simulator's failed requests.
The last line is one JSON object: devices, converge_s, exposure_pct, rollback_s,
cp_cpu_s, cp_peak_rss_mb, status_view_max_s, sim_errors (goals: converge <= 60 s,
exposure <= 1 %, rollback <= 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from edgewise.sim import Fleet, run

EDGEWISE = str(Path(sys.executable).with_name("edgewise"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Plane:
    """The control plane subprocess and a small API client."""

    def __init__(self, data: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        out = subprocess.run(
            [EDGEWISE, "server", "init", "--data", str(data)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.admin = out.stdout.strip().splitlines()[-1]
        self.log = (data.parent / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [EDGEWISE, "server", "--data", str(data), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)
        self.view_s: list[float] = []  # how long each status view took to answer
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        self.http = httpx.Client(
            base_url=self.url, timeout=120, headers={"authorization": f"Bearer {self.admin}"}
        )

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        return float(self.ps.memory_info().rss) / 1e6

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        self.http.close()


def _spec(min_inferences: int) -> dict[str, Any]:
    return {
        "canary": "1%",
        "waves": [50, 100],
        "soak_s": 0,
        "on_breach": "rollback",
        "device_timeout_s": 120,
        "gates": {
            "success_pct": 95,
            "error_pct": 5,
            "min_reporting": 1,
            "max_latency_ratio": 1.5,
            "max_error_rate_delta": 0.02,
            "max_confidence_shift": 0.1,
            "min_inferences": min_inferences,
        },
    }


def _progress(fleet: Fleet, view: dict[str, Any], elapsed: float) -> None:
    """One line: the rollout's phase and the fleet's devices by revision and status."""
    revisions: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for d in fleet.devices:
        key = str(d.revision)
        revisions[key] = revisions.get(key, 0) + 1
        for status in d.statuses().values():
            statuses[status] = statuses.get(status, 0) + 1
    print(f"  {elapsed:6.1f} s  phase {view.get('phase_name')} ({view['state']})  "
          f"revisions {revisions}  statuses {statuses}", file=sys.stderr)  # fmt: skip


async def _wait(
    fleet: Fleet,
    plane: Plane,
    rollout_id: str,
    ref: str,
    expect: str,
    timeout: float,
    trace: float = 0.0,
) -> str:
    """Until the rollout ended `expect` and every online device runs `ref`.

    Raises RuntimeError when the rollout ends otherwise.

    With `trace` > 0, prints the fleet's progress every `trace` seconds.
    """
    online = sum(1 for d in fleet.devices if not d.profile.offline)
    state = "?"
    start = time.monotonic()
    deadline, shown = start + timeout, 0.0
    while time.monotonic() < deadline:
        asked = time.monotonic()
        view = await asyncio.to_thread(plane.api, "GET", f"/api/v1/rollouts/{rollout_id}")
        plane.view_s.append(time.monotonic() - asked)
        state = view["state"]
        if state not in ("pending", "running", "paused") and state != expect:
            raise RuntimeError(f"rollout {rollout_id} ended {state}: {view.get('reason')}")
        if state == expect and fleet.count_running(ref) >= online:
            return str(state)
        if trace and time.monotonic() - shown >= trace:
            shown = time.monotonic()
            _progress(fleet, view, shown - start)
        await fleet.run_for(0.5)
    raise TimeoutError(f"rollout {rollout_id} still {state} after {timeout} s")


def _timeline(plane: Plane, rollout_id: str) -> None:
    """Print when each phase event happened, relative to the rollout's creation."""
    view = plane.api("GET", f"/api/v1/rollouts/{rollout_id}")
    t0 = view["created_at"]
    steps = ", ".join(f"{h['kind']}@{h['at'] - t0:.1f}" for h in view["history"])
    print(f"  {rollout_id}: {steps}", file=sys.stderr)


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgewise.examples import build_examples

    bundles = build_examples(work / "examples")
    plane = Plane(work / "data")
    try:
        from edgewise.bundle import load_public_key, public_key_to_b64

        pub = public_key_to_b64(load_public_key(work / "examples" / "examples.pub"))
        plane.api("POST", "/api/v1/publisher-keys", json={"public_key": pub, "name": "ex"})
        for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-mlp@2.0.0"):
            r = plane.http.post(
                "/api/v1/models",
                content=bundles[ref].read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code in (200, 201), r.text
        plane.api(
            "POST",
            "/api/v1/deployments",
            json={
                "name": "fleet",
                "selector": "",
                "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
            },
        )
        rev2 = plane.api(
            "POST",
            "/api/v1/deployments/fleet/revisions",
            json={"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}},
        )
        rev3 = plane.api("POST", "/api/v1/deployments/fleet/revisions",
                         json={"pipelines": {"digits": {"model": "digits-mlp@2.0.0"}}})  # fmt: skip
        fleet = Fleet(
            plane.url, args.devices, args.seed, admin_token=plane.admin,
            labels="hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2,store-3",
            time_scale=args.time_scale, window_s=args.window_s, first_window_s=5.0,
            poll_wait_s=60, report_progress=False, enroll_concurrency=64,
        )  # fmt: skip
        t0 = time.monotonic()
        await fleet.start()
        enroll_s = time.monotonic() - t0
        ok = await fleet.run_until(
            lambda f: f.count_running("digits-mlp@1.0.0") == args.devices, args.timeout, 0.5
        )
        setup_s = time.monotonic() - t0
        if not ok:
            raise TimeoutError("the fleet never converged on the stable revision")
        print(f"setup: {args.devices} devices enrolled in {enroll_s:.1f} s, "
              f"on 1.0.0 after {setup_s:.1f} s", file=sys.stderr)  # fmt: skip
        cpu0 = plane.cpu_s()

        t1 = time.monotonic()
        ro = plane.api("POST", "/api/v1/rollouts", json={
            "deployment": "fleet", "to_revision": rev2["revision"],
            "spec": _spec(args.min_inferences)})  # fmt: skip
        state = await _wait(
            fleet, plane, ro["id"], "digits-mlp@1.1.0", "completed", args.timeout, args.trace
        )
        converge_s = time.monotonic() - t1
        print(f"converge: rollout {ro['id']} {state} in {converge_s:.1f} s", file=sys.stderr)
        _timeline(plane, ro["id"])

        ro2 = plane.api("POST", "/api/v1/rollouts", json={
            "deployment": "fleet", "to_revision": rev3["revision"],
            "spec": _spec(args.min_inferences)})  # fmt: skip
        state2 = await _wait(
            fleet, plane, ro2["id"], "digits-mlp@1.1.0", "rolled_back", args.timeout, args.trace
        )
        back_at = time.time()
        view = plane.api("GET", f"/api/v1/rollouts/{ro2['id']}")
        _timeline(plane, ro2["id"])
        breach = next((h for h in view["history"] if h["kind"] == "phase.breached"), None)
        rollback_s = back_at - breach["at"] if breach else float("nan")
        exposure = 100.0 * fleet.count_ever_ran("digits-mlp@2.0.0") / args.devices
        cpu_s = plane.cpu_s() - cpu0
        summary = fleet.summary()
        await fleet.stop()
        print(f"regressed: rollout {ro2['id']} {state2} ({view['reason']})", file=sys.stderr)
        return {
            "devices": args.devices,
            "converge_s": round(converge_s, 2),
            "converge_state": state,
            "exposure_pct": round(exposure, 3),
            "rollback_s": round(rollback_s, 2),
            "regressed_state": state2,
            "cp_cpu_s": round(cpu_s, 1),
            "cp_peak_rss_mb": round(plane.peak_rss_mb(), 1),
            "setup_s": round(setup_s, 1),
            "sim_requests": sum(summary["requests"].values()),
            "sim_errors": sum(summary["errors"].values()),
            "status_view_max_s": round(max(plane.view_s, default=0.0), 2),
        }
    finally:
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--window-s", type=float, default=600.0)
    parser.add_argument("--min-inferences", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--trace", type=float, default=0.0,
                        help="print the fleet's progress every this many seconds")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgewise-bench-rollout-") as tmp:
        result = run(bench(args, Path(tmp)))
    print(f"{'metric':<16} {'value':>10}  goal")
    goals = {"converge_s": "<= 60", "exposure_pct": "<= 1", "rollback_s": "<= 30"}
    for key, value in result.items():
        print(f"{key:<16} {value!s:>10}  {goals.get(key, '')}")
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
