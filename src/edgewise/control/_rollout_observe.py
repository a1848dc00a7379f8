"""What a rollout step observes: device reports for the target revision and cohort telemetry.

Reports come from the per-pipeline rows agents report (`device_pipelines`): a device is
judged on the pipelines the target revision defines, and only on rows that name the
target model version, so a report about the old model never counts for the new one.
A device that leaves the target (decommissioned, relabelled out of the deployment's
selector, or given a target pipeline by a stronger deployment) is observed as such
(`changed_devices`, `leaving_target`, `departures`).

Cohorts come from `window` telemetry records read as `WindowFigures` and summed by
`edgewise.control.telemetry.cohort_figures` (the same figures the fleet views show):

- the phase cohort: the current phase's devices, windows on the target version since
  the phase started;
- the control cohort: devices of the snapshot still on the old version (a sample of at
  most `control_sample` of them), windows on the old version over the same span; in the
  last phase, where nobody is left on the old version, the snapshot's old-version
  windows from the `baseline_s` before the rollout started.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from edgewise.control import _schema as t
from edgewise.control._merge import DeploymentView
from edgewise.control._selector import parse_selector
from edgewise.control.rollout import (
    OFFLINE,
    CohortTelemetry,
    DeviceReport,
    DeviceRolloutState,
    ReportStatus,
    Rollout,
)
from edgewise.control.telemetry import WindowFigures, cohort_figures
from edgewise.protocol import MAX_SKEW_S, cannot_run

__all__ = [
    "LOOK_BACK_S",
    "CohortReader",
    "Target",
    "changed_devices",
    "departures",
    "device_report",
    "leaving_target",
    "load_reports",
    "look_back_due",
    "target_of",
]

Row = dict[str, Any]
#: How far before its cursor a rollout reads report and device rows again. A row is
#: stamped when its request arrived and lands when its transaction commits: another
#: replica's batch of reports (or a relabel on another thread) stamped before the newest
#: row read so far may commit after it was read, and a cursor at that newest stamp never
#: saw it (the device was left waiting until its timeout). Rows read twice change nothing.
#: The driver looks back every `LOOK_BACK_S / 2` (`look_back_due`), not on every tick:
#: at two ticks a second, re-reading 5 s of rows each time read each of a wave's reports
#: about ten times (bench/rollout.py: 91.4 against 86.4 control-plane CPU s without any
#: look-back, one run each, within that machine's noise). A row that commits within
#: `LOOK_BACK_S / 2` of its stamp is still read by the next look-back.
LOOK_BACK_S = 5.0
_IN_PROGRESS = frozenset({"pending", "downloading", "verifying", "installing", "health_checking"})
_CHUNK = 500


@dataclass(frozen=True)
class Target:
    """Pipeline name -> (model name, version) of one deployment revision."""

    pipelines: Mapping[str, tuple[str, str]]


def target_of(pipelines: Mapping[str, Any]) -> Target:
    """The models a revision's pinned pipelines run."""
    return Target(
        {
            name: (str(p["model"]["name"]), str(p["model"]["version"]))
            for name, p in pipelines.items()
        }
    )


def device_report(rows: Sequence[Mapping[str, Any]], target: Target) -> DeviceReport | None:
    """One device's status for the target revision, from its reported pipeline rows (pure).

    Failed or rolled back on any target pipeline wins, then incompatible (the agent
    refused it as something this device cannot run: `cannot_run`); healthy needs
    every target pipeline active on the target version; a row naming another version is
    not about the target and is ignored.
    """
    by_name = {str(r["pipeline"]): r for r in rows}
    statuses: list[tuple[ReportStatus, str, float]] = []
    for name, (model, version) in target.pipelines.items():
        row = by_name.get(name)
        if row is None or row["model"] != model or row["version"] != version:
            continue  # nothing reported yet about the target on this pipeline
        status = str(row["status"])
        at = float(row["updated_at"])
        reason = str(row.get("reason") or "")
        if status == "active":
            statuses.append((ReportStatus.HEALTHY, reason or f"{name} active", at))
        elif status == "failed" and cannot_run(reason):
            statuses.append((ReportStatus.INCOMPATIBLE, f"{name}: {reason}", at))
        elif status == "failed":
            statuses.append((ReportStatus.FAILED, reason or f"{name} failed", at))
        elif status == "rolled_back":
            statuses.append((ReportStatus.ROLLED_BACK, reason or f"{name} rolled back", at))
        elif status in _IN_PROGRESS:
            statuses.append((ReportStatus.INSTALLING, f"{name} {status}", at))
    real = [s for s in statuses if s[2] > 0.0]
    if not real:
        return None
    at = max(s[2] for s in real)
    for bad in (ReportStatus.FAILED, ReportStatus.ROLLED_BACK, ReportStatus.INCOMPATIBLE):
        hit = next((s for s in real if s[0] is bad), None)
        if hit is not None:
            return DeviceReport(bad, hit[1], at)
    if len(real) == len(target.pipelines) and all(s[0] is ReportStatus.HEALTHY for s in real):
        return DeviceReport(ReportStatus.HEALTHY, "; ".join(s[1] for s in real), at)
    return DeviceReport(ReportStatus.INSTALLING, "; ".join(s[1] for s in real if s[1]), at)


def look_back_due(now: float, last: float) -> bool:
    """Whether a driver that last looked back at `last` reads rows again at `now`."""
    return now - last >= LOOK_BACK_S / 2 or now < last  # (a clock stepped back: now)


def load_reports(
    engine: Any, rollout: Rollout, target: Target, since: float, look_back: float = 0.0
) -> tuple[dict[str, DeviceReport], float]:
    """Reports of the rollout's notified devices changed since `since`.

    Rows stamped up to `look_back` seconds before `since` are read again (see
    `LOOK_BACK_S`).

    Returns:
        (device -> report, the newest row time seen) for the next call's `since`.
    """
    dp = t.device_pipelines
    wanted = {d for d, s in rollout.devices.items() if s.notified_at is not None}
    rows: dict[str, list[Row]] = {}
    newest = since
    # The columns a report is made of (not the timelines): the look-back reads rows again.
    cols = (dp.c.device_id, dp.c.pipeline, dp.c.model, dp.c.version, dp.c.status)
    with engine.connect() as c:
        q = select(*cols, dp.c.reason, dp.c.updated_at).where(dp.c.updated_at >= since - look_back)
        for r in c.execute(q):
            row = dict(r._mapping)
            newest = max(newest, float(row["updated_at"]))
            if row["device_id"] in wanted:
                rows.setdefault(row["device_id"], []).append(row)
    out = {}
    for device_id, device_rows in rows.items():
        report = device_report(device_rows, target)
        if report is not None:
            out[device_id] = report
    return out, newest


def changed_devices(
    engine: Any, rollout: Rollout, since: float, look_back: float = 0.0
) -> tuple[list[tuple[str, str, Mapping[str, str], float]], float]:
    """The rollout's devices it still waits for whose rows changed since `since`.

    Those it waits for: not notified yet, in flight, or held back as offline (the
    reporting quorum counts on them until they are gone).

    Rows changed up to `look_back` seconds before `since` are read again (see
    `LOOK_BACK_S`).

    Returns:
        ([(id, status, labels, changed_at)], the newest change seen) for the next call's
        `since`.
    """
    d = t.devices
    D = DeviceRolloutState
    waiting = {D.PENDING, D.NOTIFIED, D.INSTALLING}
    out = []
    newest = since
    q = select(d.c.id, d.c.status, d.c.labels, d.c.changed_at).where(
        d.c.changed_at >= since - look_back
    )
    with engine.connect() as c:
        for r in c.execute(q):
            newest = max(newest, float(r.changed_at))
            status = rollout.devices.get(r.id)
            # An offline device is still awaited by the reporting quorum until it is gone.
            if status is not None and (status.state in waiting or status.reason == OFFLINE):
                out.append((str(r.id), str(r.status), r.labels or {}, float(r.changed_at)))
    return out, newest


def leaving_target(
    own: DeploymentView, deployments: Iterable[DeploymentView], target: Target
) -> Callable[[str, Mapping[str, str]], str | None]:
    """Why a device (by status and labels) is no longer the rollout's to move (pure).

    A device leaves when it is decommissioned, relabelled out of the deployment's
    selector, or when a stronger deployment (higher priority, or as strong and newer)
    gives it one of the target's pipelines: the rollout cannot move what its deployment
    does not decide. None while it is still the rollout's.
    """
    names = set(target.pipelines)
    rivals = sorted(
        (
            d
            for d in deployments
            if d.id != own.id and d.rank() > own.rank() and names & set(d.pipelines)
        ),
        key=DeploymentView.rank,
        reverse=True,
    )
    selector = parse_selector(own.selector)

    def why(status: str, labels: Mapping[str, str]) -> str | None:
        if status != "active":
            return f"{status} during the rollout"
        if not selector.matches(labels):
            return "relabelled out of the deployment's selector during the rollout"
        for rival in rivals:
            if parse_selector(rival.selector).matches(labels):
                name = min(names & set(rival.pipelines))
                return (
                    f"pipeline {name} comes from deployment {rival.name} (priority "
                    f"{rival.priority}), which outranks this one"
                )
        return None

    return why


def departures(
    changed: Iterable[tuple[str, str, Mapping[str, str], float]],
    why_left: Callable[[str, Mapping[str, str]], str | None],
) -> dict[str, DeviceReport]:
    """A `DEPARTED` observation for each changed device that left the target (pure)."""
    out = {}
    for device_id, status, labels, at in changed:
        why = why_left(status, labels)
        if why is not None:
            out[device_id] = DeviceReport(ReportStatus.DEPARTED, why, at)
    return out


def _sample(ids: Iterable[str], size: int, salt: str) -> list[str]:
    # A stable pseudo-random sample: the same devices every step, spread over the fleet.
    ranked = sorted(ids, key=lambda d: hashlib.sha256(f"{salt}:{d}".encode()).digest())
    return ranked[:size]


class CohortReader:
    """Reads phase and control cohort figures for a rollout (swap `windows` to change source).

    Args:
        engine: the store's engine.
        phase_sample: most phase devices read per step.
        control_sample: most control devices read per step.
        baseline_s: look-back for the control cohort once every device has moved.
    """

    def __init__(
        self,
        engine: Any,
        phase_sample: int = 2000,
        control_sample: int = 300,
        baseline_s: float = 900.0,
    ) -> None:
        self.engine = engine
        self.phase_sample = phase_sample
        self.control_sample = control_sample
        self.baseline_s = baseline_s

    def windows(
        self, device_ids: Sequence[str], since: float, models: Mapping[str, tuple[str, str]]
    ) -> list[WindowFigures]:
        """`window` records of these devices since `since` on the given pipeline models.

        A record stamped later than its arrival plus the signature's clock-skew bound
        is no one's figure: its stamp is made up (one at 1e300 would count in every
        phase of every later rollout).
        """
        tel = t.telemetry
        out = []
        with self.engine.connect() as c:
            for i in range(0, len(device_ids), _CHUNK):
                chunk = list(device_ids[i : i + _CHUNK])
                q = select(tel.c.device_id, tel.c.data).where(
                    tel.c.device_id.in_(chunk),
                    tel.c.kind == "window",
                    tel.c.ts >= since,
                    tel.c.ts <= tel.c.received_at + MAX_SKEW_S,
                )
                for device_id, data in c.execute(q):
                    if not isinstance(data, dict):
                        continue
                    want = models.get(str(data.get("pipeline", "")))
                    if want is None or (data.get("model"), data.get("version")) != want:
                        continue
                    out.append(WindowFigures.from_record(device_id, data))
        return out

    def cohorts(
        self, rollout: Rollout, target: Target, source: Target
    ) -> tuple[CohortTelemetry | None, CohortTelemetry | None]:
        """(phase cohort on the target, control cohort on the source revision)."""
        i = rollout.phase_index
        started = rollout.phase_started_at
        if started is None or i >= len(rollout.phases):
            return None, None
        moved = [
            d
            for d in rollout.phases[i]
            if rollout.devices[d].state
            in (DeviceRolloutState.SUCCEEDED, DeviceRolloutState.INSTALLING)
        ]
        phase_windows = self.windows(
            _sample(moved, self.phase_sample, rollout.id), started, target.pipelines
        )
        waiting = [d for d, s in rollout.devices.items() if s.notified_at is None]
        if waiting:
            control_ids, since = _sample(waiting, self.control_sample, rollout.id), started
        else:
            control_ids = _sample(rollout.devices, self.control_sample, rollout.id)
            since = rollout.created_at - self.baseline_s
        control_windows = self.windows(control_ids, since, source.pipelines)
        phase = cohort_figures(phase_windows) if phase_windows else None
        control = cohort_figures(control_windows) if control_windows else None
        return phase, control
