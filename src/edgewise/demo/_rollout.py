"""Rollouts for the demo: the control plane's own (`run_rollout_api`), or an interim one.

`run_rollout_api` is the real thing: a new revision of the deployment, then
`POST /api/v1/rollouts`; the control plane's driver picks the canary, judges the gates
and rolls back or widens by itself, and the demo only watches. The story uses it
whenever the server answers `/api/v1/rollouts`.

`run_rollout` (INTERIM, for a control plane without rollouts; delete it once every
server has them) drives a rollout from the demo with the project's pure parts and only
public routes:

1. canary: label a few devices `ring=canary-<version>` and create a higher-priority
   deployment for that selector (layered deployments do the rest);
2. judge: `edgewise.control.rollout.evaluate_gates` over the canary's install states
   (from device reports) and the cohort figures (`edgewise.control.telemetry.cohort_figures`)
   of the `window` telemetry the control plane stored for the canary (new version) and
   for everyone else (old version);
3. on a failing gate: delete the canary deployment (the devices fall back to the old
   layer) and wait until they run the old version again; otherwise create a deployment of
   the new version for the whole target and wait until the fleet converges.

The interim path reads telemetry from the control plane's SQLite file (the demo owns
the directory) because no telemetry read API existed: its one shortcut.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.demo._api import Api, DemoError

__all__ = [
    "RolloutPlan",
    "RolloutResult",
    "gate_spec",
    "rollouts_supported",
    "run_rollout",
    "run_rollout_api",
]


def gate_spec() -> Any:
    """The gates the demo asks for: the install gates plus an error-rate gate.

    At most 1 point more failed inferences in the phase cohort than in the control
    cohort. The confidence-shift gate is left out on purpose: the real agents bin top-1
    confidence on deciles while the simulated devices use `edgewise.drift`'s default
    edges, and the cohort figures of a mixed fleet then compare histograms on different
    bins (a shift of 0.5-0.7 bits even for an identical model).
    """
    from edgewise.control.rollout import GateSpec

    return GateSpec(success_pct=90.0, error_pct=10.0, max_error_rate_delta=0.01, min_inferences=500)


@dataclass(frozen=True)
class RolloutPlan:
    """What to roll out where.

    Attributes:
        name: the model; `from_version` what runs now, `to_version` the target.
        pipelines: the deployment's pipelines with the model set to the target.
        canary: device ids of the canary phase.
        everyone: a predicate over the fleet that holds once every device runs the target.
        soak_s: how long the canary's gates must pass before the rollout widens.
        timeout_s: give up (as a failure) after this long.
    """

    name: str
    from_version: str
    to_version: str
    pipelines: dict[str, Any]
    canary: Sequence[str]
    soak_s: float = 3.0
    timeout_s: float = 180.0


@dataclass
class RolloutResult:
    """How a rollout ended, with the figures the summary shows."""

    state: str = "running"  # completed | rolled_back | failed
    canary_devices: int = 0
    gates: list[dict[str, Any]] = field(default_factory=list)
    tripped: list[dict[str, Any]] = field(default_factory=list)
    canary_s: float = 0.0
    rollback_s: float | None = None
    converge_s: float | None = None
    history: list[str] = field(default_factory=list)


def _windows(db: Path, since: float) -> list[tuple[str, dict[str, Any]]]:
    # Read-only: the control plane keeps writing in WAL mode meanwhile.
    uri = f"file:{db}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as conn:
        rows = conn.execute(
            "SELECT device_id, data FROM telemetry WHERE kind = 'window' AND received_at >= ?",
            (since,),
        ).fetchall()
    out = []
    for device_id, data in rows:
        try:
            out.append((str(device_id), json.loads(data) if isinstance(data, str) else data))
        except ValueError:
            continue
    return out


def _cohorts(
    db: Path, since: float, canary: set[str], name: str, old: str, new: str
) -> tuple[Any, Any]:
    from edgewise.control.telemetry import WindowFigures, cohort_figures

    phase, control = [], []
    for device_id, data in _windows(db, since):
        if data.get("model") != name:
            continue
        fig = WindowFigures.from_record(device_id, data)
        if device_id in canary and data.get("version") == new:
            phase.append(fig)
        elif device_id not in canary and data.get("version") == old:
            control.append(fig)
    return cohort_figures(phase), cohort_figures(control)


async def _install_states(api: Api, devices: Sequence[str], pipeline: str, version: str) -> Any:
    from edgewise.control.rollout import DeviceRolloutState as D

    async def one(device_id: str) -> tuple[str, Any]:
        d = await api.get(f"/api/v1/devices/{device_id}")
        p = d.get("pipelines", {}).get(pipeline) or {}
        if p.get("version") != version:
            return device_id, D.NOTIFIED
        status = p.get("status")
        if status == "active":
            return device_id, D.SUCCEEDED
        if status in ("failed", "rolled_back"):
            return device_id, D.FAILED
        return device_id, D.INSTALLING

    return dict(await asyncio.gather(*(one(d) for d in devices)))


async def run_rollout(
    api: Api,
    db: Path,
    plan: RolloutPlan,
    converged: Callable[[str], Awaitable[bool]],
    on_change: Callable[[RolloutResult], None] = lambda r: None,
) -> RolloutResult:
    """Run one rollout to its end (INTERIM: swap for the rollout API when it lands).

    Args:
        api: the operator client.
        db: the control plane's SQLite file (read-only, for telemetry windows).
        plan: what to roll out.
        converged: `converged(version)` holds once every device of the target runs it.
        on_change: called whenever the result changes (live display).
    """
    from edgewise.control.rollout import evaluate_gates

    result = RolloutResult(canary_devices=len(plan.canary))
    ring = f"canary-{plan.to_version.replace('.', '-')}"
    spec = gate_spec()
    start = time.time()
    t0 = time.monotonic()

    def note(line: str) -> None:
        result.history.append(f"{time.monotonic() - t0:5.1f}s {line}")
        on_change(result)

    for device_id in plan.canary:
        await api.post(f"/api/v1/devices/{device_id}/labels", {"set": {"ring": ring}, "remove": []})
    await api.post(
        "/api/v1/deployments",
        {"name": f"digits-{ring}", "selector": f"ring={ring}", "priority": 10,
         "pipelines": plan.pipelines},
    )  # fmt: skip
    note(f"canary: {len(plan.canary)} devices -> {plan.name}@{plan.to_version}")
    pipeline = next(iter(plan.pipelines))
    passing_since: float | None = None
    deadline = t0 + plan.timeout_s
    canary = set(plan.canary)
    while True:
        states = await _install_states(api, plan.canary, pipeline, plan.to_version)
        phase, control = await asyncio.to_thread(
            _cohorts, db, start, canary, plan.name, plan.from_version, plan.to_version
        )
        evaluation = evaluate_gates(spec, states, list(plan.canary), phase, control)
        result.gates = [r.to_dict() for r in evaluation.results]
        on_change(result)
        if evaluation.failed:
            result.tripped = [r.to_dict() for r in evaluation.failed]
            note("gate breached: " + ", ".join(_gate_text(r) for r in result.tripped))
            break
        if evaluation.passed:
            passing_since = passing_since or time.monotonic()
            if time.monotonic() - passing_since >= plan.soak_s:
                note(f"canary gates passed for {plan.soak_s:.0f}s")
                break
        else:
            passing_since = None
        if time.monotonic() > deadline:
            result.state = "failed"
            note("canary timed out")
            return result
        await asyncio.sleep(0.5)
    result.canary_s = round(time.monotonic() - t0, 2)
    if result.tripped:
        t_back = time.monotonic()
        await api.call("DELETE", f"/api/v1/deployments/digits-{ring}")
        note(f"rolling back the canary to {plan.from_version}")
        if not await _wait(lambda: converged(plan.from_version), plan.timeout_s):
            raise DemoError("the canary did not roll back in time")
        result.rollback_s = round(time.monotonic() - t_back, 2)
        result.state = "rolled_back"
        note(f"rolled back: every device on {plan.from_version} again")
        return result
    t_wave = time.monotonic()
    await api.post(
        "/api/v1/deployments",
        {"name": f"digits-{plan.to_version.replace('.', '-')}", "selector": "", "priority": 5,
         "pipelines": plan.pipelines},
    )  # fmt: skip
    await api.call("DELETE", f"/api/v1/deployments/digits-{ring}")
    note(f"wave: every device -> {plan.to_version}")
    if not await _wait(lambda: converged(plan.to_version), plan.timeout_s):
        result.state = "failed"
        note("the wave did not converge in time")
        return result
    result.converge_s = round(time.monotonic() - t_wave, 2)
    result.state = "completed"
    note(f"completed: every device on {plan.to_version}")
    return result


def _gate_text(gate: dict[str, Any]) -> str:
    value = gate["value"]
    shown = "-" if value is None else f"{value:.4g}"
    return f"{gate['name']} {shown} > {gate['threshold']:g}"


async def _wait(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.3)
    return False


# -- the control plane's own rollouts (issue 6), used when the server offers them -------

TERMINAL = ("completed", "rolled_back", "aborted", "failed")


async def rollouts_supported(api: Api) -> bool:
    """Whether the control plane serves `/api/v1/rollouts`."""
    r = await api.http.get("/api/v1/rollouts")
    return r.status_code == 200


def _gate_dict(gates: Any) -> dict[str, Any]:
    import dataclasses

    return {
        f.name: getattr(gates, f.name)
        for f in dataclasses.fields(gates)
        if getattr(gates, f.name) is not None
    }


async def run_rollout_api(
    api: Api,
    deployment: str,
    plan: RolloutPlan,
    converged: Callable[[str], Awaitable[bool]],
    on_change: Callable[[RolloutResult], None] = lambda r: None,
) -> RolloutResult:
    """Run one rollout through `/api/v1/rollouts`: a new revision, then the engine's phases.

    The control plane's driver picks the canary (stratified over `hw` and `site`), soaks,
    judges the same gates as `gate_spec()` and rolls back or widens by itself; this only
    watches it and reports what it did.
    """
    result = RolloutResult(canary_devices=len(plan.canary))
    t0 = time.monotonic()

    def note(line: str) -> None:
        result.history.append(f"{time.monotonic() - t0:5.1f}s {line}")
        on_change(result)

    rev = await api.post(
        f"/api/v1/deployments/{deployment}/revisions",
        {"pipelines": plan.pipelines, "note": f"{plan.name} {plan.to_version}"},
    )
    spec = {
        "canary": len(plan.canary),
        "waves": [100],
        "soak_s": plan.soak_s,
        "on_breach": "rollback",
        "gates": _gate_dict(gate_spec()),
        "gate_timeout_s": 60.0,
        "device_timeout_s": 120.0,
    }
    started = await api.post(
        "/api/v1/rollouts",
        {"deployment": deployment, "to_revision": rev["revision"], "spec": spec},
    )
    rollout_id = started["id"]
    note(f"rollout {rollout_id}: revision {rev['revision']} ({plan.name}@{plan.to_version})")
    seen = 0
    state = ""
    deadline = t0 + plan.timeout_s
    while state not in TERMINAL:
        if time.monotonic() > deadline:
            result.state = "failed"
            note("the rollout did not finish in time")
            return result
        await asyncio.sleep(0.5)
        view = await api.get(f"/api/v1/rollouts/{rollout_id}")
        state = str(view["state"])
        phases = view.get("phases") or []
        if phases:
            result.canary_devices = int(phases[0].get("size", result.canary_devices))
        gates = view.get("gates") or []
        if gates:
            result.gates = gates
            failed = [g for g in gates if g.get("outcome") == "fail"]
            if failed:
                result.tripped = failed
        for h in (view.get("history") or [])[seen:]:
            shown = {
                k: v for k, v in (h.get("detail") or {}).items() if k not in ("rollout", "gates")
            }
            detail = ", ".join(f"{k}={v}" for k, v in shown.items())
            note(f"{h.get('kind')} {detail}"[:160])
        seen = len(view.get("history") or [])
        if view.get("phase_index", 0) > 0 and not result.canary_s:
            result.canary_s = round(time.monotonic() - t0, 2)
    t_end = time.monotonic()
    if state == "rolled_back":
        result.canary_s = result.canary_s or round(t_end - t0, 2)
        if not await _wait(lambda: converged(plan.from_version), plan.timeout_s):
            raise DemoError("the rolled-back devices did not return to the old version")
        result.rollback_s = round(time.monotonic() - t_end, 2)
        result.state = "rolled_back"
        note(f"rolled back: every device on {plan.from_version} again")
        return result
    if state != "completed":
        result.state = "failed"
        note(f"rollout ended {state}: {view.get('reason')}")
        return result
    if not await _wait(lambda: converged(plan.to_version), plan.timeout_s):
        result.state = "failed"
        note("the fleet did not converge in time")
        return result
    result.converge_s = round(time.monotonic() - t0 - result.canary_s, 2)
    result.state = "completed"
    note(f"completed: every device on {plan.to_version}")
    return result
