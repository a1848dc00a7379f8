"""MQTT wake-up: a message on the device's topic makes a polling agent fetch at once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ._harness import AgentProc, ControlPlaneProc, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]


def test_mqtt_message_wakes_the_agent_to_poll_now(
    mqtt_broker: tuple[str, int],
    shared_cp: ControlPlaneProc,
    agent_factory: Callable[..., AgentProc],
) -> None:
    import paho.mqtt.publish as publish

    host, port = mqtt_broker
    cp = shared_cp
    # The agent polls every 10 minutes and never long-polls: only MQTT can wake it.
    agent = agent_factory(cp, "dev", "--mqtt", f"{host}:{port}", "--poll-interval", "600")
    agent.start(None, "--poll-wait", "0")
    agent.wait_up()
    dev = agent.device_id()
    wait_for(lambda: agent.status()["mqtt_connected"], 30, "mqtt connected")
    wait_for(lambda: agent.status()["revision"] is not None, 30, "first poll")
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    publish.single(f"edgewise/devices/{dev}/desired", b"{}", qos=1, hostname=host, port=port)

    def active() -> bool:
        p = cp.device(dev).get("pipelines", {}).get("digits") or {}
        return p.get("status") == "active"

    wait_for(active, 60, "installed after the wake-up")
