"""The rollout driver: the imperative shell that runs `edgewise.control.rollout.step`.

One driver runs in each control-plane process. Every tick it takes the leases of the
active rollouts no other replica holds, and for each: loads the stored rollout, observes
(device reports for the target revision since the last tick, cohort telemetry every few
seconds), calls `step`, and commits the new value with its actions in one transaction
(`RolloutStore.commit`). After the commit it brings the desired documents of the devices
it moved up to date (a revision bump each, which wakes their long-polls). Those
documents are derived data: after a restart the first tick recomputes every device the
rollout holds, which changes nothing when nothing was lost and repairs a crash between
commit and recompute otherwise. A driver lets a finished rollout go only after those
writes, so a finished rollout still leased was left by a driver that died in between: the
next driver to find its lease run out settles it (`settle_finished`). A notification is
the committed assignment, logged once per device: a restarted driver never notifies a
device again.

Usage (the app does this)::

    driver = RolloutDriver(plane)
    task = asyncio.create_task(driver.run())
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter, to_thread

from edgewise.control._desiredcalc import deployment_views
from edgewise.control._plane import ApiError, ControlPlane
from edgewise.control._recompute import recompute_devices, recompute_selector
from edgewise.control._revisions import pinned_refs, revision_pipelines
from edgewise.control._rollout_observe import (
    LOOK_BACK_S,
    CohortReader,
    Target,
    changed_devices,
    departures,
    leaving_target,
    load_reports,
    look_back_due,
    target_of,
)
from edgewise.control._rollout_store import (
    RolloutStore,
    StepLost,
    UnreadableRollout,
    read_rollout,
    remember_parsed,
)
from edgewise.control.rollout import (
    Action,
    CohortTelemetry,
    DeviceRolloutState,
    NotifyDevices,
    Observations,
    RevertDevices,
    Rollout,
    RolloutState,
    SetStableRevision,
    fail,
    pause,
    step,
)

__all__ = ["RolloutDriver"]

log = logging.getLogger("edgewise.control.rollouts")
_IN_FLIGHT = frozenset({DeviceRolloutState.NOTIFIED, DeviceRolloutState.INSTALLING})


@dataclass
class _Seen:
    """What this replica remembers about a rollout between ticks (lost on restart)."""

    reports_since: float = 0.0
    # The report cursor the stored value has taken in, and when it was last written
    # (gate values alone wait `gates_every_s` after it, device progress alone
    # `progress_every_s`): held progress is lost on a reload (an operator's command moved
    # the row on), so the reload rewinds the cursor to re-read it.
    stored_reports_since: float = 0.0
    # The same pair for the devices table (devices that left the rollout's target).
    departed_since: float = 0.0
    stored_departed_since: float = 0.0
    written_at: float = -1e18
    looked_back_at: float = -1e18  # when rows were last read again (`look_back_due`)
    held: bool = False  # `rollout` is ahead of the stored value
    telemetry_at: float = -1e18
    phase: CohortTelemetry | None = None
    control: CohortTelemetry | None = None
    telemetry_phase: int | None = None
    repaired: bool = False
    targets: tuple[Target, Target] | None = None
    pins: list[tuple[str, str]] = field(default_factory=list)  # to_revision's models
    # The value this replica last loaded or committed, and its row version: a tick whose
    # row still has that version reuses it instead of parsing the stored document again
    # (about 0.8 MB of JSON for a 10,000-device rollout, twice a second).
    rollout: Rollout | None = None
    version: int | None = None


@dataclass
class RolloutDriver:
    """Steps the rollouts this replica holds the lease of.

    Attributes:
        plane: the control plane.
        owner: this replica's lease id.
        interval_s: seconds between ticks.
        lease_s: lease lifetime (renewed every tick).
        telemetry_every_s: how often cohort telemetry is re-read.
        gates_every_s: how often a gate-only change (no state change) is stored.
        progress_every_s: how often a change of device states alone is stored (a
            10,000-device rollout is a ~0.8 MB document; a wave's reports arrive every
            tick). Anything else (a phase moving on, devices to notify) is stored at once.
    """

    plane: ControlPlane
    owner: str = field(default_factory=lambda: f"cp-{secrets.token_hex(4)}")
    interval_s: float = 0.5
    lease_s: float = 10.0
    telemetry_every_s: float = 2.0
    gates_every_s: float = 5.0
    progress_every_s: float = 1.0
    steps: int = 0
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _wake: asyncio.Event | None = None
    # Desired documents owed after a commit: devices moved, deployments whose stable
    # revision changed. Kept until written, so a failed write (a deadlock victim on
    # PostgreSQL, a lost connection) is retried on the next tick, whatever state the
    # rollout is in by then (a rollback is terminal and never stepped again).
    _owed_devices: set[str] = field(default_factory=set)
    _owed_deployments: set[str] = field(default_factory=set)
    # Rollouts whose stored document this build cannot read (a newer replica wrote it),
    # by the row version found so: left to the replicas that can, until the row changes.
    _unreadable: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rollouts = RolloutStore(self.plane)
        self.cohorts = CohortReader(self.plane.store.engine)

    async def run(self) -> None:
        """Tick until cancelled; wake early on `wake()`."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.plane.rollout_wake = lambda: loop.call_soon_threadsafe(self._wake_set)  # type: ignore[attr-defined]
        # A thread of its own: in a wave the shared pool is busy with device requests,
        # and a tick queued behind them would delay every notification and gate.
        own = CapacityLimiter(1)
        while True:
            try:
                await to_thread.run_sync(self.tick, limiter=own)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not stop every rollout
                log.exception("rollout driver tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()

    def _wake_set(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def tick(self) -> None:
        """One pass over the rollouts this replica can hold."""
        if self._owed_devices or self._owed_deployments:
            try:
                self.settle()
            except Exception:
                log.exception("desired documents still owed; retrying next tick")
        now = self.plane.clock()
        for rollout_id, deployment in self.rollouts.acquire_unsettled(
            self.owner, now, self.lease_s
        ):
            try:
                self.settle_finished(rollout_id, deployment)
            except Exception:
                log.exception("rollout %s: finished, documents still owed", rollout_id)
        held = self.rollouts.acquire_leases(self.owner, now, self.lease_s, self._unreadable)
        for rollout_id in held:
            try:
                self.step_one(rollout_id)
            except StepLost:
                self._seen.pop(rollout_id, None)
            except UnreadableRollout as exc:
                self._let_go(rollout_id, str(exc))
            except Exception:  # one rollout's failure must not hold up the others
                log.exception("rollout %s: step failed", rollout_id)
        for gone in set(self._seen) - set(held):
            del self._seen[gone]

    def _let_go(self, rollout_id: str, why: str) -> None:
        """Give back the lease of a rollout this replica cannot read, and leave it be.

        A replica that can read it (an upgraded one) takes it at once rather than when
        the lease lapses; this one stops taking it until its row changes, and says so
        once per rollout (a newer replica keeps writing new versions).
        """
        self._seen.pop(rollout_id, None)
        version = self.rollouts.version(rollout_id)
        if version is None:
            return
        if rollout_id not in self._unreadable:
            log.warning("%s; leaving it to the replicas that can", why)
        self._unreadable[rollout_id] = version
        self.rollouts.release(rollout_id, self.owner)

    def _targets(self, rollout: Rollout, seen: _Seen) -> tuple[Target, Target]:
        if seen.targets is None:
            to = revision_pipelines(self.plane, rollout.deployment, int(rollout.to_revision))
            frm = revision_pipelines(self.plane, rollout.deployment, int(rollout.from_revision))
            seen.targets = (target_of(to), target_of(frm))
            seen.pins = pinned_refs(to)
        return seen.targets

    def step_one(self, rollout_id: str) -> Rollout | None:
        """Observe, step and commit one rollout; returns its new value."""
        seen = self._seen.setdefault(rollout_id, _Seen())
        version = self.rollouts.version(rollout_id)
        if version is None:
            return None
        if seen.rollout is None or seen.version != version:
            row = self.rollouts.get(rollout_id)
            if row is None:
                return None
            seen.rollout, seen.version = read_rollout(row), int(row["version"])
            self._unreadable.pop(rollout_id, None)
            seen.reports_since, seen.held = seen.stored_reports_since, False
            seen.departed_since = seen.stored_departed_since
        rollout, version = seen.rollout, seen.version
        now = self.plane.clock()
        if not seen.repaired:
            recompute_devices(self.plane, self.rollouts.assigned_devices(rollout_id))
            seen.repaired = True
        try:
            target, source = self._targets(rollout, seen)
        except ApiError as exc:
            new, actions = fail(rollout, now, f"cannot carry on: {exc.message}")
            return self._commit(new, version, actions, now, seen, rollout)
        deployment = self.plane.store.get_deployment(rollout.deployment)
        if deployment is None:
            new, actions = fail(rollout, now, "the deployment was deleted")
            return self._commit(new, version, actions, now, seen, rollout)
        if rollout.state in (RolloutState.RUNNING, RolloutState.PENDING) and (
            yanked := self.plane.store.yanked_among(seen.pins)
        ):  # a yanked model spreads no further: the operator unyanks or aborts
            why = (
                f"paused: {', '.join(yanked)} was yanked (model unyank {yanked[0]}, then "
                "rollout resume, to carry on; or rollout abort)"
            )
            # Pending: yanked between its start and its first step, which would have
            # moved its canary to the yanked model before the next step paused it.
            new, actions = pause(rollout, now, "engine", why, unstarted=True)
            return self._commit(new, version, actions, now, seen, rollout)
        look_back = 0.0
        if look_back_due(now, seen.looked_back_at):
            look_back, seen.looked_back_at = LOOK_BACK_S, now
        reports, seen.reports_since = load_reports(
            self.plane.store.engine, rollout, target, seen.reports_since, look_back
        )
        changed, seen.departed_since = changed_devices(
            self.plane.store.engine, rollout, seen.departed_since, look_back
        )
        if changed:  # gone: what such a device last said no longer counts
            views = deployment_views(self.plane.store.list_deployments())
            own = next(v for v in views if v.id == rollout.deployment)
            reports.update(departures(changed, leaving_target(own, views, target)))
        if now - seen.telemetry_at >= self.telemetry_every_s or (
            seen.telemetry_phase != rollout.phase_index
        ):
            seen.phase, seen.control = self.cohorts.cohorts(rollout, target, source)
            seen.telemetry_phase, seen.telemetry_at = rollout.phase_index, now
        timeout = rollout.spec.device_timeout_s
        due = [  # past their timeout without an outcome: offline, or stuck?
            d
            for d, s in rollout.devices.items()
            if s.state in _IN_FLIGHT
            and s.notified_at is not None
            and now >= s.notified_at + timeout
        ]
        last_seen = None
        if due:  # this replica's own sightings first (they are written every 2 s)
            self.plane.store.touch_last_seen(self.plane.seen.take())
            last_seen = self.plane.store.last_seen_of(due)
        observations = Observations(
            reports=reports,
            phase=seen.phase,
            control=seen.control,
            telemetry_phase=seen.telemetry_phase,
            last_seen=last_seen,
        )
        new, actions = step(rollout, observations, now)
        self.steps += 1
        gates_only = new.gates == rollout.gates or now - seen.written_at < self.gates_every_s
        recent = now - seen.written_at < self.progress_every_s
        if gates_only and not _worth_writing(rollout, new, actions) and (recent or not seen.held):
            return rollout
        if recent and _progress_only(rollout, new, actions):
            # Stored by the first tick `progress_every_s` after the last write, whether or
            # not anything else changes by then.
            seen.rollout, seen.held = new, True
            return new
        return self._commit(new, version, actions, now, seen, rollout)

    def _commit(
        self,
        new: Rollout,
        version: int,
        actions: list[Action],
        now: float,
        seen: _Seen,
        old: Rollout,
    ) -> Rollout:
        started = time.monotonic()
        self.rollouts.commit(
            new, version, actions, now=now, owner=self.owner, actor=f"rollout-driver:{self.owner}"
        )
        seen.written_at = now
        seen.stored_reports_since, seen.held = seen.reports_since, False
        seen.stored_departed_since = seen.departed_since
        seen.rollout, seen.version = new, version + 1
        remember_parsed(self.plane.parsed_rollouts, new.id, version + 1, new)
        self.after_commit(new, actions)
        if new.terminal:
            self.rollouts.release(new.id, self.owner)
        log.debug("rollout %s stepped in %.3f s", new.id, time.monotonic() - started)
        return new

    def after_commit(self, rollout: Rollout, actions: list[Action]) -> None:
        """Bring the desired state of the devices the actions moved up to date."""
        for action in actions:
            if isinstance(action, NotifyDevices | RevertDevices):
                self._owed_devices.update(action.ids)
            elif isinstance(action, SetStableRevision):
                # Devices outside the snapshot (enrolled after the start) now get the
                # new stable revision; the snapshot's devices already run it.
                self._owed_deployments.add(rollout.deployment)
        self.settle()

    def settle(self) -> None:
        """Write the desired documents owed; what fails stays owed."""
        if self._owed_devices:
            recompute_devices(self.plane, sorted(self._owed_devices))
            self._owed_devices.clear()
        for deployment in sorted(self._owed_deployments):
            recompute_selector(self.plane, deployment)
            self._owed_deployments.discard(deployment)

    def settle_finished(self, rollout_id: str, deployment: str) -> None:
        """Write what a finished rollout's last step owed, then let the rollout go.

        The driver that committed that step died (or its writes failed) before it could:
        which documents were owed died with it, so every device the rollout still holds
        and every device of its deployment is brought up to date (writes that change
        nothing cost a read).
        """
        recompute_devices(self.plane, self.rollouts.assigned_devices(rollout_id))
        recompute_selector(self.plane, deployment)
        self.rollouts.release(rollout_id, self.owner)

    @property
    def owed(self) -> int:
        """Devices and deployments whose desired documents are still to be written."""
        return len(self._owed_devices) + len(self._owed_deployments)


def _worth_writing(old: Rollout, new: Rollout, actions: list[Action]) -> bool:
    if actions and any(not _is_wake(a) for a in actions):
        return True
    quiet = dataclasses.replace(new, gates=old.gates)
    return quiet != old


def _progress_only(old: Rollout, new: Rollout, actions: list[Action]) -> bool:
    """Whether `new` differs from `old` in device states and gate values alone."""
    if any(not _is_wake(a) for a in actions):
        return False
    return dataclasses.replace(new, devices=old.devices, gates=old.gates) == old


def _is_wake(action: Any) -> bool:
    from edgewise.control.rollout import WakeAt

    return isinstance(action, WakeAt)
