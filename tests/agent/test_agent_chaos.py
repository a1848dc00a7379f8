"""50 SIGKILLs at random times during installs: every restart serves a whole, verified model."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from ._harness import AgentProc, ControlPlaneProc, wait_for

pytestmark = pytest.mark.slow

KILLS = 50


def test_fifty_random_kills_never_leave_a_partial_model(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    rng = random.Random(4)
    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("flip-0", "digits-mlp@1.0.0", priority=0, tag=agent.tag)
    wait_for(lambda: agent.infer()["model"].startswith("digits-mlp@1.0.0"), 90, "first model")
    versions = ["1.0.0", "1.1.0"]
    for i in range(1, KILLS + 1):
        version = versions[i % 2]
        cp.deploy(f"flip-{i}", f"digits-mlp@{version}", priority=i, tag=agent.tag)
        time.sleep(rng.uniform(0.0, 0.8))
        agent.kill()
        agent.start()
        agent.wait_up()
        served = wait_for(lambda: agent.infer()["model"], 60, f"serving after kill {i}")
        assert served.split("@")[1].startswith(("1.0.0", "1.1.0")), served

    final = versions[KILLS % 2]

    def converged() -> bool:
        p = cp.device(dev).get("pipelines", {}).get("digits") or {}
        return p.get("status") == "active" and p.get("version") == final

    try:
        wait_for(converged, 120, "converged")
    except AssertionError:
        seen = cp.device(dev).get("pipelines", {}).get("digits")
        local = agent.status()
        tail = agent.log.read_text(errors="replace").splitlines()[-40:]
        raise AssertionError(
            f"not converged on {final}: the control plane holds {seen}; the agent says "
            f"{local}; its log ends:\n" + "\n".join(tail)
        ) from None
    assert agent.infer()["model"].startswith(f"digits-mlp@{final}")
    slots = agent.status()["pipelines"]["digits"]
    assert slots["version"] == final and slots["slot"] in ("a", "b")
