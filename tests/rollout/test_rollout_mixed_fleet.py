"""Acceptance: three real agent processes and 200 simulated devices, one rollout.

The real agents run as users run them (`edgewise agent`, each its own process) and serve
the synthetic digits through onnxruntime; the simulated devices speak the same protocol
from this process. The rollout is the control plane's own (canary stratified over `hw`
and `site`, then two waves, install and error-rate gates); the test only watches, then
asks every real agent's local inference API for predictions from the new model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgewise.demo._procs import Processes
from edgewise.demo._stack import AgentProc
from edgewise.sim import Fleet

from .conftest import ControlPlaneProcess, prepared_plane

N_SIM = 200
PIPELINE = "digits"
# What the real agents run: scikit-learn's digits replayed at 20 Hz, so their telemetry
# carries real inferences into the gates.
SPEC: dict[str, Any] = {
    "source": {"type": "synthetic", "params": {"dataset": "digits", "rate_hz": 20}},
    "postprocess": [{"type": "argmax"}],
    "sinks": [{"type": "summary"}],
    "slo": {"p95_ms": 50},
}
AGENT_LABELS = (
    {"site": "lab", "hw": "cpu-small"},
    {"site": "lab", "hw": "cpu-large"},
    {"site": "store-1", "hw": "cpu-small"},
)
SIM_LABELS = "hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2"
# Install gates plus the error-rate gate; a generous per-device timeout, because a slow
# install on a loaded CI machine is not what this test is about. No confidence-shift
# gate: the real agents and the simulated devices draw confidence from different models
# of the world.
GATES = {"success_pct": 95, "error_pct": 5, "max_error_rate_delta": 0.02, "min_inferences": 200}


def _pipelines(version: str) -> dict[str, Any]:
    return {PIPELINE: {**SPEC, "model": f"digits-mlp@{version}"}}


async def _until(
    fleet: Fleet, check: Callable[[], Awaitable[bool]], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {fleet.summary()}")
        await fleet.run_for(0.25)


async def _infer(agent: AgentProc, rows: np.ndarray) -> tuple[str, list[int]]:
    """The model that answered and its predicted digit per row."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{agent.local_url}/v1/pipelines/{PIPELINE}/infer", json={"inputs": rows.tolist()}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    return str(body["model"]), [int(label) for label in body["labels"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_real_agents_and_200_simulated_devices_complete_a_rollout(
    tmp_path: Path, examples: dict[str, Any]
) -> None:
    from edgewise.examples import load_split

    plane: ControlPlaneProcess = prepared_plane(tmp_path / "data", examples)
    procs = Processes(tmp_path / "logs")
    agents: list[AgentProc] = []
    try:
        plane.api("POST", "/api/v1/deployments", json={
            "name": "fleet", "selector": "", "pipelines": _pipelines("1.0.0")})  # fmt: skip
        rev = plane.api("POST", "/api/v1/deployments/fleet/revisions",
                        json={"pipelines": _pipelines("1.1.0")})["revision"]  # fmt: skip
        token = plane.api("POST", "/api/v1/enroll-tokens",
                          json={"labels": {}, "ttl_s": 600.0, "max_uses": 3})["token"]  # fmt: skip
        split = load_split()
        rows = split.x_test[:50]

        async def go() -> dict[str, Any]:
            for i, labels in enumerate(AGENT_LABELS):
                agents.append(AgentProc(procs, f"real-{i}", tmp_path / f"agent-{i}",
                                        plane.url, labels))  # fmt: skip
            await asyncio.gather(*(a.start(token) for a in agents))
            fleet = Fleet(plane.url, N_SIM, 11, admin_token=plane.admin, labels=SIM_LABELS,
                          time_scale=0.05, window_s=20.0, first_window_s=2.0,
                          poll_wait_s=10.0, report_progress=False)  # fmt: skip
            async with fleet:

                async def all_on(version: str) -> bool:
                    if fleet.count_running(f"digits-mlp@{version}") != N_SIM:
                        return False
                    served = [await a.serving(PIPELINE) for a in agents]
                    return served == [version] * len(agents)

                await _until(fleet, lambda: all_on("1.0.0"), 180, "1.0.0 everywhere")
                before = await asyncio.gather(*(_infer(a, rows) for a in agents))
                started = plane.api("POST", "/api/v1/rollouts", json={
                    "deployment": "fleet", "to_revision": rev,
                    "spec": {"canary": "5%", "waves": [50, 100], "soak_s": 0,
                             "on_breach": "rollback", "device_timeout_s": 600,
                             "gates": GATES}})  # fmt: skip

                async def ended() -> bool:
                    view = plane.api("GET", f"/api/v1/rollouts/{started['id']}")
                    return view["state"] not in ("pending", "running")

                await _until(fleet, ended, 300, "the rollout to end")
                view = plane.api("GET", f"/api/v1/rollouts/{started['id']}")
                assert view["state"] == "completed", view["reason"]
                await _until(fleet, lambda: all_on("1.1.0"), 60, "1.1.0 everywhere")
                # Their own sources keep flowing through the new model.
                start = [await a.inferences(PIPELINE) for a in agents]

                async def flowing() -> bool:
                    now = [await a.inferences(PIPELINE) for a in agents]
                    return all(n >= s + 20 for n, s in zip(now, start, strict=True))

                await _until(fleet, flowing, 60, "the real agents' sources to flow")
                after = await asyncio.gather(*(_infer(a, rows) for a in agents))
                for a in agents:
                    await a.close()
            return {"id": started["id"], "before": before, "after": after}

        out = asyncio.run(go())
        view = plane.api("GET", f"/api/v1/rollouts/{out['id']}", params={"devices": "all"})
        assert view["state"] == "completed", view.get("reason")
        assert [p["state"] for p in view["phases"]] == ["passed"] * 3
        assert view["devices"] == N_SIM + len(agents)
        for agent in agents:
            why = plane.api("GET", f"/api/v1/rollouts/{out['id']}/devices/{agent.device_id}")
            assert why["state"] == "succeeded", why
        # The real agents answer from the new model: the int8 model agrees with the
        # float one on nearly every digit, and both beat chance by far.
        truth = split.y_test[:50]
        for (old_model, before), (new_model, after) in zip(
            out["before"], out["after"], strict=True
        ):
            assert "1.0.0" in old_model and "1.1.0" in new_model, (old_model, new_model)
            assert np.mean(np.asarray(after) == truth) > 0.8
            assert np.mean(np.asarray(after) == np.asarray(before)) > 0.9
    finally:
        procs.stop_all()
        plane.kill()
