"""Offline autonomy, resumable downloads and the telemetry buffer, against real processes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import pytest

from edgewise._httpd import _cpus

from ._harness import AgentProc, ControlPlaneProc, TamperProxy, wait_for

pytestmark = pytest.mark.slow


def _active(cp: ControlPlaneProc, dev: str, version: str) -> bool:
    p = cp.device(dev).get("pipelines", {}).get("digits") or {}
    return p.get("status") == "active" and p.get("version") == version


def _ingested(cp: ControlPlaneProc, dev: str) -> dict[str, int]:
    with sqlite3.connect(cp.data / "edgewise.db") as db:
        rows = db.execute(
            "SELECT cls, COUNT(*), COUNT(DISTINCT seq) FROM telemetry WHERE device_id = ? "
            "AND kind LIKE 'app.%' GROUP BY cls",
            (dev,),
        ).fetchall()
    for _cls, n, distinct in rows:
        assert n == distinct  # (device, seq) stored once
    return {cls: n for cls, n, _ in rows}


def _post(agent: AgentProc, cls: str, start: int, n: int) -> None:
    for i in range(start, start + n, 1000):
        records = [
            {"cls": cls, "kind": f"app.{cls}", "data": {"i": j}}
            for j in range(i, min(start + n, i + 1000))
        ]
        r = agent.local("POST", "/telemetry", json={"records": records})
        assert r.status_code == 200, r.text


def test_offline_restart_serves_last_model_and_reports_when_back(
    control_plane: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = control_plane
    agent = agent_factory(cp)
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
    before = cp.device(dev)["reported_at"]
    # The default; a machine with one CPU never busy-polls.
    assert agent.status()["local_api"]["busy_poll_us"] == (100 if _cpus() > 1 else 0)
    cp.stop()
    agent.kill()
    agent.start(None, "--local-busy-poll-us", "0")  # restarts while the plane is down
    agent.wait_up()
    assert agent.infer()["model"].startswith("digits-mlp@1.0.0")
    status = agent.status()
    assert status["online"] is False
    assert status["local_api"]["busy_poll_us"] == 0
    assert status["local_api"]["busy_poll_windows"] == 0
    cp.start()
    wait_for(lambda: cp.device(dev)["reported_at"] > before, 60, "report after return")
    assert agent.status()["online"] is True
    assert _active(cp, dev, "1.0.0")


@pytest.fixture
def proxy(shared_cp: ControlPlaneProc) -> Iterator[TamperProxy]:
    p = TamperProxy(shared_cp.url)
    try:
        yield p
    finally:
        p.close()


def test_cut_download_resumes_from_its_offset(
    shared_cp: ControlPlaneProc, proxy: TamperProxy, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent = agent_factory(cp, "dev", server=proxy.url)
    try:
        agent.start()
        agent.wait_up()
        dev = agent.device_id()
        proxy.cut_artifact_after = 5000
        cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
        wait_for(lambda: _active(cp, dev, "1.0.0"), 90, "1.0.0 active")
        size = cp.api("GET", "/models/digits-mlp/1.0.0")["size"]
        assert proxy.artifact_ranges == [None, "bytes=5000-"]
        assert proxy.artifact_bytes_sent == size  # not one byte fetched twice
    finally:
        agent.kill()


def test_telemetry_survives_restarts_offline_and_is_ingested_exactly_once(
    control_plane: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = control_plane
    agent = agent_factory(cp, "dev", "--telemetry-rate", "5000")
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.stop()
    _post(agent, "event", 0, 3400)
    agent.kill()
    agent.start()
    agent.wait_up()
    _post(agent, "metric", 3400, 3300)
    agent.kill()
    agent.start()
    agent.wait_up()
    _post(agent, "metric", 6700, 3300)
    # Raw samples are outside the default egress policy (capture off): never buffered.
    refused = agent.local(
        "POST", "/telemetry", json={"records": [{"cls": "sample", "kind": "input", "data": {}}]}
    )
    assert refused.json() == {"stored": 0}
    assert agent.status()["buffer_depth"] >= 10_000
    cp.start()
    wait_for(lambda: sum(_ingested(cp, dev).values()) == 10_000, 120, "all ingested")
    assert _ingested(cp, dev) == {"event": 3400, "metric": 6600}
    wait_for(lambda: agent.status()["buffer_depth"] == 0, 60, "buffer drained")


def test_small_budget_keeps_events_drops_metrics_and_reports_the_count(
    control_plane: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = control_plane
    agent = agent_factory(cp, "dev", "--telemetry-budget-mb", "0.25")
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.stop()
    _post(agent, "event", 0, 1000)
    _post(agent, "metric", 1000, 5000)
    dropped = agent.status()["dropped"]
    assert dropped["metric"] > 0 and dropped["event"] == 0
    cp.start()
    wait_for(lambda: agent.status()["buffer_depth"] == 0, 120, "buffer drained")
    got = _ingested(cp, dev)
    assert got["event"] == 1000
    # The agent's own heartbeat metric, written while the buffer was still full, may
    # have pushed out one more app metric after `dropped` was read: every app metric
    # missing is counted, by then or by the end.
    final = agent.status()["dropped"]
    assert 5000 - final["metric"] <= got.get("metric", 0) <= 5000 - dropped["metric"]
    wait_for(
        lambda: cp.device(dev)["agent"].get("dropped", {}).get("metric") == final["metric"],
        60,
        "drop count reported",
    )
