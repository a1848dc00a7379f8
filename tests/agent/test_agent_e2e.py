"""Acceptance against a real control plane: enroll, deploy, serve, swap, report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from edgewise.agent import DurableJson

from ._harness import AgentProc, ControlPlaneProc, wait_for

pytestmark = pytest.mark.slow


def _active(cp: ControlPlaneProc, dev: str, version: str) -> bool:
    p = cp.device(dev).get("pipelines", {}).get("digits")
    return bool(p and p["status"] == "active" and p["version"] == version)


def test_enroll_deploy_serve_and_swap_to_int8(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    assert (agent.data / "device.key").stat().st_mode & 0o777 == 0o600
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
    assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
    cp.deploy("digits-int8", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
    wait_for(lambda: _active(cp, dev, "1.1.0"), 90, "1.1.0 active")
    assert agent.infer()["model"].startswith("digits-mlp@1.1.0")
    timeline = [e["state"] for e in cp.device(dev)["pipelines"]["digits"]["timeline"]]
    assert timeline[-1] == "active" and "health_checking" in timeline
    status = agent.status()
    assert status["pipelines"]["digits"]["version"] == "1.1.0"
    # The agent told the control plane which spec terms it knows (pre-flight reads
    # them), stored once per agent build; the device keeps their digest.
    import sqlite3

    from edgewise.agent._vocabulary import agent_vocabulary

    terms, digest = agent_vocabulary()
    assert cp.device(dev)["agent"]["spec_digest"] == digest
    with sqlite3.connect(cp.data / "edgewise.db") as db:
        row = db.execute("SELECT terms FROM agent_vocabularies WHERE digest = ?", (digest,))
        assert json.loads(row.fetchone()[0]) == list(terms)
    # A later start needs no token.
    agent.kill()
    agent.token = None
    # It sends its capabilities with its first report: what it has now, not what it
    # enrolled with (here, as written to its cache).
    cache = DurableJson(agent.data / "capabilities.json")
    caps = cache.load()
    real_memory = caps["memory_mb"]
    cache.commit({**caps, "memory_mb": 12345})
    agent.start()
    agent.wait_up()
    wait_for(lambda: agent.infer()["model"].startswith("digits-mlp@1.1.0"), 60, "serving")
    wait_for(lambda: cp.device(dev)["capabilities"]["memory_mb"] == 12345, 30, "reported")
    # Probed with other versions (an upgrade since): probed again, and reported.
    agent.kill()
    stale = {**caps, "memory_mb": 1, "probed_with": {**caps["probed_with"], "onnxruntime": "1.0"}}
    cache.commit(stale)
    agent.start()
    agent.wait_up()
    wait_for(lambda: cp.device(dev)["capabilities"]["memory_mb"] == real_memory, 30, "probed")
    assert cache.load()["probed_with"] == caps["probed_with"]


def test_pipeline_with_a_fallback_installs_both_models_and_serves_after_restart(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag, fallback="digits-logreg@1.0.0")
    wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "active with fallback")
    fallback = agent.data / "models" / "digits-logreg" / "slots.json"
    assert '"ready"' in fallback.read_text()
    agent.kill()
    agent.start()
    agent.wait_up()
    assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
    listing = agent.local("GET", "/v1/pipelines").json()
    assert "digits" in str(listing)


def test_serving_pipeline_sends_telemetry_windows_with_counts(
    shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    import json
    import sqlite3

    cp = shared_cp
    agent = agent_factory(cp, "dev", "--metrics-interval", "1")
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "active")
    for _ in range(20):
        agent.infer()

    def windows() -> list[dict[str, Any]]:
        with sqlite3.connect(cp.data / "edgewise.db") as db:
            rows = db.execute(
                "SELECT data FROM telemetry WHERE device_id = ? AND kind = 'window'", (dev,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def served_in_windows() -> int:
        return sum(int(w.get("counts", {}).get("ok", 0)) for w in windows())

    wait_for(lambda: served_in_windows() >= 20, 60, "windows ingested")
    assert served_in_windows() == 20  # each request counted once, in exactly one window

    # Drift counts come from the inputs the runtime sampled (every 10th by default),
    # the confidence histogram from every request.
    def sampled() -> int:
        return sum(sum(w["features"]["classes"]) for w in windows() if "features" in w)

    wait_for(lambda: sampled() >= 2, 30, "sampled inputs counted")
    assert sampled() == 2
    assert sum(sum(w["confidence"]["counts"]) for w in windows() if "confidence" in w) == 20
