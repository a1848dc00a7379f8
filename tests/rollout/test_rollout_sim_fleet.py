"""The fleet simulator against a real control plane (a subprocess on a free port)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from typing import Any

import httpx

from edgewise.sim import BehaviourBook, Faults, Fleet, ModelBehaviour, parse_labels, plan_fleet

from .conftest import EDGEWISE, ControlPlaneProcess

FAST = {"time_scale": 0.02, "window_s": 10.0, "poll_wait_s": 10.0}


def _fleet(plane: ControlPlaneProcess, n: int, group: str, **kw: Any) -> Fleet:
    labels = kw.pop("labels", "")
    spec = f"group={group}" + (f";{labels}" if labels else "")
    return Fleet(plane.url, n, kw.pop("seed", 1), admin_token=plane.admin, labels=spec,
                 **{**FAST, **kw})  # fmt: skip


def _run(fleet: Fleet, until: Callable[[Fleet], bool], timeout: float = 60.0) -> bool:
    async def go() -> bool:
        async with fleet:
            ok = await fleet.run_until(until, timeout)
            await fleet.run_for(0.3)  # let the last reports land
            return ok

    return asyncio.run(go())


def _telemetry_windows(plane: ControlPlaneProcess, device_ids: list[str]) -> int:
    marks = ",".join("?" for _ in device_ids)
    with sqlite3.connect(plane.data / "edgewise.db") as db:
        row = db.execute(
            f"SELECT count(*) FROM telemetry WHERE kind = 'window' AND device_id IN ({marks})",
            device_ids,
        ).fetchone()
    return int(row[0])


def test_fleet_converges_on_the_deployed_model_through_the_real_protocol(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-basic", "group=basic", "digits-mlp@1.0.0")
    fleet = _fleet(plane, 12, "basic", labels="hw=small:0.5,large:0.5")

    assert _run(fleet, lambda f: f.count_running("digits-mlp@1.0.0") == 12
                and f.env.stats.telemetry_records >= 12)  # fmt: skip

    ids = [d.device_id for d in fleet.devices if d.device_id]
    devices = plane.api("GET", "/api/v1/devices", params={"selector": "group=basic"})
    assert sorted(d["id"] for d in devices) == sorted(ids)
    assert sorted(d["labels"]["hw"] for d in devices) == ["large"] * 6 + ["small"] * 6
    shown = plane.api("GET", f"/api/v1/devices/{ids[0]}")
    assert shown["reported_revision"] == shown["desired_revision"]
    pipeline = shown["pipelines"]["digits"]
    assert (pipeline["version"], pipeline["status"]) == ("1.0.0", "active")
    states = [e["state"] for e in pipeline["timeline"]]
    assert states[:2] == ["pending", "downloading"] and states[-1] == "active"
    assert "health_checking" in states
    assert _telemetry_windows(plane, ids) >= 12
    assert fleet.summary()["refusals"] == {}


def test_fleet_follows_a_new_model_and_remembers_what_ran(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-move", "group=move", "digits-mlp@1.0.0")

    async def go() -> Fleet:
        fleet = _fleet(plane, 6, "move")
        async with fleet:
            assert await fleet.run_until(lambda f: f.count_running("digits-mlp@1.0.0") == 6, 60)
            plane.deploy("sim-move-up", "group=move", "digits-mlp@2.0.0", priority=10)
            assert await fleet.run_until(lambda f: f.count_running("digits-mlp@2.0.0") == 6, 60)
        return fleet

    fleet = asyncio.run(go())
    assert fleet.count_ever_ran("digits-mlp@1.0.0") == 6
    assert fleet.count_ever_ran("digits-mlp@2.0.0") == 6
    assert fleet.summary()["installs"] == 12


def test_fleet_converges_through_network_faults_crashes_and_cut_downloads(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-faulty", "group=faulty", "digits-mlp@1.1.0")
    faults = Faults(flaky=0.2, cut_download=0.5, slow_download=0.3, slow_download_s=5.0,
                    crash_during_install=0.3, restart_s=5.0, offline_fraction=0.25)  # fmt: skip
    fleet = _fleet(plane, 16, "faulty", faults=faults, seed=4)

    assert _run(fleet, lambda f: f.count_running("digits-mlp@1.1.0") == 12, timeout=90)

    summary = fleet.summary()
    assert summary["offline"] == 4
    assert all(not d.ever_ran for d in fleet.devices if d.profile.offline)
    assert summary["faults_injected"] > 0 and summary["cut_downloads"] > 0
    assert summary["crashes"] > 0
    crashed = [
        d
        for d in fleet.devices
        if any("crashed" in e.reason for p in d.pipes.values() for e in p.timeline)
    ]
    assert crashed, "a crash shows in the device's reported timeline"
    online = plane.api("GET", "/api/v1/devices", params={"selector": "group=faulty"})
    reported = {d["id"] for d in online if d["reported_revision"] is not None}
    assert reported == {d.device_id for d in fleet.devices if not d.profile.offline}


def test_old_agents_are_named_before_a_rollout_and_held_back_when_it_is_forced(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-old", "group=old", "digits-mlp@1.0.0")
    fleet = _fleet(plane, 12, "old", faults=Faults(old_agents=0.25), seed=5)
    old = {"pipelines": {"digits": {"model": "digits-mlp@1.1.0",
                                    "batching": {"overflow": "drop_oldest"}}}}  # fmt: skip
    revisions = "/api/v1/deployments/sim-old/revisions"
    seen: dict[str, Any] = {}

    def named(_f: Fleet) -> bool:  # the same revision each time: a no-op after the first
        seen.update(plane.api("POST", revisions, json=old))
        return len(seen["incompatible"]) == 3

    def rollout_done(_f: Fleet) -> bool:
        seen["view"] = plane.api("GET", f"/api/v1/rollouts/{seen['ro']}")
        return seen["view"]["state"] not in ("pending", "running")

    async def go() -> None:
        async with fleet:
            assert await fleet.run_until(lambda f: f.count_running("digits-mlp@1.0.0") == 12, 60)
            assert await fleet.run_until(named, 30), seen
            # A canary of 4 holds at least one of the 9 devices that can run it (with 2,
            # both were old agents in 1 start of 22, a canary nobody can pass).
            start = {"deployment": "sim-old", "to_revision": seen["revision"],
                     "spec": {"canary": 4, "waves": [100], "soak_s": 0}}  # fmt: skip
            r = httpx.post(
                plane.url + "/api/v1/rollouts",
                json=start,
                headers={"authorization": f"Bearer {plane.admin}"},
            )
            assert (r.status_code, r.json()["error"]["code"]) == (409, "agents_too_old")
            assert r.json()["error"]["message"].startswith("3 of 12 targeted devices")
            seen["ro"] = plane.api("POST", "/api/v1/rollouts", json={**start, "force": True})["id"]
            assert await fleet.run_until(rollout_done, 90)
            await fleet.run_for(0.3)

    asyncio.run(go())
    view = seen["view"]
    assert view["state"] == "completed", view["reason"]
    assert (view["succeeded"], view["held_back"], view["failed"]) == (9, 3, 0)
    (why,) = view["held_back_reasons"]  # one agent build: one line for all three
    assert why["devices"] == 3
    assert why["reason"].startswith("digits: incompatible: this agent does not know batching")
    old_ones = [d for d in fleet.devices if d.profile.old_agent]
    assert len(old_ones) == 3 and fleet.summary()["old_agents"] == 3
    assert {d.running().get("digits") for d in old_ones} == {"digits-mlp@1.0.0"}
    assert fleet.count_running("digits-mlp@1.1.0") == 9
    reason = plane.api("GET", f"/api/v1/devices/{old_ones[0].device_id}")["pipelines"]["digits"]
    assert reason["status"] == "failed"
    assert reason["reason"].startswith("incompatible: this agent does not know batching.overflow")
    assert fleet.env.stats.downloads == 12 + 9  # the old agents never fetched 1.1.0


def test_devices_with_clocks_off_beyond_the_window_are_refused(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-skew", "group=skew", "digits-mlp@1.0.0")
    faults = Faults(clock_skew_s=900.0)
    profiles = plan_fleet(10, 2, parse_labels("group=skew"), faults)
    in_window = sum(1 for p in profiles if abs(p.clock_skew_s) < 295)
    assert 0 < in_window < 10
    fleet = _fleet(plane, 10, "skew", faults=faults, seed=2)

    assert _run(fleet, lambda f: f.count_running("digits-mlp@1.0.0") == in_window
                and sum(f.env.stats.refusals.values()) > 0, timeout=30)  # fmt: skip

    assert set(fleet.summary()["refusals"]) == {"stale_timestamp"}
    for device in fleet.devices:
        assert bool(device.ever_ran) == (abs(device.profile.clock_skew_s) < 295)


def test_devices_added_later_enroll_with_the_next_indexes(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane

    async def go() -> Fleet:
        fleet = _fleet(plane, 3, "later")
        async with fleet:
            new = await fleet.add(2)
            assert [d.profile.index for d in new] == [3, 4]
            assert all(d.device_id for d in new)
        return fleet

    fleet = asyncio.run(go())
    assert fleet.n == 5 and len({d.device_id for d in fleet.devices}) == 5


def test_stopping_a_fleet_cancels_reports_in_flight_and_leaves_no_task(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("sim-stop", "group=stop", "digits-mlp@1.0.0")
    slow = BehaviourBook(default=ModelBehaviour(install_s=100.0, install_sigma=0.0))  # 2 s
    # No progress reports: a device's "installing" report could still be in flight when
    # the plane stops, and its install would wait on it instead of ending (a CI flake).
    fleet = _fleet(plane, 4, "stop", behaviours=slow, report_progress=False)
    assert plane.proc is not None

    async def go() -> tuple[bool, list[asyncio.Task[Any]]]:
        await fleet.start()
        assert await fleet.run_until(
            lambda f: all(d.statuses().get("digits") == "installing" for d in f.devices), 30
        )
        plane.proc.send_signal(signal.SIGSTOP)  # the installs end; their reports hang
        try:
            ended = await fleet.run_until(
                lambda f: all(d.statuses().get("digits") == "active" for d in f.devices), 30
            )
            await fleet.stop()  # also when they did not: no connection outlives this test
        finally:
            plane.proc.send_signal(signal.SIGCONT)
        return ended, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    ended, left = asyncio.run(go())
    assert ended, [d.statuses() for d in fleet.devices]
    assert left == []
    assert fleet.summary()["installs"] == 4 and not any(d.up for d in fleet.devices)


def test_sim_command_prints_a_json_summary(shared_plane: ControlPlaneProcess) -> None:
    plane = shared_plane
    plane.deploy("sim-cli", "group=cli", "digits-mlp@1.0.0")
    out = subprocess.run(
        [*EDGEWISE, "sim", "--server", plane.url, "--token", plane.admin, "--devices", "4",
         "--seed", "3", "--labels", "group=cli", "--duration", "4", "--time-scale", "0.02",
         "--old-agents", "0.5", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["devices"] == 4 and summary["old_agents"] == 2
    assert summary["running"] == {"digits-mlp@1.0.0": 4}


def test_sim_command_refuses_bad_input_in_one_line(shared_plane: ControlPlaneProcess) -> None:
    for args, message in [
        (["--labels", "nope"], "label spec"),
        (["--flaky", "1.5"], "less than or equal"),
        (["--old-agents", "-0.1"], "greater than or equal"),
        (["--server", "http://127.0.0.1:1"], "cannot start the fleet"),
    ]:
        out = subprocess.run(
            [*EDGEWISE, "sim", "--server", shared_plane.url, "--token", shared_plane.admin,
             "--devices", "2", "--duration", "1", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode != 0
        assert message in out.stderr
        assert "Traceback" not in out.stderr


def _cli(plane: ControlPlaneProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEWISE, *args, "--server", plane.url, "--token", plane.admin],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_deploy_update_history_and_rollout_commands_from_the_cli(
    shared_plane: ControlPlaneProcess,
) -> None:
    plane = shared_plane
    plane.deploy("cli-ro", "group=cliro", "digits-mlp@1.0.0")
    out = _cli(plane, "deploy", "update", "cli-ro", "-p", "digits=digits-mlp@1.1.0", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"] == 2
    out = _cli(plane, "deploy", "history", "cli-ro", "--json")
    assert [r["stable"] for r in json.loads(out.stdout)["revisions"]] == [True, False]
    out = _cli(plane, "rollout", "start", "--deployment", "cli-ro", "--to", "2", "--canary",
               "10%", "--waves", "50,100", "--require-approval", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["spec"]["waves"] == [50.0, 100.0] and view["spec"]["require_approval"][0]
    out = _cli(plane, "rollout", "status", view["id"], "--json")
    assert json.loads(out.stdout)["id"] == view["id"]
    out = _cli(plane, "rollout", "status", view["id"])
    assert out.returncode == 0 and "gates" in out.stdout
    out = _cli(plane, "rollout", "list", "--json")
    assert view["id"] in {r["id"] for r in json.loads(out.stdout)}
    out = _cli(plane, "rollout", "start", "--deployment", "cli-ro", "--to", "2", "--canary", "x")
    assert out.returncode == 1 and "--canary" in out.stderr and "Traceback" not in out.stderr
    out = _cli(plane, "rollout", "approve", "nope")
    assert out.returncode == 1 and "404" in out.stderr
