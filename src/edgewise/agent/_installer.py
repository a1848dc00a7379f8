"""Executing install actions: fetch, verify, write the inactive slot, health-gate, switch, commit.

Order of an install, with its crash points::

    pending -> downloading  (during_download, after_download)
            -> verifying    digest + bundle signatures against the trust root + requires
            -> installing   inactive slot marked `writing`, extracted (mid_write),
                            marked `ready` (after_write)
            -> health_checking  load, warm up, health samples (during_health_check)
            -> switch       hot swap in the runtime (after_switch)
            -> commit       state.json names the new slot (the commit point), then the
                            store's active pointer flips (after_commit)
            -> active

Until the state commit, a restart serves the old committed model; after it, the new
one. A failure before the switch leaves the old model serving and records `failed`
with the reason; a switch that breaks the pipeline is undone (`rolled_back`).

A disk that is full, read-only or failing is a reason like any other ("insufficient
disk: ...", "storage error: ..."), tried again after `RETRY_DISK_S`: the slot being
written is emptied so its space comes back, a slot that cannot fit is not started, and
a commit that cannot be written is undone (what a restart would serve is what serves).
Failures are kept in memory and reported even when state.json cannot record them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.agent._backoff import Backoff, GiveUp, RetryableError
from edgewise.agent._crash import crashpoint
from edgewise.agent._durable import out_of_space
from edgewise.agent._fetch import (
    ArtifactCache,
    ArtifactSource,
    DownloadPaused,
    FetchError,
    InsufficientDisk,
    StorageError,
)
from edgewise.agent._host import Host
from edgewise.agent._install import IllegalTransition, InstallState
from edgewise.agent._plan import Action
from edgewise.agent._state import PipelineRecord
from edgewise.agent._store import ModelStore, Slot, StoreError
from edgewise.agent._vocabulary import spec_refusal
from edgewise.protocol import DesiredModelRef

__all__ = ["InstallFailed", "Installer", "SlotUnusable", "retry_incompatible", "retry_refused"]

# How long a transient refusal waits before the plan may try the same install again.
RETRY_DISK_S = 300.0
RETRY_FETCH_S = 30.0
# A download's share of one round: past it the agent polls and reports, then resumes.
DOWNLOAD_SLICE_S = 120.0
# Both slots of a model serve (two pipelines, two versions): until one is let go.
RETRY_SLOT_S = 60.0
# A spec this agent is too old for: tried again after that long (an upgraded agent).
RETRY_VOCABULARY_S = 300.0
_ROLES = ("model", "fallback", "cascade")


class InstallFailed(Exception):
    """An install refused with a reason; `retry_after_s` None means permanent."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def storage_reason(exc: OSError) -> str:
    """A human reason for a local file error: full, read-only, or failing storage."""
    why = exc.strerror or str(exc)
    if out_of_space(exc):
        return f"insufficient disk: {why}"
    return f"storage error: {why}"


class SlotUnusable(InstallFailed):
    """A committed slot no longer holds the verified bundle it was committed with."""


_BLOCK = 4096


def _blocks(n: int) -> int:
    """`n` bytes as the filesystem allocates them (whole blocks)."""
    return -(-n // _BLOCK) * _BLOCK


@dataclass
class _Prepared:
    role: str
    ref: DesiredModelRef
    path: Path | None = None  # the verified .ewb
    slot: Slot | None = None
    model: Any = None
    files: dict[str, str] | None = None  # signed digests of the bundle's files
    slot_bytes: int = 0  # disk the extracted slot takes (files and manifest, in blocks)


def _ref_json(ref: DesiredModelRef, slot: Slot | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": ref.name, "version": ref.version, "sha256": ref.sha256}
    if slot is not None:
        out["slot"] = slot
    return out


def _refs(committed: Any) -> list[dict[str, Any]]:
    """The model refs of a committed record (primary first); [] if it is malformed."""
    if not isinstance(committed, dict):
        return []
    companions = committed.get("companions") or {}
    if not isinstance(companions, dict):
        return []
    refs = [committed.get("model"), *companions.values()]
    keys = ("name", "version", "sha256", "slot")
    for ref in refs:
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) for k in keys):
            return []
        if ref["slot"] not in ("a", "b"):
            return []
    return refs


def _describe(committed: dict[str, Any]) -> str:
    """``name@version (slot s)`` of a committed record's primary model."""
    model = committed["model"]
    return f"{model['name']}@{model['version']} (slot {model['slot']})"


def _previous(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """What a new commit keeps as its last known good: the models it replaces.

    Only when they sit in other slots than the new ones (a reinstall of the same models
    finds them in their own slots); then the older record's own fallback is kept.
    """
    if old is None:
        return None
    in_new = {(r["name"], r["slot"]) for r in _refs(new)}
    if any((r["name"], r["slot"]) in in_new for r in _refs(old)):
        older = old.get("previous")
        return older if isinstance(older, dict) else None
    return {k: v for k, v in old.items() if k != "previous"}


def check_requires(manifest: Any, capabilities: dict[str, Any]) -> str | None:
    """Why this device cannot run the bundle, or None (pure)."""
    req = manifest.requires
    runtimes = capabilities.get("runtimes") or {}
    if req.runtime not in runtimes:
        return f"incompatible: needs runtime {req.runtime}, device has {sorted(runtimes) or 'none'}"
    mem = capabilities.get("memory_mb")
    if req.memory_mb is not None and isinstance(mem, int) and req.memory_mb > mem:
        return f"incompatible: needs {req.memory_mb} MB memory, device has {mem} MB"
    have = set(capabilities.get("accelerators") or [])
    missing = sorted(set(req.accelerators) - have)
    if missing:
        return f"incompatible: needs accelerator {', '.join(missing)}"
    return None


def retry_refused(pipelines: dict[str, PipelineRecord], reason: str) -> list[str]:
    """Let the installs refused for a reason starting with `reason` be tried again.

    Returns the pipelines concerned. Other refusals stay refused: the same bundle would
    fail the same way.
    """
    retried = []
    for name, rec in pipelines.items():
        if rec.refused and rec.tracker.reason.startswith(reason):
            rec.refused, rec.retry_at = "", None
            retried.append(name)
    return retried


def retry_incompatible(pipelines: dict[str, PipelineRecord]) -> list[str]:
    """Let the installs refused as incompatible be tried again (the device changed)."""
    return retry_refused(pipelines, "incompatible")


class Installer:
    """Runs install / start / reconfigure / stop actions against the store and the host."""

    def __init__(
        self,
        store: ModelStore,
        cache: ArtifactCache,
        source: ArtifactSource,
        host: Host,
        publishers: Callable[[], dict[str, Ed25519PublicKey]],
        capabilities: dict[str, Any],
        backoff: Backoff,
        persist: Callable[[], None],
        emit: Callable[[str, str, dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
        serving: Callable[[str], set[tuple[str, str]]] = lambda pipeline: set(),
    ) -> None:
        self.store = store
        self.cache = cache
        self.source = source
        self.host = host
        self.publishers = publishers
        self.capabilities = capabilities
        self.backoff = backoff
        self.persist = persist
        self.emit = emit
        self.clock = clock
        # (model name, slot) pairs the other pipelines serve from: an install never
        # writes them (two pipelines may run two versions of one model).
        self.serving = serving
        self.download_slice_s = DOWNLOAD_SLICE_S

    # -- the state machine with persistence -----------------------------------------

    def _move(
        self, rec: PipelineRecord, to: InstallState, reason: str, progress: float | None = None
    ) -> None:
        rec.tracker.move(to, reason, self.clock(), progress)
        self.persist()

    # -- actions --------------------------------------------------------------------

    def stop(self, name: str, rec: PipelineRecord) -> None:
        """Stop serving a pipeline the desired state no longer names."""
        self.host.stop(name)
        self.emit("event", "pipeline.stopped", {"pipeline": name})

    def start_committed(self, name: str, rec: PipelineRecord, spec: dict[str, Any]) -> None:
        """Serve the committed models (at boot, or after a spec change).

        Raises:
            SlotUnusable: a committed slot fails its digest check (never served).
            InstallFailed: the spec uses terms this agent does not know (the old one
                keeps serving).
        """
        c = rec.committed
        if c is None:
            raise InstallFailed("nothing committed")
        why = spec_refusal(spec)
        if why:
            raise InstallFailed(why, RETRY_VOCABULARY_S)
        models: dict[str, Any] = {}
        for role in _ROLES:
            ref = c["model"] if role == "model" else (c.get("companions") or {}).get(role)
            if ref is None:
                continue
            slot = ref["slot"]
            held = self.store.slots(ref["name"])[slot].sha256
            if held != ref.get("sha256", held):
                # Its files check out, but they are another bundle's (the slot was written
                # again since): serving them would run another model under this one's name.
                raise SlotUnusable(
                    f"committed slot {ref['name']}/{slot} holds another bundle than "
                    f"{ref['name']}@{ref.get('version')}"
                )
            if not self.store.verify_slot(ref["name"], slot):
                raise SlotUnusable(f"committed slot {ref['name']}/{slot} failed verification")
            models[role] = self.host.load(self.store.slot_dir(ref["name"], slot))
        model = models.pop("model")
        self.host.serve(spec, model, models)
        if c.get("spec") != spec:  # at boot it is the same: nothing to write
            c["spec"] = spec
            self.persist()

    def fall_back(self, name: str, rec: PipelineRecord, why: str) -> bool:
        """Serve the previously committed models when the committed ones cannot serve.

        A slot damaged after it was verified (a bit flip in the model file, a file lost
        to the flash) would otherwise leave the pipeline serving nothing until the bundle
        is fetched again, which an offline device cannot do. The previous models still
        in their slots, with the digests they were written with, are the last known good.
        The store's pointers follow them, so the next install writes the damaged slot and
        never the one serving. Nothing is written to state.json here: the caller saves.

        Returns:
            Whether the previous models now serve (an event and the record say why).
        """
        failed = rec.committed
        previous = (failed or {}).get("previous")
        refs = _refs(previous)
        if failed is None or not isinstance(previous, dict) or not refs:
            return False
        if not isinstance(previous.get("spec"), dict):
            return False
        try:
            for ref in refs:
                info = self.store.slots(ref["name"])[ref["slot"]]
                if info.sha256 != ref["sha256"] or not self.store.verify_slot(
                    ref["name"], ref["slot"]
                ):
                    return False
        except (StoreError, OSError, ValueError):  # a name no store holds, a damaged pointer
            return False
        rec.committed = previous
        try:
            self.start_committed(name, rec, previous["spec"])
        except Exception:  # the previous models cannot serve either
            rec.committed = failed
            return False
        for ref in reversed(refs):  # the primary last, as an install commits
            with contextlib.suppress(OSError):  # a read-only disk: the next start aligns
                self.store.commit(ref["name"], ref["slot"])
        bad, good = _describe(failed), _describe(previous)
        reason = f"{bad} unusable ({why}); serving the previous {good}"
        rec.tracker.restart(reason, self.clock())
        self.emit(
            "event",
            "pipeline.fell_back",
            {"pipeline": name, "from": bad, "to": good, "reason": why},
        )
        return True

    def install(self, name: str, rec: PipelineRecord, action: Action, fingerprint: str) -> None:
        """Install the action's models for pipeline `name`; records the outcome in `rec`.

        A spec refused for terms this agent does not know is looked at again every
        `RETRY_VOCABULARY_S` (a plugin may have registered a stage since); while the
        answer is the same, that costs nothing: no event, no new timeline, no report.
        """
        assert action.model is not None
        if rec.refused == fingerprint and rec.tracker.state is InstallState.FAILED:
            why = spec_refusal(self._spec(name, action))
            if why and why == rec.tracker.reason:
                # Not persisted: after a restart the first look is as quiet as this one.
                rec.retry_at = self.clock() + RETRY_VOCABULARY_S
                return
        target = {**_ref_json(action.model), "fingerprint": fingerprint}
        resuming = rec.target == target and rec.tracker.state is InstallState.DOWNLOADING
        try:
            if not resuming:
                rec.target = target
                rec.tracker.restart(
                    f"install {action.model.name}@{action.model.version}", self.clock()
                )
                self.emit("event", "install.started", {"pipeline": name, **target})
                self.persist()
            self._install(name, rec, action, fingerprint)
        except InstallFailed as exc:
            self._fail(name, rec, fingerprint, exc)
        except (RetryableError, GiveUp):
            # The uplink is down mid-download: keep `downloading`; the next round resumes.
            raise
        except DownloadPaused:
            # A slow link: the agent polls and reports, and the next round resumes.
            with contextlib.suppress(OSError):
                self.persist()
        except OSError as exc:  # the disk is full, read-only or failing (state.json too)
            self._fail(name, rec, fingerprint, InstallFailed(storage_reason(exc), RETRY_DISK_S))

    def _fail(self, name: str, rec: PipelineRecord, fingerprint: str, exc: InstallFailed) -> None:
        """Record the refusal; kept in memory (and reported) if state.json cannot take it.

        The refusal's `retry_at` holds the next attempt off even then: a disk that cannot
        be written is not written again at every poll.
        """
        rolled = exc.reason.startswith("rolled back")
        to = InstallState.ROLLED_BACK if rolled else InstallState.FAILED
        try:
            rec.tracker.move(to, exc.reason, self.clock())
        except IllegalTransition:
            rec.tracker.move(InstallState.FAILED, exc.reason, self.clock())
        rec.refused = fingerprint
        rec.retry_at = None if exc.retry_after_s is None else self.clock() + exc.retry_after_s
        with contextlib.suppress(OSError):  # written with the next state that can be
            self.persist()
        self.emit("event", "install.failed", {"pipeline": name, "reason": exc.reason})

    def _install(self, name: str, rec: PipelineRecord, action: Action, fingerprint: str) -> None:
        assert action.model is not None
        spec = self._spec(name, action)
        why = spec_refusal(spec)
        if why:  # before downloading anything for it
            raise InstallFailed(why, RETRY_VOCABULARY_S)
        parts = [_Prepared("model", action.model)]
        for role, ref in (("fallback", action.fallback), ("cascade", action.cascade)):
            if ref is not None:
                parts.append(_Prepared(role, ref))
        self._download(rec, parts)
        self._verify(rec, parts)
        self._write(name, rec, parts)
        self._health(rec, parts)
        old_models = rec.committed
        companions = {p.role: p.model for p in parts if p.role != "model"}
        try:
            self.host.serve(spec, parts[0].model, companions)
        except Exception as exc:  # the runtime refused the spec: undo
            if old_models is not None:
                self._restore(name, rec, old_models)
                raise InstallFailed(f"rolled back: pipeline refused the new model: {exc}") from exc
            raise InstallFailed(f"incompatible: pipeline refused the model: {exc}") from exc
        crashpoint("after_switch")
        main = parts[0]
        assert main.slot is not None
        rec.committed = {
            "model": _ref_json(main.ref, main.slot),
            "deployment": action.deployment,
            "spec": spec,
            "desired_spec": action.spec,
            "fingerprint": fingerprint,
            "companions": {p.role: _ref_json(p.ref, p.slot) for p in parts[1:]},
        }
        previous = _previous(old_models, rec.committed)
        if previous is not None:
            rec.committed["previous"] = previous
        rec.refused, rec.retry_at = "", None
        rec.tracker.move(
            InstallState.ACTIVE, f"serving {main.ref.name}@{main.ref.version}", self.clock()
        )
        try:
            self.persist()  # the commit point
        except OSError as exc:
            # Not recorded, so a restart would serve the old models: serve them now too.
            rec.committed = old_models
            self._restore(name, rec, old_models)
            raise InstallFailed(
                f"rolled back: the install could not be recorded: {storage_reason(exc)}",
                RETRY_DISK_S,
            ) from exc
        # The primary last: with a companion of the same model name, the store's pointer
        # ends on the primary's slot, and the next install writes the companion's.
        for p in [*parts[1:], parts[0]]:
            assert p.slot is not None
            # state.json decided; the store's pointer follows it (at boot if not now).
            with contextlib.suppress(OSError):
                self.store.commit(p.ref.name, p.slot)
        crashpoint("after_commit")
        self.emit(
            "event",
            "install.succeeded",
            {"pipeline": name, "model": main.ref.name, "version": main.ref.version},
        )

    def _restore(self, name: str, rec: PipelineRecord, old: dict[str, Any] | None) -> None:
        """Serve the committed models again after a switch that cannot stand."""
        if old is None:
            self.host.stop(name)
            return
        # If the old pipeline cannot come back either, the report says why.
        with contextlib.suppress(Exception):
            self.start_committed(name, rec, old["spec"])

    def _spec(self, name: str, action: Action) -> dict[str, Any]:
        assert action.model is not None
        spec = dict(action.spec or {})
        spec["name"] = name
        spec["model"] = {
            "name": action.model.name,
            "version": action.model.version,
            "sha256": action.model.sha256,
        }
        return spec

    def _download(self, rec: PipelineRecord, parts: list[_Prepared]) -> None:
        try:
            missing = [p for p in parts if not self.cache.has(p.ref.sha256)]
        except FetchError as exc:  # the cache cannot be read: the device's storage
            raise InstallFailed(exc.reason, RETRY_DISK_S) from exc
        if not missing:
            for p in parts:
                p.path = self.cache.path(p.ref.sha256)
            return
        total = sum(p.ref.size for p in missing) or 1
        try:
            reclaim = {p.ref.sha256: self.store.reclaimable_bytes(p.ref.name) for p in missing}
            for p in missing:
                self.cache.preflight(
                    p.ref.size, self.cache.partial_size(p.ref.sha256), reclaim[p.ref.sha256]
                )
        except InsufficientDisk as exc:
            for p in missing:  # nothing fits for now: give the partial files' space back
                self.cache.discard_partial(p.ref.sha256)
            raise InstallFailed(exc.reason, RETRY_DISK_S) from exc
        except OSError as exc:
            raise InstallFailed(storage_reason(exc), RETRY_DISK_S) from exc
        done_before = 0
        last = [-1.0]

        def progress(done: int, size: int) -> None:
            frac = (done_before + done) / total
            if frac - last[0] >= 0.1 or done == size:
                last[0] = frac
                rec.tracker.move(
                    InstallState.DOWNLOADING, f"{frac:.0%}", self.clock(), round(frac, 3)
                )
                # A tick not written is no loss (the next state is); a full disk shows in
                # the download's own write, as the download's failure.
                with contextlib.suppress(OSError):
                    self.persist()

        if rec.tracker.state is not InstallState.DOWNLOADING:
            self._move(rec, InstallState.DOWNLOADING, "0%", 0.0)
        deadline = time.monotonic() + self.download_slice_s
        for p in missing:
            ref = p.ref
            try:
                result = self.backoff.call(
                    lambda ref=ref: self.cache.fetch(  # type: ignore[misc]
                        self.source,
                        ref.url,
                        ref.sha256,
                        ref.size,
                        progress,
                        reclaim[ref.sha256],
                        deadline,
                    )
                )
            except (InsufficientDisk, StorageError) as exc:
                raise InstallFailed(exc.reason, RETRY_DISK_S) from exc
            except FetchError as exc:
                raise InstallFailed(f"download failed: {exc.reason}", RETRY_FETCH_S) from exc
            done_before += ref.size
            p.path = result.path
        for p in parts:
            p.path = p.path or self.cache.path(p.ref.sha256)

    def _verify(self, rec: PipelineRecord, parts: list[_Prepared]) -> None:
        # Imported here: an agent that installs nothing keeps the bundle code unloaded.
        from edgewise.bundle import BundleError, SignatureError, trusted_manifest

        self._move(rec, InstallState.VERIFYING, "checking digest and signatures")
        for p in parts:
            assert p.path is not None
            try:
                # The files' bytes are checked by `extract` while it writes the slot (one
                # pass over them, not two); nothing is written before the signatures hold.
                m = trusted_manifest(p.path, self.publishers())
            except SignatureError as exc:
                self.cache.prune_one(p.ref.sha256)
                raise InstallFailed(f"signature invalid: {exc.message}") from exc
            except BundleError as exc:
                self.cache.prune_one(p.ref.sha256)
                raise InstallFailed(f"bundle invalid: {exc.message}") from exc
            if m.name != p.ref.name or m.version != p.ref.version:
                raise InstallFailed(
                    f"bundle invalid: holds {m.name}@{m.version}, "
                    f"expected {p.ref.name}@{p.ref.version}"
                )
            why = check_requires(m, self.capabilities)
            if why:
                raise InstallFailed(why)
            p.files = {name: entry.sha256 for name, entry in m.files.items()}
            # extract writes the manifest beside the files, in this form.
            body = json.dumps(m.model_dump(mode="json", exclude_unset=True), indent=2)
            p.slot_bytes = sum(_blocks(e.size) for e in m.files.values()) + _blocks(len(body) + 1)

    def _write(self, name: str, rec: PipelineRecord, parts: list[_Prepared]) -> None:
        from edgewise.bundle import BundleError, extract

        # A fallback or cascade may be another version of the primary's model, and another
        # pipeline may run another version of it: no part writes a slot another pipeline
        # serves from, the slot this pipeline's primary serves from, or a slot another
        # part of this install has (or will have) taken.
        keep = set(self.serving(name))
        if rec.committed is not None:
            primary = rec.committed["model"]
            keep.add((str(primary["name"]), str(primary["slot"])))
        for p in parts:
            found = self.store.find_ready(p.ref.name, p.ref.sha256)
            if found is not None and self.store.verify_slot(p.ref.name, found):
                p.slot = found
                keep.add((p.ref.name, found))
        for p in parts:
            assert p.path is not None
            if p.slot is not None:
                continue
            if rec.tracker.state is not InstallState.INSTALLING:
                self._move(rec, InstallState.INSTALLING, f"writing {p.ref.name} into inactive slot")
            self._room_for_slot(p)
            avoid = {s for n, s in keep if n == p.ref.name}
            try:
                slot = self.store.begin_write(p.ref.name, p.ref.version, p.ref.sha256, avoid)
            except StoreError as exc:
                raise InstallFailed(
                    f"{exc}; the install waits until a pipeline stops using one",
                    RETRY_SLOT_S,
                ) from exc
            keep.add((p.ref.name, slot))
            slot_dir = self.store.slot_dir(p.ref.name, slot)
            try:
                slot_dir.rmdir()  # extract wants to create it: it renames a verified temp dir
                extract(p.path, slot_dir, self.publishers())
                crashpoint("mid_write")
                self.store.finish_write(p.ref.name, slot, known=p.files)
            except BundleError as exc:
                self._discard(p.ref.name, slot)
                raise InstallFailed(f"bundle invalid: {exc.message}") from exc
            except OSError as exc:
                # A half-written slot would hold its space until the next start: empty it.
                self._discard(p.ref.name, slot)
                raise InstallFailed(storage_reason(exc), RETRY_DISK_S) from exc
            p.slot = slot
        if rec.tracker.state is not InstallState.INSTALLING:
            self._move(rec, InstallState.INSTALLING, "slot already holds this bundle")
        crashpoint("after_write")

    def _room_for_slot(self, p: _Prepared) -> None:
        """Refuse, before writing a byte, a slot that the free space cannot hold.

        Without this a bundle in the cache is extracted again at every retry until the
        disk says no, wearing the flash for nothing.
        """
        need = p.slot_bytes + self.cache.reserve_bytes
        # The slot about to be emptied gives its space to the new one.
        free = self.cache.free_bytes(self.store.root) + self.store.reclaimable_bytes(p.ref.name)
        if free < need:
            raise InstallFailed(
                f"insufficient disk: need {need / 1e6:.1f} MB to write the slot, "
                f"{free / 1e6:.1f} MB free",
                RETRY_DISK_S,
            )

    def _discard(self, name: str, slot: Slot) -> None:
        # Best effort: `recover` at the next start empties a slot still marked writing.
        with contextlib.suppress(OSError):
            self.store.discard(name, slot)

    def _health(self, rec: PipelineRecord, parts: list[_Prepared]) -> None:
        self._move(rec, InstallState.HEALTH_CHECKING, "loading, warming up, running samples")
        for p in parts:
            assert p.slot is not None
            try:
                p.model = self.host.load(self.store.slot_dir(p.ref.name, p.slot))
            except Exception as exc:  # the runtime cannot load it on this device
                raise InstallFailed(f"incompatible: model does not load: {exc}") from exc
            crashpoint("during_health_check")
            health = self.host.health(p.model)
            if not health.ok:
                raise InstallFailed(health.reason)
