"""SIGKILL at each install step: after a restart the agent serves a verified model and converges."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edgewise.agent import CRASH_POINTS

from ._harness import AgentProc, ControlPlaneProc, wait_for

pytestmark = pytest.mark.slow


def _reported(cp: ControlPlaneProc, dev: str, version: str) -> bool:
    p = cp.device(dev).get("pipelines", {}).get("digits")
    return bool(p and p["status"] == "active" and p["version"] == version)


def _serving(agent: AgentProc) -> str:
    model = str(agent.infer()["model"])
    return model


def _killed_installing_1_1_0(
    cp: ControlPlaneProc, agent: AgentProc, point: str, name: str
) -> tuple[AgentProc, str]:
    """An agent serving 1.0.0 (reported), then killed at `point` installing 1.1.0."""
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy(name, "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _reported(cp, dev, "1.0.0"), 90, "1.0.0 active")
    agent.kill()
    agent.start(env={"EDGEWISE_CRASH_AT": point})
    agent.wait_up()
    cp.deploy(f"{name}-int8", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
    assert agent.wait_exit(120) == -9  # it killed itself at the crash point
    return agent, dev


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_install_step_recovers_to_a_verified_model(
    point: str, shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent, dev = _killed_installing_1_1_0(cp, agent_factory(cp), point, "digits")
    agent.start()
    agent.wait_up()
    # At once: a whole, verified model serves, old or new.
    first = wait_for(lambda: _serving(agent), 60, "serving after restart")
    assert first.split("@")[1] in ("1.0.0", "1.1.0")
    wait_for(lambda: _reported(cp, dev, "1.1.0"), 90, "converged to 1.1.0")
    assert _serving(agent).startswith("digits-mlp@1.1.0")
    models = agent.data / "models" / "digits-mlp"
    assert not [p for p in models.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_an_install_cut_short_and_then_no_longer_wanted_reports_the_model_served(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    # Killed while installing 1.1.0; meanwhile the desired state went back to 1.0.0,
    # which the device still serves. It must say so, not report the dead install forever.
    cp = shared_cp
    agent, dev = _killed_installing_1_1_0(cp, agent_factory(cp), "mid_write", "back")
    cp.deploy("back-old", "digits-mlp@1.0.0", priority=20, tag=agent.tag)
    agent.start()
    agent.wait_up()
    wait_for(lambda: _reported(cp, dev, "1.0.0"), 90, "1.0.0 reported active again")
    assert _serving(agent).startswith("digits-mlp@1.0.0")
    timeline = cp.device(dev)["pipelines"]["digits"]["timeline"]
    assert any(e["reason"].startswith("interrupted") for e in timeline)
