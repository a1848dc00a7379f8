"""Acceptance: staged rollouts on simulated fleets against real control-plane processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgewise.sim import Fleet

from .conftest import ControlPlaneProcess, prepared_plane

FAST = {"time_scale": 0.05, "window_s": 20.0, "first_window_s": 2.0, "poll_wait_s": 20.0}
# The 1,000-device fleet: the same time scale, but a 10 s real telemetry window (200
# simulated s), not 1 s: a thousand devices uploading every second would measure the
# telemetry ingest, not the rollout. The 5 % canary's first windows (50 devices x 2
# simulated s x 2 inferences/s) still give the quality gates about 200 inferences, over
# `min_inferences`, and the long-poll wait stays well inside the client's HTTP timeout.
FLEET = {**FAST, "window_s": 200.0}
QUALITY = {
    "success_pct": 90,
    "error_pct": 10,
    "max_latency_ratio": 1.5,
    "max_error_rate_delta": 0.02,
    "max_confidence_shift": 0.1,
    "min_inferences": 100,
}
# Restart and replica tests are about who acts, not about model quality.
INSTALL_ONLY = {"success_pct": 90, "error_pct": 10}
LABELS = "hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2"


def _spec(**extra: Any) -> dict[str, Any]:
    return {"canary": "5%", "waves": [50, 100], "soak_s": 0, "on_breach": "rollback",
            "device_timeout_s": 120, "gates": QUALITY, **extra}  # fmt: skip


def _setup(plane: ControlPlaneProcess) -> dict[str, int]:
    plane.deploy("fleet", "", "digits-mlp@1.0.0")
    revs = {}
    for version in ("1.1.0", "2.0.0"):
        body = {"pipelines": {"digits": {"model": f"digits-mlp@{version}"}}}
        revs[version] = plane.api("POST", "/api/v1/deployments/fleet/revisions", json=body)[
            "revision"
        ]
    return revs


async def _until(fleet: Fleet, check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {fleet.summary()}")
        await fleet.run_for(0.2)


async def _until_state(
    fleet: Fleet, plane: ControlPlaneProcess, rollout_id: str, state: str, timeout: float
) -> None:
    """Run the fleet until the rollout is in `state`, asking off the event loop.

    A blocking API call from the loop would stall every simulated device meanwhile.
    """
    deadline = time.monotonic() + timeout
    while (now := await asyncio.to_thread(_state, plane, rollout_id)) != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout {rollout_id} {now}, not {state}: {fleet.summary()}")
        await fleet.run_for(0.5)


def _state(plane: ControlPlaneProcess, rollout_id: str) -> str:
    return str(plane.api("GET", f"/api/v1/rollouts/{rollout_id}")["state"])


def _start(plane: ControlPlaneProcess, to: int, **extra: Any) -> str:
    body = {"deployment": "fleet", "to_revision": to, "spec": _spec(**extra)}
    return str(plane.api("POST", "/api/v1/rollouts", json=body)["id"])


def _phase_events(plane: ControlPlaneProcess, rollout_id: str) -> Counter[tuple[str, str]]:
    audit = plane.api("GET", "/api/v1/audit", params={"limit": 10000})
    return Counter(
        (a["action"], a["result"])
        for a in audit
        if a["object"] == f"rollout:{rollout_id}" and a["action"].startswith("phase.")
    )


@pytest.mark.slow
# About a minute for 1,000 devices on an idle two-core machine; the bound leaves room
# for a loaded CI runner. The waits inside have their own bounds.
@pytest.mark.timeout(600)
def test_regressed_model_stops_at_the_canary_and_int8_completes(
    tmp_path: Path, examples: dict[str, Any]
) -> None:
    n = int(os.environ.get("EDGEWISE_ROLLOUT_TEST_DEVICES", "1000"))
    plane = prepared_plane(tmp_path / "data", examples)
    try:
        revs = _setup(plane)

        async def go() -> dict[str, Any]:
            fleet = Fleet(plane.url, n, 3, admin_token=plane.admin, labels=LABELS,
                          report_progress=False, enroll_concurrency=48, **FLEET)  # fmt: skip
            async with fleet:
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.0.0") == n, 240,
                             "the stable revision")  # fmt: skip
                bad = _start(plane, revs["2.0.0"])
                await _until_state(fleet, plane, bad, "rolled_back", 120)
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.0.0") == n, 120,
                             "every device back on 1.0.0")  # fmt: skip
                exposed = fleet.count_ever_ran("digits-mlp@2.0.0")
                good = _start(plane, revs["1.1.0"])
                await _until_state(fleet, plane, good, "completed", 240)
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.1.0") == n, 60,
                             "every device on 1.1.0")  # fmt: skip
                return {"bad": bad, "good": good, "exposed": exposed}

        out = asyncio.run(go())
        bad = plane.api("GET", f"/api/v1/rollouts/{out['bad']}")
        assert bad["phase_index"] == 0
        assert [p["state"] for p in bad["phases"]] == ["breached", "cancelled", "cancelled"]
        assert "breached" in bad["reason"]
        failed_gates = {g["name"] for g in bad["gates"] if g["outcome"] == "fail"}
        assert failed_gates & {"error_rate_delta", "confidence_shift", "latency_ratio"}
        canary = bad["phases"][0]["size"]
        assert 0 < out["exposed"] <= canary <= n * 0.05 + 3  # nobody outside the canary ran it
        good = plane.api("GET", f"/api/v1/rollouts/{out['good']}")
        assert [p["state"] for p in good["phases"]] == ["passed"] * 3
        events = _phase_events(plane, out["good"])
        assert sorted(events.values()) == [1] * len(events)
    finally:
        plane.kill()


def test_a_control_plane_restart_mid_phase_goes_on_without_notifying_twice(
    tmp_path: Path, examples: dict[str, Any]
) -> None:
    n = 40
    plane = prepared_plane(tmp_path / "data", examples)
    try:
        revs = _setup(plane)

        async def go() -> str:
            fleet = Fleet(plane.url, n, 5, admin_token=plane.admin, labels=LABELS, **FAST)
            async with fleet:
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.0.0") == n, 60,
                             "the stable revision")  # fmt: skip
                revisions = {d.device_id: d.revision for d in fleet.devices}
                rid = _start(plane, revs["1.1.0"], soak_s=4, canary=4, gates=INSTALL_ONLY)
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.1.0") >= 4, 60,
                             "the canary")  # fmt: skip
                plane.kill()  # SIGKILL mid-phase: the canary is soaking
                await fleet.run_for(1.0)
                plane.start()
                await _until(fleet, lambda: fleet.count_running("digits-mlp@1.1.0") == n, 90,
                             "completion after the restart")  # fmt: skip
                # One notification each: exactly one revision bump per device.
                for d in fleet.devices:
                    assert d.revision == revisions[d.device_id] + 1, d.device_id
                await _until(fleet, lambda: _state(plane, rid) == "completed", 30, "completed")
                return rid

        rid = asyncio.run(go())
        assert _state(plane, rid) == "completed"
        events = _phase_events(plane, rid)
        assert sorted(events.values()) == [1] * len(events)
        assert {a for a, _ in events} == {"phase.started", "phase.passed"}
    finally:
        plane.kill()


def test_two_control_planes_on_postgresql_act_once_per_phase_transition(
    tmp_path: Path, examples: dict[str, Any], pg_url: str
) -> None:
    n = 40
    first = prepared_plane(tmp_path / "data", examples, db=pg_url)
    second = ControlPlaneProcess(tmp_path / "data", db=pg_url, admin=first.admin).start()
    try:
        revs = _setup(first)

        async def go() -> str:
            half = n // 2
            a = Fleet(first.url, half, 6, admin_token=first.admin, labels=LABELS, **FAST)
            b = Fleet(second.url, n - half, 7, admin_token=first.admin, labels=LABELS, **FAST)
            async with a, b:
                both = lambda ref: a.count_running(ref) + b.count_running(ref)  # noqa: E731
                await _until(a, lambda: both("digits-mlp@1.0.0") == n, 60, "the stable revision")
                rid = _start(first, revs["1.1.0"], canary=4, gates=INSTALL_ONLY)
                await _until(a, lambda: both("digits-mlp@1.1.0") == n, 90, "completion")
                await _until(a, lambda: _state(second, rid) == "completed", 30, "completed")
                return rid

        rid = asyncio.run(go())
        events = _phase_events(first, rid)
        assert sorted(events) == sorted(
            [("phase.started", "ok phase=0"), ("phase.passed", "ok phase=0"),
             ("phase.started", "ok phase=1"), ("phase.passed", "ok phase=1"),
             ("phase.started", "ok phase=2"), ("phase.passed", "ok phase=2")]
        )  # fmt: skip
        assert set(events.values()) == {1}
        log = httpx.get(f"{first.url}/api/v1/audit/verify", timeout=30,
                        headers={"authorization": f"Bearer {first.admin}"}).json()  # fmt: skip
        assert log["ok"] is True
    finally:
        first.kill()
        second.kill()
