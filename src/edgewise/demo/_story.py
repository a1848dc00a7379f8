"""The story `edgewise demo` tells, chapter by chapter, with real processes and models.

1. a control plane (`edgewise server`, SQLite) on a free loopback port; the example
   bundles built, signed, their key trusted, the bundles pushed;
2. three real `edgewise agent` processes (one of them behind an uplink proxy) and a
   simulated fleet (`edgewise.sim.Fleet`, in this process);
3. `digits-mlp` 1.0.0 deployed everywhere; the real agents serve the synthetic digits;
4. 2.0.0 (regressed) rolled out: the canary's gates trip and it rolls back;
5. 1.1.0 (int8) rolled out to completion, while one real agent is SIGKILLed in the
   middle of its install (`EDGEWISE_CRASH_AT`) and comes back on a verified model;
6. another agent's uplink cut: it keeps serving, buffers telemetry, and backfills it.

`Story.run()` returns the summary (booleans and figures); the caller prints it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from edgewise.demo._api import Api, DemoError
from edgewise.demo._outages import crash_and_return, cut_uplink
from edgewise.demo._procs import Processes
from edgewise.demo._proxy import UplinkProxy
from edgewise.demo._rollout import (
    RolloutPlan,
    RolloutResult,
    rollouts_supported,
    run_rollout,
    run_rollout_api,
)
from edgewise.demo._stack import AgentProc, ControlPlaneProc
from edgewise.demo._view import Rows, View

__all__ = ["CHAPTERS", "Story"]

MODEL = "digits-mlp"
PIPELINE = "digits"
CRASH_POINT = "mid_write"
OFFLINE_S = 8.0
CHAPTERS = 7

#: The pipeline every device runs: the real agents replay scikit-learn's digits.
PIPELINE_SPEC: dict[str, Any] = {
    "source": {"type": "synthetic", "params": {"dataset": "digits", "rate_hz": 20}},
    "postprocess": [{"type": "argmax"}],
    "sinks": [{"type": "summary"}],
    "slo": {"p95_ms": 50},
}

REAL_AGENTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("lab-1", {"site": "lab", "hw": "cpu-small", "kind": "agent"}),
    ("lab-2", {"site": "lab", "hw": "cpu-large", "kind": "agent"}),
    ("lab-3", {"site": "lab", "hw": "cpu-small", "kind": "agent"}),
)
SIM_LABELS = "site=store-1,store-2,store-3;hw=cpu-small:0.5,cpu-large:0.5;kind=sim"


def _pipelines(version: str) -> dict[str, Any]:
    return {PIPELINE: {**PIPELINE_SPEC, "model": f"{MODEL}@{version}"}}


class Story:
    """One run of the demo under `directory`."""

    def __init__(self, directory: Path, devices: int, port: int, view: View | None) -> None:
        self.dir = directory
        self.n = devices
        self.procs = Processes(directory / "logs")
        self.plane = ControlPlaneProc(self.procs, directory / "control-plane", port)
        self.view = view
        self.api: Api | None = None
        self.admin = ""
        self.agents: list[AgentProc] = []
        self.proxy: UplinkProxy | None = None
        self.fleet: Any = None
        self.engine = False  # whether the control plane drives rollouts itself
        self.facts: dict[str, Any] = {}
        self.chapters: list[dict[str, Any]] = []
        self.started = time.monotonic()

    # -- display ------------------------------------------------------------------------

    def _step(self, text: str) -> None:
        if self.view is not None:
            self.view.step(text)

    def _note(self, text: str) -> None:
        if self.view is not None:
            self.view.note(text)

    def _chapter(self, chapter: str, ok: bool, figures: str) -> None:
        self.chapters.append({"chapter": chapter, "ok": ok, "figures": figures})
        self._note(("[green]ok[/] " if ok else "[red]NOT OK[/] ") + f"{chapter}: {figures}")

    def snapshot(self) -> Rows:
        """Rows for the live table: what the simulated fleet and each agent run."""
        rows: Rows = []
        if self.fleet is not None:
            s = self.fleet.summary()
            running = ", ".join(f"{k}: {v}" for k, v in s["running"].items()) or "-"
            states = ", ".join(f"{k} {v}" for k, v in s["statuses"].items())
            rows.append((f"{s['devices']} simulated", running, states))
        for a in self.agents:
            rows.append((a.name, a.facts.get("model", "-"), a.facts.get("state", "-")))
        return rows

    # -- helpers ------------------------------------------------------------------------

    async def _poll_agents(self) -> None:
        # Feeds the live table; the chapters read the agents themselves.
        while True:
            for a in self.agents:
                st = await a.status() if a.alive() else {}
                p = (st.get("pipelines") or {}).get(PIPELINE) or {}
                served = await a.inferences(PIPELINE) if st else 0
                a.facts["model"] = f"{p.get('model')}@{p.get('version')}" if p else "-"
                online = "online" if st.get("online") else "OFFLINE"
                a.facts["state"] = (
                    f"{p.get('status', '-')}, {online}, {served} inferences, "
                    f"buffer {st.get('buffer_depth', 0)}"
                    if st
                    else "down"
                )
            await asyncio.sleep(1.0)

    async def _all_on(self, version: str) -> bool:
        ref = f"{MODEL}@{version}"
        if self.fleet.count_running(ref) != len(self.fleet.devices):
            return False
        for a in self.agents:
            if not a.alive() or await a.serving(PIPELINE) != version:
                return False
        return True

    async def _wait(self, what: str, check: Any, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if await check():
                return round(time.monotonic() - t0, 2)
            await asyncio.sleep(0.25)
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")

    # -- chapters -----------------------------------------------------------------------

    async def setup(self) -> None:
        """Chapter 1: control plane up, bundles built, signed, trusted, pushed."""
        from edgewise.bundle import key_id, load_public_key, public_key_to_b64
        from edgewise.examples import EXAMPLE_KEY_NAME, build_examples

        self._step("control plane and signed bundles")
        t0 = time.monotonic()
        out = self.dir / "bundles"
        bundles, self.admin = await asyncio.gather(
            asyncio.to_thread(build_examples, out), self.plane.init()
        )
        await self.plane.start()
        self.api = Api(self.plane.url, self.admin)
        self._note(f"control plane on {self.plane.url} (pid {self.plane.child.pid})")  # type: ignore[union-attr]
        public = load_public_key(out / f"{EXAMPLE_KEY_NAME}.pub")
        await self.api.post(
            "/api/v1/publisher-keys", {"public_key": public_key_to_b64(public), "name": "examples"}
        )
        for ref, path in bundles.items():
            r = await self.api.push_bundle(path.read_bytes())
            self._note(f"pushed {ref} sha256={r['sha256'][:12]}")
        # The control plane's own rollouts when it has them; the demo's interim driver else.
        self.engine = await rollouts_supported(self.api)
        self.facts["rollout_driver"] = "control plane" if self.engine else "demo (interim)"
        self.facts["bundles"] = sorted(bundles)
        self.facts["publisher_key"] = key_id(public)
        self._chapter(
            "control plane, bundles",
            True,
            f"{len(bundles)} bundles built, signed by {key_id(public)}, pushed; "
            f"ready in {time.monotonic() - t0:.1f}s",
        )

    async def start_devices(self) -> None:
        """Chapter 2: three real agents and the simulated fleet enroll."""
        from edgewise.sim import Fleet

        assert self.api is not None
        self._step(f"3 real agents + {self.n} simulated devices")
        token = await self.api.post(
            "/api/v1/enroll-tokens", {"labels": {}, "ttl_s": 3600.0, "max_uses": 3}
        )
        self.proxy = UplinkProxy(("127.0.0.1", self.plane.port))
        proxy_url = f"http://127.0.0.1:{self.proxy.start()}"
        for name, labels in REAL_AGENTS:
            server = proxy_url if name == "lab-2" else self.plane.url
            agent = AgentProc(self.procs, name, self.dir / "agents" / name, server, labels)
            self.agents.append(agent)
        await asyncio.gather(*(a.start(token["token"]) for a in self.agents))
        for a in self.agents:
            via = " via the uplink proxy" if a.server == proxy_url else ""
            self._note(f"agent {a.name} enrolled as {a.device_id}{via}")
        self.fleet = Fleet(
            self.plane.url, self.n, seed=7, admin_token=self.admin, labels=SIM_LABELS,
            time_scale=0.05, window_s=100.0, poll_wait_s=10.0, report_progress=self.n <= 50,
        )  # fmt: skip
        t0 = time.monotonic()
        await self.fleet.start()
        devices = await self.api.get("/api/v1/devices")
        self._chapter(
            "devices enrolled",
            len(devices) == self.n + 3,
            f"{len(devices)} devices ({self.n} simulated in {time.monotonic() - t0:.1f}s, "
            f"3 real agents: hw=cpu-small x2, hw=cpu-large x1)",
        )

    async def deploy(self) -> None:
        """Chapter 3: digits-mlp 1.0.0 everywhere; the real agents serve real inferences."""
        assert self.api is not None
        self._step(f"deploy {MODEL} 1.0.0 everywhere")
        await self.api.post(
            "/api/v1/deployments",
            {"name": "digits", "selector": "", "priority": 0, "pipelines": _pipelines("1.0.0")},
        )
        took = await self._wait("1.0.0 everywhere", lambda: self._all_on("1.0.0"), 180)

        async def serving() -> bool:
            counts = [await a.inferences(PIPELINE) for a in self.agents]
            return min(counts) >= 100

        await self._wait("real inferences", serving, 30)
        counts = {a.name: await a.inferences(PIPELINE) for a in self.agents}
        self.facts["deploy_converge_s"] = took
        self.facts["real_inferences"] = counts
        self._chapter(
            "deploy 1.0.0",
            True,
            f"{self.n + 3} devices on 1.0.0 in {took:.1f}s; real agents served "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + " digits",
        )

    def _canary(self) -> list[str]:
        ids = sorted(d.device_id for d in self.fleet.devices if d.device_id)
        k = min(10, max(2, round(len(ids) * 0.1)))
        return ids[:: max(1, len(ids) // k)][:k]

    async def rollout(self, version: str, from_version: str) -> RolloutResult:
        """Roll `version` out (INTERIM driver, see `_rollout`)."""
        assert self.api is not None
        plan = RolloutPlan(MODEL, from_version, version, _pipelines(version), self._canary())
        seen: list[str] = []

        def on_change(r: RolloutResult) -> None:
            for line in r.history[len(seen) :]:
                seen.append(line)
                self._note(f"rollout {version}: {line}")

        if self.engine:
            return await run_rollout_api(self.api, "digits", plan, self._all_on, on_change)
        return await run_rollout(self.api, self.plane.db, plan, self._all_on, on_change)

    async def regressed(self) -> None:
        """Chapter 4: 2.0.0 is caught by the canary gates and rolls back by itself."""
        self._step(f"roll out {MODEL} 2.0.0 (regressed)")
        r = await self.rollout("2.0.0", "1.0.0")
        caught = bool(r.tripped)
        self.facts["canary_2_0_0"] = {
            "state": r.state, "canary_devices": r.canary_devices, "tripped": r.tripped,
            "gates": r.gates, "canary_s": r.canary_s, "rollback_s": r.rollback_s,
        }  # fmt: skip
        gates = "; ".join(f"{g['name']} {g['value']:.4f} > {g['threshold']:g}" for g in r.tripped)
        self._chapter(
            "2.0.0 canary caught",
            caught,
            f"{r.canary_devices} canary devices; tripped: {gates or 'nothing'} "
            f"after {r.canary_s:.1f}s",
        )
        self._chapter(
            "2.0.0 rolled back",
            r.state == "rolled_back",
            f"every device back on 1.0.0 in {r.rollback_s or 0:.1f}s",
        )

    async def int8(self) -> None:
        """Chapter 5 and the crash of chapter 6: 1.1.0 completes through a SIGKILL."""
        self._step(f"roll out {MODEL} 1.1.0 (int8), SIGKILL mid-install")
        victim = self.agents[2]
        assert victim.child is not None
        self.procs.stop(victim.child)
        await victim.start(crash_at=CRASH_POINT)
        self._note(f"agent {victim.name} restarted with EDGEWISE_CRASH_AT={CRASH_POINT}")
        watch = asyncio.create_task(crash_and_return(victim, PIPELINE, CRASH_POINT, self._note))
        r = await self.rollout("1.1.0", "1.0.0")
        try:
            crash = await asyncio.wait_for(watch, 5)
        except TimeoutError:  # it never crashed: the chapter shows it
            crash = {}
        self.facts["int8_1_1_0"] = {
            "state": r.state, "canary_devices": r.canary_devices, "gates": r.gates,
            "canary_s": r.canary_s, "converge_s": r.converge_s,
        }  # fmt: skip
        if r.state == "completed":
            figures = (
                f"canary {r.canary_devices} devices passed in {r.canary_s:.1f}s; "
                f"{self.n + 3} devices on 1.1.0 {r.converge_s or 0:.1f}s later"
            )
        else:
            figures = f"rollout ended {r.state}: " + "; ".join(r.history[-2:])
        self._chapter("1.1.0 (int8) completed", r.state == "completed", figures)
        final = await victim.serving(PIPELINE)
        first = crash.get("first_served", {})
        recovered = (
            crash.get("exit_code") == -9
            and bool(first.get("serving"))
            and bool(first.get("version"))
            and final == "1.1.0"
        )
        self.facts["crash"] = {**crash, "point": CRASH_POINT, "final_version": final}
        self._chapter(
            "crash recovered",
            recovered,
            f"{victim.name} SIGKILLed at {CRASH_POINT} installing 1.1.0; back in "
            f"{crash.get('back_s', 0):.1f}s serving verified {first.get('version')} "
            f"(slot {first.get('slot')}), then installed {final}",
        )

    async def uplink(self) -> None:
        """Chapter 6: an agent loses its uplink, keeps serving, then backfills."""
        assert self.proxy is not None
        agent = self.agents[1]
        self._step(f"cut {agent.name}'s uplink for {OFFLINE_S:.0f}s")
        u = await cut_uplink(agent, self.proxy, PIPELINE, OFFLINE_S, self._note)
        self.facts["uplink"] = u
        self._chapter(
            "offline served",
            u["served_offline"] > 0 and not u["was_online_while_cut"],
            f"{agent.name} cut off {u['offline_s']:.0f}s, served {u['served_offline']} "
            f"inferences on {u['version_offline']}",
        )
        self._chapter(
            "telemetry backfilled",
            u["buffered"] > 0 and u["uploaded_after"] >= u["buffered"],
            f"{u['buffered']} records buffered offline, {u['uploaded_after']} uploaded within "
            f"{u['backfill_s']:.1f}s of reconnecting",
        )

    # -- the whole story ----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Tell the story; returns the summary. Processes stay up (see `close`)."""
        poller: asyncio.Task[None] | None = None
        try:
            await self.setup()
            await self.start_devices()
            poller = asyncio.create_task(self._poll_agents())
            await self.deploy()
            # The outage needs no rollout: it runs beside the regressed canary.
            await asyncio.gather(self.regressed(), self.uplink())
            await self.int8()
            self._step("summary")
        finally:
            if poller is not None:
                poller.cancel()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Booleans, figures, where to look next."""
        ok = {c["chapter"]: c["ok"] for c in self.chapters}
        return {
            "canary_caught": ok.get("2.0.0 canary caught", False),
            "rollback_done": ok.get("2.0.0 rolled back", False),
            "int8_completed": ok.get("1.1.0 (int8) completed", False),
            "crash_recovered": ok.get("crash recovered", False),
            "offline_served": ok.get("offline served", False),
            "backfilled": ok.get("telemetry backfilled", False),
            "devices": self.n + 3,
            "simulated_devices": self.n,
            "real_agents": [
                {"name": a.name, "device_id": a.device_id, "labels": a.labels, "pid": a.child.pid}
                for a in self.agents
                if a.child is not None
            ],
            "control_plane": {
                "url": self.plane.url,
                "pid": self.plane.child.pid if self.plane.child is not None else None,
            },
            "console_url": self.plane.url + "/",
            "admin_token": self.admin,
            "directory": str(self.dir),
            "duration_s": round(time.monotonic() - self.started, 1),
            "chapters": self.chapters,
            "figures": self.facts,
            "fleet": self.fleet.summary() if self.fleet is not None else {},
        }

    async def close(self) -> None:
        """Stop the fleet, the proxy and every process."""
        if self.fleet is not None:  # cancels and awaits every task its devices started
            await self.fleet.stop()
        if self.proxy is not None:
            self.proxy.close()
        for a in self.agents:
            await a.close()
        if self.api is not None:
            await self.api.close()
        await asyncio.to_thread(self.procs.stop_all)
