"""Stopping an agent: a signal does not wait for the long-poll in flight."""

from __future__ import annotations

import signal
from collections.abc import Callable

import httpx
import pytest

from ._harness import AgentProc, ControlPlaneProc, wait_for

pytestmark = pytest.mark.slow


def _polls_waiting(cp: ControlPlaneProc) -> float:
    for line in httpx.get(cp.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edgewise_longpoll_waiting "):
            return float(line.split()[1])
    raise AssertionError("no edgewise_longpoll_waiting gauge")


def test_sigterm_during_a_long_poll_stops_the_agent_without_waiting_for_its_answer(
    control_plane: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    # The agent saw the stop only once its long-poll answered: up to --poll-wait (120 s
    # here; 30 s by default), so a service manager's stop took that long.
    agent = agent_factory(control_plane, "dev", "--poll-wait", "120")
    agent.start()
    agent.wait_up()
    wait_for(lambda: _polls_waiting(control_plane) >= 1, 60, "the agent long-polling")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=60) == 0  # well inside the 120 s poll
    assert "Traceback" not in agent.log.read_text()
    agent.start()  # and it starts again on what it kept
    agent.wait_up()
    assert agent.status()["device_id"] is not None
