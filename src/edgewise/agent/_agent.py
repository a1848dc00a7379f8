"""The device agent: enrollment, the reconcile loop, offline autonomy, reports.

Usage::

    agent = Agent(AgentConfig(data_dir=Path("/var/lib/edgewise"),
                              server="https://cp.example", enroll_token="..."))
    agent.run(stop_event)          # blocks; SIGTERM sets stop_event in the CLI

Boot serves what was last committed before talking to anyone, so a device with no
network, or one that restarts while offline, keeps serving. The loop then long-polls the
desired state, verifies it (signer, signature, expiry, revision), plans, executes and
reports; every failure of the uplink goes through one backoff policy and the loop
reconnects by itself.

A data directory that is full, read-only or failing does not stop it either: boot
writes nothing it does not have to, state that cannot be written stays in memory (and
in the reports, with the reason) until it can, and only an install's commit point
insists on reaching the disk (see `Installer`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgewise.agent._backoff import Backoff, GiveUp, RetryableError
from edgewise.agent._buffer import TelemetryBuffer
from edgewise.agent._client import DeviceAuthError, DeviceClient, DeviceKey, UplinkError
from edgewise.agent._drain import TelemetryDrain
from edgewise.agent._durable import DurableJson, atomic_write_bytes
from edgewise.agent._fetch import ArtifactCache
from edgewise.agent._host import Host, RuntimeHost
from edgewise.agent._identity import (
    Identity,
    IdentityError,
    ensure_private_dir,
    load_identity,
    load_or_create_key,
    public_key_b64,
    save_identity,
)
from edgewise.agent._install import InstallState
from edgewise.agent._installer import (
    Installer,
    InstallFailed,
    SlotUnusable,
    retry_incompatible,
    storage_reason,
)
from edgewise.agent._plan import Action, ObservedPipeline, plan
from edgewise.agent._process import quiet_onnxruntime, resources, trim, tune_malloc
from edgewise.agent._ratelimit import TokenBucket
from edgewise.agent._report import build_report, status_document
from edgewise.agent._state import AgentState, PipelineRecord, StateFile
from edgewise.agent._store import ModelStore
from edgewise.agent._trust import TrustKeeper, TrustWalk, retry_unsigned
from edgewise.agent._vocabulary import agent_vocabulary
from edgewise.agent._windows import TelemetryWindows
from edgewise.protocol import (
    AgentInfo,
    DesiredPipeline,
    DesiredState,
    DesiredStateError,
    Report,
    SignedDesiredState,
    ignored_fields,
    verify_desired,
)

__all__ = ["AGENT_VERSION", "Agent", "AgentConfig", "StopPolling"]

AGENT_VERSION = "0.1.0"
_UNWRITTEN = "state.json not written: "


class StopPolling(BaseException):  # (like KeyboardInterrupt: not an Exception)
    """Raised by `Agent.on_stop_signal` to cut a long-poll short (not an error)."""


@dataclass
class AgentConfig:
    """How an agent runs. Settings from the control plane fill what is left None."""

    data_dir: Path
    server: str | None = None
    enroll_token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    local_port: int | None = None  # None: no local API; 0: any free port
    local_busy_poll_us: float = 100.0  # edgewise._httpd.BUSY_POLL_US; 0 turns it off
    poll_wait_s: float | None = None  # 0 turns long-polling off: poll every poll_interval_s
    poll_interval_s: float = 60.0
    report_interval_s: float = 60.0
    metrics_interval_s: float | None = None
    telemetry_budget_bytes: int = 32 * 1024 * 1024
    telemetry_rate: float = 1000.0  # records per second once reconnected
    telemetry_burst: float = 2000.0
    disk_reserve_mb: float = 0.0
    mqtt: tuple[str, int] | None = None
    capabilities: dict[str, Any] | None = None  # None: collect from this machine
    log_events: bool = False  # one stderr line per event (the CLI turns it on)


class Agent:
    """One device agent. All I/O parts are passed in or built from the config."""

    def __init__(
        self,
        config: AgentConfig,
        http: httpx.Client | None = None,
        host: Host | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        tune_malloc()
        quiet_onnxruntime()
        self.config = config
        self.dir = config.data_dir
        ensure_private_dir(self.dir)
        self.clock = clock
        self.started_at = time.monotonic()
        self.key = load_or_create_key(self.dir)
        self.identity: Identity | None = load_identity(self.dir)
        self.trust = TrustKeeper(self.dir)  # the fleet's signed trust root, once it has one
        self._trust_fetch_after = 0.0  # monotonic: when an unknown signer may fetch it again
        server = config.server or (self.identity.server if self.identity else None)
        if not server:
            raise IdentityError("no control-plane URL: pass --server")
        # A plain-HTTP control plane needs no TLS context (loading the CA store costs RSS).
        self.http = http or httpx.Client(
            base_url=server, timeout=httpx.Timeout(30.0), verify=server.startswith("https:")
        )
        self.client = DeviceClient(self.http, clock=clock)
        self.host: Host = host or RuntimeHost()
        self.store = ModelStore(self.dir / "models")
        self.cache = ArtifactCache(
            self.dir / "cache", reserve_bytes=int(config.disk_reserve_mb * 1024 * 1024)
        )
        self.buffer = TelemetryBuffer(self.dir / "telemetry.db", config.telemetry_budget_bytes)
        self.state_file = StateFile(self.dir / "state.json")
        self.state = AgentState()
        self.lock = threading.RLock()  # state is read by the local API thread
        self.wake = threading.Event()
        self.polling = False  # a long-poll is in flight (see `on_stop_signal`)
        self.poll_backoff = Backoff(base_s=0.5, max_delay_s=30.0)
        self.online = False
        self.report_dirty = True
        self._next_report = 0.0
        # The digest of the vocabulary a report accepted by the control plane carried.
        self._vocabulary_sent = ""
        self._capabilities_sent = False  # likewise, once per start
        self._next_metrics = 0.0
        self._capabilities: dict[str, Any] | None = config.capabilities
        self.drain = TelemetryDrain(
            self.buffer,
            self.client.telemetry,
            TokenBucket(config.telemetry_rate, config.telemetry_burst),
            Backoff(base_s=0.5, max_delay_s=30.0),
        )
        self.installer = Installer(
            self.store,
            self.cache,
            self.client,
            self.host,
            self._publishers,
            {},
            Backoff(base_s=0.5, max_delay_s=5.0, max_tries=4, max_time_s=20.0),
            self._persist,
            self.emit,
            clock,
            self._serving_elsewhere,
        )
        self.local_port: int | None = None
        self.mqtt: Any = None
        self.windows: TelemetryWindows | None = None
        self._egress_cache: tuple[int | None, dict[str, Any]] | None = None
        self._gate: Any = None  # EgressGate for local apps, built on first use
        self._gate_egress: dict[str, Any] | None = None
        self._threads: list[threading.Thread] = []
        self._closers: list[Callable[[], None]] = []
        self._identity_unsaved = False  # enrolled, but identity.json not written yet

    # -- small helpers ----------------------------------------------------------------

    def _publishers(self) -> dict[str, Any]:
        return self.identity.publisher_keys() if self.identity else {}

    def _serving_elsewhere(self, pipeline: str) -> set[tuple[str, str]]:
        """(model name, slot) of every committed model of the other pipelines."""
        out: set[tuple[str, str]] = set()
        with self.lock:
            for name, rec in self.state.pipelines.items():
                c = rec.committed
                if name == pipeline or c is None:
                    continue
                for ref in [c["model"], *(c.get("companions") or {}).values()]:
                    if isinstance(ref, dict):
                        out.add((str(ref.get("name")), str(ref.get("slot"))))
        return out

    def _persist(self) -> None:
        """Commit the state (the installer's commit point: raises if it cannot)."""
        with self.lock:
            self.state_file.save(self.state)
        self.report_dirty = True

    def _save_state(self) -> bool:
        """Commit the state if the disk lets us; else keep it in memory and say why.

        For every write but an install's commit point: the state lives on in memory,
        the reports carry it, and the next commit that can be written catches up.
        """
        try:
            self._persist()
        except OSError as exc:
            self.report_dirty = True
            self.state.add_error(f"{_UNWRITTEN}{storage_reason(exc)}")
            return False
        if any(e.startswith(_UNWRITTEN) for e in self.state.errors):  # written again
            self.state.errors = [e for e in self.state.errors if not e.startswith(_UNWRITTEN)]
            with contextlib.suppress(OSError):
                self._persist()
        return True

    def emit(self, cls: str, kind: str, data: dict[str, Any]) -> None:
        """Add one record to the durable telemetry buffer.

        Never raises: a full disk must not stop the agent from serving.
        """
        if self.config.log_events and cls == "event":
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp} agent: {kind} {json.dumps(data, default=str)}", file=sys.stderr)
        try:
            self.buffer.append([(cls, kind, data, self.clock())])
        except (sqlite3.Error, OSError):
            return
        self.drain.wake.set()

    def add_telemetry(self, records: list[tuple[str, str, dict[str, Any], float]]) -> int:
        """Store records the agent built (already filtered by the policy); returns how many."""
        self.buffer.append(records)
        self.drain.wake.set()
        return len(records)

    def add_local_telemetry(self, records: list[tuple[str, str, dict[str, Any], float]]) -> int:
        """Store records from local apps, through the egress policy; returns how many."""
        from edgewise.agent.telemetry import EgressGate
        from edgewise.protocol import EgressPolicy

        egress = self._egress()
        with self.lock:
            if self._gate is None:
                self._gate = EgressGate(clock=self.clock)
            if egress != self._gate_egress:
                # An invalid policy leaves the last valid one in force.
                with contextlib.suppress(ValueError):
                    self._gate.policy = EgressPolicy.from_desired(egress)
                self._gate_egress = egress
            kept = self._gate.admit(records)
        return self.add_telemetry(kept) if kept else 0

    def capabilities(self) -> dict[str, Any]:
        """This device's capabilities: probed at enrollment, kept under DIR after that.

        Probing onnxruntime takes a second in a child process; a restart (often after a
        crash, when serving again fast matters) reuses what was found, unless edgewise or
        a runtime was upgraded since (`probed_with`): then they are probed again, sent
        with the next report, and installs refused as incompatible are tried again.
        """
        if self._capabilities is None:
            from edgewise.agent._capabilities import collect_capabilities, probe_key, stale

            cached = DurableJson(self.dir / "capabilities.json")
            found = cached.load(default=None)
            key = probe_key()
            if stale(found, key):
                if isinstance(found, dict):
                    retried = retry_incompatible(self.state.pipelines)
                    if retried:
                        self._save_state()
                        self.emit("event", "capabilities.changed", {"retried": retried})
                found = {**collect_capabilities(self.dir), "probed_with": key}
                with contextlib.suppress(OSError):  # probed again at the next start
                    cached.commit(found)
            self._capabilities = found
        return self._capabilities

    @property
    def poll_wait_s(self) -> float:
        """The long-poll wait: config, else the control plane's setting, else 30 s."""
        if self.config.poll_wait_s is not None:
            return self.config.poll_wait_s
        settings = self.identity.settings if self.identity else {}
        return float(settings.get("poll_wait_s", 30))

    # -- enrollment -------------------------------------------------------------------

    def enroll(self, stop: threading.Event) -> None:
        """Enroll once (retrying while the control plane is unreachable).

        Raises:
            IdentityError: no identity and no enrollment token.
            UplinkError: the control plane refused the token.
        """
        if self.identity is not None:
            return
        if not self.config.enroll_token:
            raise IdentityError(f"{self.dir} holds no identity: pass --enroll-token")
        attempt = 0
        while not stop.is_set():
            try:
                answer = self.client.enroll(
                    self.config.enroll_token,
                    public_key_b64(self.key),
                    self.config.labels,
                    self.capabilities(),
                )
                break
            except RetryableError as exc:
                stop.wait(self.poll_backoff.delay(attempt, exc.retry_after))
                attempt += 1
        else:
            return
        server = str(self.http.base_url).rstrip("/")
        self.identity = Identity.from_enrollment(answer, server, self.config.labels)
        self.emit("event", "agent.enrolled", {"device_id": self.identity.device_id})
        self._identity_unsaved = True
        self._save_identity()

    def _save_identity(self) -> None:
        """Write the identity of an enrollment; retried from the loop until it is.

        The enrollment token is spent: exiting on a full disk would leave a device the
        control plane knows and that cannot enroll again. It runs on the identity in
        memory meanwhile and says so in its reports.
        """
        assert self.identity is not None
        try:
            save_identity(self.dir, self.identity)
        except OSError as exc:
            self.state.add_error(f"identity.json not written: {storage_reason(exc)}")
            self.report_dirty = True
            return
        self._identity_unsaved = False
        self.state.errors = [e for e in self.state.errors if not e.startswith("identity.json")]

    # -- boot: serve what was committed, with no network --------------------------------

    def boot(self) -> None:
        """Recover the store and the state, and serve every committed pipeline.

        Nothing here needs to write: on a read-only or full disk the committed models
        still serve (they are verified by reading them).
        """
        try:
            discarded = self.store.recover()
        except OSError as exc:  # what is torn stays unused: only verified slots serve
            discarded = []
            self.emit("event", "store.unrecovered", {"reason": storage_reason(exc)})
        for slot in discarded:
            self.emit("event", "slot.discarded", {"slot": slot, "reason": "torn install"})
        self.state = self.state_file.load()
        if self.buffer.reset_reason:  # the buffer started afresh (or in memory): say why
            self.emit("event", "telemetry.reset", {"reason": self.buffer.reset_reason})
            if self.buffer.volatile:
                self.state.add_error(self.buffer.reset_reason)
        if self.state_file.recovered_from_prev:
            self.emit("event", "state.recovered", {"reason": "torn state file, used previous"})
        desired = self._accepted()
        for name, rec in list(self.state.pipelines.items()):
            if rec.committed is None or (desired is not None and name not in desired.pipelines):
                continue
            self._align_pointers(rec)
            try:
                self.installer.start_committed(name, rec, rec.committed["spec"])
            except Exception as exc:  # an unusable slot: the loop reinstalls it
                self.emit("event", "pipeline.unusable", {"pipeline": name, "error": str(exc)})
                if self.installer.fall_back(name, rec, str(exc)):
                    # The last known good serves meanwhile, offline too; the reason is in
                    # the record, the report and the status.
                    self.state.add_error(f"pipeline {name}: {rec.tracker.reason}")
                    self._save_state()
                    continue
                rec.committed = None
                rec.tracker.restart(f"committed model unusable: {exc}", self.clock())
                self._save_state()
        self.emit("event", "agent.started", {"version": AGENT_VERSION})
        trim()

    def _align_pointers(self, rec: PipelineRecord) -> None:
        # state.json is the commit point; the store's pointer follows it (a crash may
        # fall between the two writes).
        assert rec.committed is not None
        # The primary last: a companion of the same model name must not end up "active".
        refs = [*(rec.committed.get("companions") or {}).values(), rec.committed["model"]]
        for ref in refs:
            if self.store.active_slot(ref["name"]) != ref["slot"]:
                with contextlib.suppress(Exception):
                    self.store.commit(ref["name"], ref["slot"])

    def _accepted(self) -> DesiredState | None:
        if not self.state.desired:
            return None
        return SignedDesiredState.model_validate(self.state.desired).document

    # -- desired state ----------------------------------------------------------------

    def accept(self, signed: SignedDesiredState, etag: str | None) -> bool:
        """Verify a received document; on success it becomes the accepted state."""
        assert self.identity is not None
        self.state.etag = etag
        try:
            doc = verify_desired(
                signed,
                self.identity.control_plane_keys(),
                now=self.clock(),
                last_revision=self.state.revision,
                last_document=self._accepted(),
            )
            if doc.device_id != self.identity.device_id:
                raise DesiredStateError("wrong device")
        except DesiredStateError as exc:
            if exc.reason == "unknown signer" and self._recover_signer(signed.key_id):
                return self.accept(signed, etag)  # once: the signer is trusted now
            self.refuse(exc, etag)
            return False
        received = signed.signed_document()
        if doc.revision != self.state.revision:
            fields = {"revision": doc.revision}
            ignored = ignored_fields(received)
            # A newer control plane's additions this agent reads past: worth a line.
            self.emit(
                "event", "desired.accepted", fields | ({"ignored": ignored} if ignored else {})
            )
            self.state.errors.clear()  # refusals were about older documents
        self.state.revision = doc.revision
        self._follow_trust(doc.trust_roots)
        # Kept as signed (fields this agent does not know included), so it verifies again.
        self.state.desired = {
            "document": received,
            "key_id": signed.key_id,
            "signature": signed.signature,
        }
        self._save_state()  # if not written, the next start fetches it again
        return True

    def _recover_signer(self, key_id: str) -> bool:
        """After a document from an unknown signer: is it trusted by the fleet's trust root?

        The control plane's key may have been replaced (lost, stolen) since this device
        last accepted a document; a trust root naming the new key verifies by itself
        against the root keys held here, so it is fetched directly (at most once a
        minute). True when `key_id` is now a trusted control-plane key.

        Only a device that holds a trust root recovers so: the answer is not signed by
        anyone this device trusts, so without root keys to check it against, whoever
        answers (anyone on the network path) would name the signer, and its publishers.
        """
        assert self.identity is not None
        if self.trust.current is None:
            return False
        chain = self._fetch_chain()
        if not chain:
            return False
        self._advance_trust(chain)
        return key_id in self.identity.control_plane

    def _fetch_chain(self) -> list[Any]:
        """The fleet's trust root chain, unchecked (at most once a minute; [] otherwise)."""
        now = time.monotonic()
        if now < self._trust_fetch_after:
            return []
        self._trust_fetch_after = now + 60.0
        try:
            return self.client.trust_roots()
        except Exception as exc:  # offline, or a control plane older than trust roots
            self.emit("event", "trust.unavailable", {"error": str(exc)[:300]})
            return []

    def _follow_trust(self, carried: list[dict[str, Any]]) -> None:
        """Take the trust root a document carries, fetching the chain when behind it.

        A document carries the newest version only. A device whose held version's root
        keys did not sign it (it was off while the root keys rotated) walks the whole
        chain instead, each link checked by the one before, so the unsigned answer adds
        nothing the root holders did not sign. The carried version is walked once: the
        walk that found the device behind is the one taken when no chain comes.
        """
        walk = self.trust.walk(carried)
        if walk.problem and self.trust.current is not None and (chain := self._fetch_chain()):
            walk = self.trust.walk([*chain, *carried])
        self._take_trust(walk)

    def _advance_trust(self, chain: list[dict[str, Any]]) -> None:
        """Take a newer trust root the chain holds: its publishers are the trusted ones."""
        self._take_trust(self.trust.walk(chain))

    def _take_trust(self, walk: TrustWalk) -> None:
        """Take where a walk of the chain got: that version's publishers are the trusted ones.

        A link that does not verify leaves the device on the last good version and says
        so (status errors, an event); the rest of the document is acted on as usual.
        """
        assert self.identity is not None
        change = self.trust.take(walk, self.identity)
        if change is None:
            return
        if change.version != change.previous:
            fields = {"version": change.version, "previous": change.previous}
            self.emit(
                "event",
                "trust.updated",
                fields | {"added": list(change.added), "removed": list(change.removed)},
            )
        if change.added:
            retry_unsigned(self.state.pipelines)
        if change.problem:
            message = f"trust root: {change.problem}"
            if message not in self.state.errors:
                self.state.add_error(message)
                self.emit(
                    "event", "trust.refused", {"version": change.version, "detail": change.problem}
                )

    def refuse(self, exc: DesiredStateError, etag: str | None) -> None:
        """Record a document this agent will not act on; what it accepted before stays."""
        self.state.etag = etag  # the same document is not fetched again until it changes
        message = f"desired state refused: {exc}"
        if self.state.errors and self.state.errors[-1] == message:
            return  # the same document again (a re-fetch): said once
        self.state.add_error(message)
        self._save_state()
        self.emit("event", "desired.refused", {"reason": exc.reason, "detail": exc.detail})

    # -- reconcile --------------------------------------------------------------------

    def observed(self) -> dict[str, ObservedPipeline]:
        """What this device has, per pipeline, for `plan`."""
        running = self.host.running()
        out: dict[str, ObservedPipeline] = {}
        for name, rec in self.state.pipelines.items():
            c = rec.committed or {}
            out[name] = ObservedPipeline(
                fingerprint=str(c.get("fingerprint", "")),
                spec=self._desired_spec(name, c) if c else {},
                running=name in running,
                refused=rec.refused,
                retry_at=rec.retry_at,
                settled=_settled(rec),
            )
        return out

    @staticmethod
    def _desired_spec(name: str, committed: dict[str, Any]) -> dict[str, Any]:
        return dict(committed.get("desired_spec", committed.get("spec", {})))

    def reconcile(self) -> None:
        """Plan against the accepted desired state and execute (installs need the uplink).

        Raises:
            RetryableError, GiveUp: an install's download lost the control plane.
        """
        desired = self._accepted()
        if desired is None:
            return
        actions = plan(desired.pipelines, self.observed(), self.clock())
        # Serving what is committed never waits on a download.
        actions.sort(key=lambda a: a.kind == "install")
        for action in actions:
            self._execute(action, desired.pipelines.get(action.pipeline))

    def _execute(self, action: Action, want: DesiredPipeline | None) -> None:
        name = action.pipeline
        rec = self.state.pipelines.setdefault(name, PipelineRecord())
        if action.kind == "stop":
            self.installer.stop(name, rec)
            del self.state.pipelines[name]
            self._save_state()
            return
        if action.kind in ("start", "reconfigure"):
            assert rec.committed is not None
            try:
                self.installer.start_committed(name, rec, self._runtime_spec(name, action))
            except SlotUnusable as exc:
                # Damaged since it was verified. Not serving: the last known good serves.
                # Serving (a reconfigure): what runs was loaded before; it keeps running.
                if action.kind == "start" and self.installer.fall_back(name, rec, str(exc)):
                    self.state.add_error(f"pipeline {name}: {rec.tracker.reason}")
                else:
                    rec.refused, rec.retry_at = action.fingerprint, self.clock() + 60.0
                    self.state.add_error(f"pipeline {name}: {exc}")
            except Exception as exc:  # recorded and reported; the loop goes on
                rec.refused, rec.retry_at = action.fingerprint, self.clock() + 60.0
                self.state.add_error(f"pipeline {name}: {exc}")
            else:
                rec.committed["desired_spec"] = action.spec
            self._save_state()
            return
        self._prune_partial()
        self.installer.install(name, rec, action, action.fingerprint)
        if rec.tracker.state is InstallState.ACTIVE:
            self._prune_cache()
        elif rec.tracker.state is InstallState.DOWNLOADING:
            self.wake.set()  # a download paused for the round: resume after a quick poll
        trim()

    def _runtime_spec(self, name: str, action: Action) -> dict[str, Any]:
        assert action.model is not None
        return {
            **action.spec,
            "name": name,
            "model": {
                "name": action.model.name,
                "version": action.model.version,
                "sha256": action.model.sha256,
            },
        }

    def _prune_partial(self) -> None:
        desired = self._accepted()
        wanted = {
            ref.sha256
            for want in (desired.pipelines.values() if desired else ())
            for ref in (want.model, want.fallback, want.cascade)
            if ref is not None
        }
        self.cache.prune_partial(wanted)

    def _prune_cache(self) -> None:
        keep: set[str] = set()
        for name in self.store.names():
            keep.update(i.sha256 for i in self.store.slots(name).values() if i.sha256)
        self.cache.prune(keep)

    # -- reports ----------------------------------------------------------------------

    def build_report(self) -> Report:
        """The reported state, from the durable state."""
        terms, digest = agent_vocabulary()
        info = AgentInfo(
            version=AGENT_VERSION,
            uptime_s=round(time.monotonic() - self.started_at, 1),
            buffer_depth=self.buffer.depth(),
            dropped=self.buffer.dropped(),
            spec_digest=digest,
            spec_vocabulary=None if digest == self._vocabulary_sent else list(terms),
            trust_version=self.trust.version,
        )
        report = build_report(self.state, info, self.clock())
        if not self._capabilities_sent:
            report.capabilities = self.capabilities()
        return report

    def send_report(self) -> bool:
        """Report if something changed or the interval passed; False when offline."""
        now = time.monotonic()
        if not self.report_dirty and now < self._next_report:
            return True
        report = self.build_report()
        try:
            self.client.report(report)
        except (RetryableError, UplinkError):
            return False
        if report.agent.spec_vocabulary is not None:
            self._vocabulary_sent = report.agent.spec_digest
        if report.capabilities is not None:
            self._capabilities_sent = True
        self.report_dirty = False
        self.online = True
        self._next_report = now + self.config.report_interval_s
        return True

    def _heartbeat(self) -> None:
        # Pipelines get per-window records from TelemetryWindows; the agent itself
        # records its own footprint once per report interval.
        now = time.monotonic()
        if now < self._next_metrics:
            return
        self._next_metrics = now + self.config.report_interval_s
        self.emit("metric", "agent.resources", resources())

    def window_s(self) -> float:
        """Telemetry window length: config, else the control plane's setting, else 10 s."""
        if self.config.metrics_interval_s:
            return self.config.metrics_interval_s
        settings = self.identity.settings if self.identity else {}
        return float(settings.get("telemetry_window_s", 10))

    def _bundle_dir(self, pipeline: str) -> tuple[Path, str] | None:
        rec = self.state.pipelines.get(pipeline)
        if rec is None or rec.committed is None:
            return None
        model = rec.committed["model"]
        directory = self.store.slot_dir(model["name"], model["slot"])
        return directory, str(rec.committed.get("deployment", ""))

    def _egress(self) -> dict[str, Any]:
        # Read every second by the telemetry loop: parse the document once per revision.
        revision = self.state.revision
        if self._egress_cache is None or self._egress_cache[0] != revision:
            desired = self._accepted()
            self._egress_cache = (revision, dict(desired.egress) if desired else {})
        return self._egress_cache[1]

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The local `/status` document."""
        with self.lock:
            doc = status_document(self.state, self.host.running())
            doc.update(
                device_id=self.identity.device_id if self.identity else None,
                online=self.online,
                buffer_depth=self.buffer.depth(),
                dropped=self.buffer.dropped(),
                telemetry_uploaded=self.drain.uploaded,
                last_seq=self.buffer.last_seq(),
                mqtt_connected=bool(self.mqtt and self.mqtt.connected.is_set()),
            )
            server = self._local_server
            if server is not None:
                poll = server.busy_poll
                doc["local_api"] = {
                    "port": self.local_port,
                    "connections": len(server.conns),
                    "busy_poll_us": server.busy_poll_us,
                    "busy_poll_windows": poll.windows,
                    "busy_poll_hits": poll.hits,
                }
            return doc

    # -- the loop ---------------------------------------------------------------------

    def _start_background(self, stop: threading.Event) -> None:
        assert self.identity is not None
        self.client.key = DeviceKey(self.identity.device_id, self.key)
        self.installer.capabilities = self.capabilities()
        t = threading.Thread(target=self.drain.run, args=(stop,), name="telemetry", daemon=True)
        t.start()
        self._threads.append(t)
        windows = TelemetryWindows(
            self.host,
            self.add_telemetry,
            self._bundle_dir,
            self._egress,
            lambda: self.online,
            self.window_s,
            self.clock,
        )
        self.windows = windows
        t = threading.Thread(target=windows.run, args=(stop,), name="windows", daemon=True)
        t.start()
        self._threads.append(t)
        if self.config.local_port is not None:
            from edgewise.agent._local import LocalServer, make_local_app

            app = make_local_app(self.status, self.add_local_telemetry, self._inference_app)
            server = self._local_server = LocalServer(
                app, self.config.local_port, self.config.local_busy_poll_us
            )
            self.local_port = server.start()
            self._closers.append(server.stop)
            # Atomically: a reader that sees the file must never see it empty (the demo
            # read it between its creation and its write once, and failed).
            try:
                atomic_write_bytes(self.dir / "local.json", b'{"port": %d}\n' % self.local_port)
            except OSError as exc:  # the API serves anyway; only its port goes unannounced
                self.state.add_error(f"local.json not written: {storage_reason(exc)}")
        if self.config.mqtt is not None:
            from edgewise.agent._wake import MqttWake

            wake = MqttWake(*self.config.mqtt, self.identity.device_id, self.wake)
            wake.start()
            self.mqtt = wake
            self._closers.append(wake.stop)

    _inference: Any = None
    _local_server: Any = None

    def _inference_app(self) -> Any:
        if not isinstance(self.host, RuntimeHost) or not self.host.started:
            return None
        if self._inference is None:
            from edgewise.runtime import InferenceAPI

            server = self._local_server
            self._inference = InferenceAPI(self.host.runtime, server and server.alone)
        return self._inference

    def run(self, stop: threading.Event, ready: Callable[[Agent], None] | None = None) -> None:
        """Run until `stop` is set.

        Raises:
            IdentityError: first start without an enrollment token.
        """
        if self.identity is None and not self.config.enroll_token:
            raise IdentityError(f"{self.dir} holds no identity: pass --enroll-token")
        self.boot()  # serve first; enrollment may need a network that is not there
        self.enroll(stop)
        if stop.is_set():
            return
        self._start_background(stop)
        if ready is not None:
            ready(self)
        try:
            self._follow(stop)
        except StopPolling:  # a stop signal cut the long-poll short
            return

    def on_stop_signal(self) -> None:
        """For a signal handler in the thread running `run`: do not wait for the poll.

        `run` otherwise sees a stop only once its long-poll answers (up to `poll_wait_s`).
        While a poll is in flight this raises `StopPolling` out of it (a signal handler's
        exception interrupts the blocking read), and `run` returns.
        """
        self.wake.set()
        if self.polling:
            raise StopPolling

    def _follow(self, stop: threading.Event) -> None:
        attempt = 0
        trimmed = False
        while not stop.is_set():
            if self._identity_unsaved:
                self._save_identity()
            self.send_report()
            self._heartbeat()
            try:
                woke = self.wake.is_set()
                self.wake.clear()
                wait = 0.0 if woke or self.state.etag is None else self.poll_wait_s
                self.polling = True
                try:
                    poll = self.client.desired(self.state.etag, wait)
                finally:
                    self.polling = False
                self.online = True
                idle = poll.signed is None and wait == 0 and self.poll_wait_s == 0
                attempt = 0
                self.state.last_sync = self.clock()
                if poll.signed is not None:
                    self.accept(poll.signed, poll.etag)
                elif poll.malformed:
                    self.refuse(DesiredStateError("malformed", poll.malformed), poll.etag)
                self.reconcile()
                self.send_report()
                if not trimmed:  # the first sync imported the uplink's code: trim once
                    trimmed = True
                    trim()
                if idle:  # no long-poll: sleep until the interval or an MQTT wake-up
                    self.wake.wait(self.config.poll_interval_s)
            except (RetryableError, GiveUp) as exc:
                self.online = False
                self.report_dirty = True  # the first successful contact reports at once
                delay = self.poll_backoff.delay(attempt, getattr(exc, "retry_after", None))
                attempt += 1
                self._reconcile_offline()
                # Retry at least every poll wait; with long-polls off (0), after the delay.
                self.wake.wait(min(delay, self.poll_wait_s) if self.poll_wait_s > 0 else delay)
            except DeviceAuthError as exc:
                self.online = False
                self.state.add_error(f"control plane refused this device: {exc.code}")
                stop.wait(self.poll_backoff.delay(attempt + 5))
                attempt += 1
            except InstallFailed as exc:  # pragma: no cover - installer records these
                self.state.add_error(exc.reason)
            except UplinkError as exc:
                self.state.add_error(f"control plane error: {exc}")
                stop.wait(self.poll_backoff.delay(attempt))
                attempt += 1
            except Exception as exc:
                # The agent must outlive its own bugs: what serves keeps serving, the
                # error is reported, and the loop tries again after a backoff.
                self.state.add_error(f"agent error: {type(exc).__name__}: {exc}")
                self.report_dirty = True
                self.emit("event", "agent.error", {"error": f"{type(exc).__name__}: {exc}"})
                stop.wait(self.poll_backoff.delay(attempt))
                attempt += 1

    def _reconcile_offline(self) -> None:
        # With no control plane, installs whose bundles are cached still proceed; the
        # rest wait. Nothing here may raise out of the loop.
        with contextlib.suppress(RetryableError, GiveUp):
            self.reconcile()

    def close(self) -> None:
        """Stop the local API, MQTT, and the runtime."""
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self.host.close()
        self.buffer.close()
        self.http.close()


def _settled(rec: PipelineRecord) -> bool:
    """Whether the install record ended `active` on the committed models."""
    committed = (rec.committed or {}).get("fingerprint")
    target = (rec.target or {}).get("fingerprint", committed)
    return rec.tracker.state is InstallState.ACTIVE and target == committed
