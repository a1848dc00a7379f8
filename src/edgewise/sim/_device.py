"""One simulated device: the agent's protocol through the agent's own `AsyncDeviceClient`.

A device enrolls with a fresh Ed25519 key, long-polls its desired state with the ETag,
verifies each document with `edgewise.protocol.verify_desired` against the trust root it
got at enrollment, downloads each new artifact (resuming with `Range` after a cut),
checks its sha256, "installs" it (a drawn install time), reports every step of the
install timeline, and uploads a `window` telemetry record per running pipeline and
window. What a model does once installed comes from `ModelBehaviour`; which faults hit
the device comes from its own random streams.

Crashes are modelled the way the real agent survives them: the running model stays in
its slot (A/B), the device is silent for `restart_s`, then it boots, re-reads its last
accepted document and tries the interrupted install again.

Time: `time_scale` real seconds per simulated second for everything the device decides
(install times, windows, downtime); network backoff is real time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Coroutine
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.agent import (
    AGENT_VERSION,
    AsyncDeviceClient,
    Backoff,
    DeviceKey,
    RetryableError,
    UplinkError,
)
from edgewise.protocol import (
    AgentInfo,
    DesiredModelRef,
    DesiredState,
    DesiredStateError,
    Report,
    SignedDesiredState,
    TelemetryBatch,
    TelemetryRecord,
    incompatible_reason,
    spec_terms,
    unknown_terms,
    verify_desired,
)
from edgewise.sim._artifacts import ArtifactInfo
from edgewise.sim._behaviour import synth_window
from edgewise.sim._cancel import cancel_and_wait
from edgewise.sim._download import FetchFailed, fetch_artifact
from edgewise.sim._env import SimEnv
from edgewise.sim._pipes import Pipe, build_report, model_ref
from edgewise.sim._profile import DeviceProfile, device_rng

__all__ = ["SimDevice"]

_MAX_PENDING = 500  # telemetry records a device keeps while it cannot upload
_MAX_CRASHES_PER_TARGET = 3


class _FetchFailed(Exception):
    """A download that cannot succeed (refused, digest mismatch, gave up)."""


class SimDevice:
    """A simulated device; `Fleet` creates, enrolls and runs them.

    Attributes:
        profile: who it is (labels, offline, skew).
        device_id: assigned at enrollment.
        revision: the desired revision it last accepted.
        ever_ran: refs (`name@version`) that were ever active on it.
        errors: its recent errors, as reported.
    """

    def __init__(self, profile: DeviceProfile, env: SimEnv) -> None:
        self.profile = profile
        self.env = env
        seed, i = env.seed, profile.index
        self._rng_behaviour = device_rng(seed, i, "behaviour")
        self._rng_faults = device_rng(seed, i, "faults")
        self.net_rng = device_rng(seed, i, "net")
        self._backoff = Backoff(base_s=0.25, max_delay_s=5.0, rng=device_rng(seed, i, "backoff"))
        # Keys are random, not seeded: re-running a seed against the same control plane
        # must enroll new devices, not collide with the previous run's keys.
        self._key = Ed25519PrivateKey.generate()
        self.client = AsyncDeviceClient(env.http_for(profile.index), None, clock=self.clock)
        self.device_id: str | None = None
        self.trusted: dict[str, Ed25519PublicKey] = {}
        self.publishers: dict[str, str] = {}
        self.settings: dict[str, Any] = {}
        self.etag: str | None = None
        self.revision: int | None = None
        self.document: DesiredState | None = None
        self.pipes: dict[str, Pipe] = {}
        self.ever_ran: set[str] = set()
        self.build = env.old_build if profile.old_agent else env.build
        self._terms_sent = False  # the vocabulary goes with reports until one is accepted
        self.errors: list[str] = []
        self.up = False
        self._seq = 0
        self._pending: list[TelemetryRecord] = []
        self._dropped = 0
        self._installs: dict[str, asyncio.Task[None]] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        self._crash = asyncio.Event()
        self._flush = asyncio.Event()
        self._report_lock = asyncio.Lock()
        self._started = time.monotonic()

    # -- time ---------------------------------------------------------------------------

    def clock(self) -> float:
        """The device's wall clock (skewed)."""
        return time.time() + self.profile.clock_skew_s

    async def _sleep_sim(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds * self.env.time_scale))

    # -- enrollment ---------------------------------------------------------------------

    async def enroll(self, token: str) -> None:
        """Enroll (retrying transient failures); sets id, trust root and settings."""
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        pub = base64.b64encode(raw).decode()
        caps = dict(self.env.capabilities)
        patient = Backoff(base_s=0.25, max_delay_s=5.0, max_tries=12, rng=self.net_rng)
        answer = await patient.acall(
            lambda: self.client.enroll(token, pub, dict(self.profile.labels), caps)
        )
        self.env.stats.requests["enroll"] += 1
        self.device_id = str(answer["device_id"])
        self.client.key = DeviceKey(self.device_id, self._key)
        from edgewise.bundle import public_key_from_b64

        root = answer.get("trust_root", {})
        self.trusted = {k: public_key_from_b64(v) for k, v in root.get("control_plane", {}).items()}
        self.publishers = dict(root.get("publishers", {}))
        self.settings = dict(answer.get("settings", {}))

    # -- the device's life --------------------------------------------------------------

    async def run(self) -> None:
        """Live until cancelled: poll, install, report, upload; crash and reboot."""
        if self.profile.offline:
            if self.env.faults.offline_for_s is None:
                await asyncio.Event().wait()  # dark for the whole run
            await self._sleep_sim(self.env.faults.offline_for_s or 0.0)
        while True:
            self.up = True
            self._terms_sent = False  # a new agent process sends its terms again
            self._crash = asyncio.Event()
            tasks = [self._spawn(self._poll_loop()), self._spawn(self._telemetry_loop())]
            try:
                if self.document is not None:  # boot: resume from the last accepted document
                    self._reconcile(self.document)
                    await self._report()
                await self._crash.wait()
            finally:
                self.up = False
                stopping = [*tasks, *self._installs.values()]
                for task in stopping:
                    task.cancel()
                # gather, not a suppressing await per task: a cancel of this task that
                # arrives meanwhile (`Fleet.stop`) must end it, not be swallowed here.
                await asyncio.gather(*stopping, return_exceptions=True)
                self._installs.clear()
            self.env.stats.crashes += 1
            await self._sleep_sim(self.env.faults.restart_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of this device, cancelled by `halt` whatever it is doing then."""
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    async def halt(self) -> None:
        """Cancel and await every task this device started (after `run` is cancelled)."""
        while self._spawned:
            tasks = list(self._spawned)
            await cancel_and_wait(tasks)
            self._spawned.difference_update(tasks)
        self._installs.clear()
        self.up = False

    async def _retry_wait(self, attempt: int, exc: Exception | None = None) -> None:
        retry_after = getattr(exc, "retry_after", None)
        await asyncio.sleep(self._backoff.delay(min(attempt, 6), retry_after))

    async def _poll_loop(self) -> None:
        attempt = 0
        wait = self.env.poll_wait_s
        if wait is None:
            wait = float(self.settings.get("poll_wait_s", 30))
        while True:
            try:
                self.env.stats.requests["desired"] += 1
                poll = await self.client.desired(self.etag, wait)
            except RetryableError as exc:
                self.env.stats.errors["desired"] += 1
                await self._retry_wait(attempt, exc)
                attempt += 1
                continue
            except UplinkError as exc:
                self.env.stats.refusals[exc.code] += 1
                self._note_error(f"desired state poll refused: {exc.code}")
                await self._retry_wait(attempt + 3)
                attempt += 1
                continue
            attempt = 0
            if poll.signed is not None:
                self.etag = poll.etag
                await self._accept(poll.signed)
            elif poll.malformed:
                self.etag = poll.etag
                await self._refused(DesiredStateError("malformed", poll.malformed))

    async def _accept(self, signed: SignedDesiredState) -> None:
        try:
            doc = verify_desired(
                signed, self.trusted, now=self.clock(), last_revision=self.revision,
                last_document=self.document,
            )  # fmt: skip
        except DesiredStateError as exc:
            await self._refused(exc)
            return
        self.revision, self.document = doc.revision, doc
        started = self._reconcile(doc)
        if self.env.report_progress or not started:
            # Without progress reports an install reports its outcome only (the install
            # task does); a document that starts nothing is acknowledged at once.
            await self._report()

    async def _refused(self, exc: DesiredStateError) -> None:
        self.env.stats.refusals[f"desired:{exc.reason}"] += 1
        self._note_error(f"desired state refused: {exc}")
        await self._report()

    def _note_error(self, text: str) -> None:
        if not self.errors or self.errors[-1] != text:
            self.errors.append(text)
            del self.errors[:-20]

    def _reconcile(self, doc: DesiredState) -> int:
        """Start, keep or stop installs to match `doc`; returns how many it started."""
        now = self.clock()
        started = 0
        for name, desired in doc.pipelines.items():
            pipe = self.pipes.setdefault(name, Pipe())
            pipe.deployment = desired.deployment
            task = self._installs.get(name)
            if pipe.running is not None and pipe.running.sha256 == desired.model.sha256:
                if task is not None:  # the target went back to what runs: stop installing
                    task.cancel()
                    self._installs.pop(name, None)
                if pipe.target is not None or pipe.status != "active":
                    pipe.target = None
                    pipe.move("active", now, "already running")
                continue
            unknown = unknown_terms(spec_terms(desired.spec), self.build.terms)
            if unknown:  # refused before downloading, as a real agent does
                if task is not None:
                    task.cancel()
                    self._installs.pop(name, None)
                if pipe.target != desired.model or pipe.status != "failed":
                    pipe.target, pipe.timeline = desired.model, []
                    pipe.move("failed", now, incompatible_reason(unknown))
                continue
            retry = pipe.target is not None and pipe.target.sha256 == desired.model.sha256
            if retry:
                if task is not None and not task.done():
                    continue
                if pipe.status == "failed" and pipe.crashes[desired.model.sha256] == 0:
                    continue  # failed for good on this target; a new target retries
            if task is not None:
                task.cancel()
            if not retry:  # a new target starts a new timeline; a retry continues it
                pipe.timeline = []
            pipe.target = desired.model
            pipe.move("pending", now)
            self._installs[name] = self._spawn(self._install(name, desired.model))
            started += 1
        for name in set(self.pipes) - set(doc.pipelines):
            task = self._installs.pop(name, None)
            if task is not None:
                task.cancel()
            del self.pipes[name]
        return started

    # -- install ------------------------------------------------------------------------

    async def _install(self, name: str, ref: DesiredModelRef) -> None:
        pipe = self.pipes[name]
        stats = self.env.stats
        try:
            pipe.move("downloading", self.clock())
            if self.env.report_progress:
                await self._report()
            info = await self._download(ref)
            pipe.move("verifying", self.clock())
            if info.error is not None:
                raise _FetchFailed(f"bundle refused: {info.error}")
            behaviour = self.env.book.behaviour(model_ref(ref), info.accuracy)
            pipe.move("installing", self.clock())
            if self.env.report_progress:
                await self._report()
            duration = behaviour.install_time(self._rng_behaviour)
            if self._rng_faults.random() < self.env.faults.crash_during_install:
                pipe.crashes[ref.sha256] += 1
                await self._sleep_sim(duration * self._rng_faults.random())
                if pipe.crashes[ref.sha256] >= _MAX_CRASHES_PER_TARGET:
                    pipe.crashes[ref.sha256] = 0
                    raise _FetchFailed("agent crashed during every install attempt")
                pipe.move("failed", self.clock(), "agent crashed during install; retrying")
                self._crash.set()
                return
            await self._sleep_sim(duration)
            pipe.move("health_checking", self.clock())
            if self._rng_behaviour.random() < behaviour.install_fail_rate:
                raise _FetchFailed("health check failed; previous model kept")
        except _FetchFailed as exc:
            stats.install_failures += 1
            pipe.crashes[ref.sha256] = 0
            pipe.move("failed", self.clock(), str(exc))
            await self._report()
            return
        self._switched(name, pipe)
        pipe.running, pipe.behaviour, pipe.target = ref, behaviour, None
        pipe.slot = "b" if pipe.slot == "a" else "a"
        pipe.crashes.clear()
        pipe.move("active", self.clock())
        self.ever_ran.add(model_ref(ref))
        stats.installs += 1
        self._installs.pop(name, None)
        await self._report()

    async def _download(self, ref: DesiredModelRef) -> ArtifactInfo:
        faults = self.env.faults
        slow = self._rng_faults.random() < faults.slow_download
        cut = self._rng_faults.random() < faults.cut_download
        try:
            data = await fetch_artifact(self.client, ref, self.env.stats, cut, self._retry_wait)
        except FetchFailed as exc:
            raise _FetchFailed(str(exc)) from None
        if slow:
            self.env.stats.slow_downloads += 1
            await self._sleep_sim(faults.slow_download_s * self._rng_faults.uniform(0.5, 1.5))
        return self.env.artifacts.info(ref.sha256, data, self.publishers)

    # -- reports and telemetry ----------------------------------------------------------

    def build_report(self) -> Report:
        """The device's reported state now."""
        agent = AgentInfo(
            version=f"sim-{AGENT_VERSION}",
            uptime_s=round(time.monotonic() - self._started, 1),
            buffer_depth=len(self._pending),
            dropped={"event": 0, "metric": self._dropped, "sample": 0},
            spec_digest=self.build.digest,
            spec_vocabulary=None if self._terms_sent else self.build.sent,
        )
        return build_report(self.pipes, self.revision or 0, self.errors, agent)

    async def _report(self) -> None:
        # One report at a time, built when sent: a slow older report can never land
        # after a newer one.
        async with self._report_lock:
            for attempt in range(6):
                try:
                    self.env.stats.requests["report"] += 1
                    report = self.build_report()
                    await self.client.report(report)
                    if report.agent.spec_vocabulary is not None:
                        self._terms_sent = True
                    return
                except RetryableError as exc:
                    self.env.stats.errors["report"] += 1
                    await self._retry_wait(attempt, exc)
                except UplinkError as exc:
                    self.env.stats.refusals[exc.code] += 1
                    return

    def _close_window(self, name: str, pipe: Pipe) -> None:
        """Turn the pipe's open window into a record (a window holds one model only)."""
        now = time.monotonic()
        elapsed = (now - pipe.window_started) / self.env.time_scale
        pipe.window_started = now
        if pipe.running is None or pipe.behaviour is None or elapsed <= 0:
            return
        mean = self.env.inference_rate * elapsed
        n = max(0, round(mean + self._rng_behaviour.gauss(0.0, max(1.0, mean) ** 0.5)))
        end = self.clock()
        data = synth_window(
            pipe.behaviour, self._rng_behaviour, pipeline=name, model=pipe.running.name,
            version=pipe.running.version, start=end - elapsed, end=end, inferences=n,
            deployment=pipe.deployment,
        )  # fmt: skip
        self._seq += 1
        self._pending.append(
            TelemetryRecord(seq=self._seq, cls="metric", ts=end, kind="window", data=data)
        )
        if len(self._pending) > _MAX_PENDING:
            lost = len(self._pending) - _MAX_PENDING
            self._dropped += lost
            self.env.stats.telemetry_dropped += lost
            del self._pending[:lost]

    def _switched(self, name: str, pipe: Pipe) -> None:
        """A new model runs: close the old model's window, close the new one's early.

        The first window of a new model is short (`first_window_s`), so the rollout's
        quality gates see the new model soon after the install, as with a real agent
        whose window aggregator restarts with the model.
        """
        self._close_window(name, pipe)
        window_s = self.env.window_s or float(self.settings.get("telemetry_window_s", 60))
        first = min(window_s, self.env.first_window_s or window_s / 5)
        loop = asyncio.get_running_loop()
        loop.call_later(first * self.env.time_scale, self._flush.set)

    async def _telemetry_loop(self) -> None:
        window_s = self.env.window_s or float(self.settings.get("telemetry_window_s", 60))
        # Devices start their windows spread over one window, as a real fleet does.
        await self._sleep_sim(window_s * random.Random(self.profile.index).random())
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush.wait(), window_s * self.env.time_scale)
            self._flush.clear()
            for name, pipe in sorted(self.pipes.items()):
                self._close_window(name, pipe)
            if not self._pending:
                continue
            batch = self._pending[:200]
            try:
                self.env.stats.requests["telemetry"] += 1
                await self.client.telemetry(
                    TelemetryBatch(
                        records=batch, dropped={"event": 0, "metric": self._dropped, "sample": 0}
                    )
                )
            except (RetryableError, UplinkError) as exc:
                self.env.stats.errors["telemetry"] += 1
                if isinstance(exc, UplinkError):
                    self.env.stats.refusals[exc.code] += 1
                continue
            del self._pending[: len(batch)]
            self.env.stats.telemetry_records += len(batch)

    # -- views --------------------------------------------------------------------------

    def running(self) -> dict[str, str]:
        """Pipeline -> the ref it runs now."""
        return {n: model_ref(p.running) for n, p in self.pipes.items() if p.running is not None}

    def statuses(self) -> dict[str, str]:
        """Pipeline -> its install status."""
        return {n: p.status for n, p in self.pipes.items()}
