"""Hostile storage under the agent: full, read-only and damaged disks, on real filesystems.

Edge devices run on small, wearing flash. Disks here are real: a tmpfs of a few MiB fills
up for real (ENOSPC), is remounted read-only for real, and an ext4 image goes read-only
the way worn flash does (`errors=remount-ro`, the kernel's `trigger_fs_error`). Tests that
need to mount skip, saying why, only when mounting is refused with EPERM.

The contract: a full or read-only disk at any instant leaves a device serving its last
good model; an install that cannot complete fails with a reason the control plane sees,
gives its space back, leaves the running slot alone and waits before trying again; the
telemetry buffer sheds its lowest class first and never loses what it holds; damage
found at start (torn files, files where directories belong, symlinks out of the data
directory) is cleaned up, never written through, and never stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgewise.agent import (
    ArtifactCache,
    Backoff,
    HttpArtifactSource,
    InstallState,
    ModelStore,
    RuntimeHost,
)
from edgewise.agent._buffer import BufferFull, TelemetryBuffer
from edgewise.agent._drain import TelemetryDrain
from edgewise.agent._durable import DurableJson
from edgewise.agent._fetch import sha256_of
from edgewise.agent._installer import RETRY_DISK_S, Installer
from edgewise.agent._local import make_local_app
from edgewise.agent._ratelimit import TokenBucket
from edgewise.agent._state import AgentState, PipelineRecord, StateFile
from edgewise.bundle import extract, load_public_key
from edgewise.protocol import TelemetryAck, TelemetryBatch

from ._harness import EDGEWISE, AgentProc, ControlPlaneProc, TamperProxy, free_port, wait_for
from .conftest import ArtifactServer
from .test_agent_installer import CAPS, _action

# -- real filesystems -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MNT_DETACH = 2


def _sys_mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode()):
        err = ctypes.get_errno()
        if err == errno.EPERM:
            pytest.skip(f"mounting a {fstype} needs CAP_SYS_ADMIN (mount(2): EPERM)")
        raise OSError(err, os.strerror(err), str(target))


class Mounts:
    """Filesystems a test mounts; all unmounted at teardown (lazily if still busy)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.points: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        _sys_mount("tmpfs", path, "tmpfs", 0, f"size={size},mode=0700")
        self.points.append(path)
        return path

    def read_only(self, path: Path, size: str) -> None:
        """Remount a tmpfs read-only (nothing may have a file open for writing on it)."""
        _sys_mount("tmpfs", path, "tmpfs", _MS_REMOUNT | _MS_RDONLY, f"size={size}")

    def ext4(self, path: Path, size_mb: int = 16) -> Path:
        """An ext4 image that turns read-only on error, as a worn-out SD card does."""
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        image = self.tmp / f"{path.name}.img"
        with image.open("wb") as f:
            f.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, capture_output=True)
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(image), str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            refused = ("permission denied", "must be superuser", "not permitted")
            if any(word in done.stderr.lower() for word in refused):
                pytest.skip(f"mounting an ext4 image needs privileges (EPERM): {done.stderr}")
            raise OSError(done.stderr)
        self.points.append(path)
        return path

    def break_ext4(self, path: Path) -> None:
        """Make an ext4 mount hit an error: with errors=remount-ro it turns read-only."""
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True, text=True
        ).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to fail an ext4 mount with")
        trigger.write_text("edgewise storage-fault test\n")

        def read_only() -> bool:  # the kernel remounts from a work queue: soon, not now
            try:
                (path / ".probe").mkdir()
            except OSError as exc:
                return exc.errno == errno.EROFS
            (path / ".probe").rmdir()
            return False

        wait_for(read_only, 30, f"{path} read-only")

    def close(self) -> None:
        for point in reversed(self.points):
            if _libc.umount2(str(point).encode(), 0):
                _libc.umount2(str(point).encode(), _MNT_DETACH)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.close()


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `directory` with one file, leaving about `leave` bytes free."""
    filler = directory / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while shutil.disk_usage(directory).free - leave >= len(block):
            os.write(fd, block)
        if not leave:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block[:512])
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


# -- agents whose port does not depend on writing local.json ---------------------------


class FixedPortAgent(AgentProc):
    """An agent process on a known local port: a full or read-only disk may not take
    local.json, and the harness removes it before each start (which frees disk)."""

    def __init__(self, data: Path, server: str, token: str | None, tag: str, log: Path) -> None:
        super().__init__(data, server, token, tag=tag)
        self.fixed_port = free_port()
        self.log = log  # off the disk under test: the agent's stderr is not its data

    @property
    def port(self) -> int:
        return self.fixed_port

    def start(self, env: dict[str, str] | None = None, *extra: str) -> None:
        cmd = [EDGEWISE, "agent", "--server", self.server, "--data", str(self.data)]
        cmd += ["--local-port", str(self.fixed_port), "--poll-wait", "2", *extra]
        if self.token:
            cmd += ["--enroll-token", self.token]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )


@pytest.fixture
def fixed_agents() -> Iterator[list[FixedPortAgent]]:
    made: list[FixedPortAgent] = []
    try:
        yield made
    finally:
        for agent in made:
            agent.kill()


def _new_agent(
    cp: ControlPlaneProc, data: Path, made: list[FixedPortAgent], log: Path
) -> FixedPortAgent:
    tag = uuid.uuid4().hex[:10]
    agent = FixedPortAgent(data, cp.url, cp.enroll_token(tag=tag), tag, log)
    made.append(agent)
    return agent


def _pipeline(cp: ControlPlaneProc, dev: str) -> dict[str, Any]:
    return cp.device(dev).get("pipelines", {}).get("digits") or {}


def _serving_1_0_0(cp: ControlPlaneProc, agent: AgentProc) -> str:
    agent.start()
    agent.wait_up()
    dev = agent.device_id()
    cp.deploy("digits", "digits-mlp@1.0.0", tag=agent.tag)
    wait_for(
        lambda: (
            _pipeline(cp, dev).get("status") == "active"
            and _pipeline(cp, dev).get("version") == "1.0.0"
        ),
        90,
        "1.0.0 active",
    )
    return dev


def _serves(agent: AgentProc, version: str) -> bool:
    return str(agent.infer()["model"]) == f"digits-mlp@{version}"


# -- restarting on a disk that is full or read-only ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["read-only", "read-only after a cut install", "full"])
def test_an_agent_restarted_on_a_read_only_or_full_disk_serves_its_committed_model(
    disk: str,
    mounts: Mounts,
    tmp_path: Path,
    shared_cp: ControlPlaneProc,
    fixed_agents: list[FixedPortAgent],
) -> None:
    # The device rebooted and its data partition came back read-only (fsck found
    # errors) or full (a log filled it). It must serve the model it committed, not exit.
    cp = shared_cp
    data = mounts.tmpfs(tmp_path / "disk", "8m") / "agent"
    agent = _new_agent(cp, data, fixed_agents, tmp_path / "agent.log")
    dev = _serving_1_0_0(cp, agent)
    agent.kill()
    if disk == "read-only after a cut install":
        # Power lost while 1.1.0 was written: the next start finds a slot to clear
        # and cannot clear it.
        agent.start(env={"EDGEWISE_CRASH_AT": "mid_write"})
        cp.deploy("digits-next", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
        assert agent.wait_exit(120) == -9
    if disk.startswith("read-only"):
        mounts.read_only(tmp_path / "disk", "8m")
    else:
        # And with a cache to rebuild: capabilities are probed again, and not written.
        (data / "capabilities.json").unlink()
        fill(tmp_path / "disk")
    before = cp.device(dev)["reported_at"]
    agent.start()
    wait_for(lambda: _serves(agent, "1.0.0"), 60, "serving 1.0.0 after the restart")
    wait_for(lambda: cp.device(dev)["reported_at"] > before, 60, "a report after the restart")
    assert agent.proc is not None and agent.proc.poll() is None
    digits = agent.status()["pipelines"]["digits"]
    assert digits["serving"] == "digits-mlp@1.0.0"
    if disk != "read-only after a cut install":  # (that one wants 1.1.0, which cannot fit)
        # Still the committed model, not one to install again: booting wrote nothing.
        assert (digits["status"], digits["version"]) == ("active", "1.0.0")


# -- an install on a disk that fills up or turns read-only while the agent runs ---------


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_an_install_the_disk_cannot_take_fails_with_its_reason_and_waits(
    disk: str,
    mounts: Mounts,
    tmp_path: Path,
    shared_cp: ControlPlaneProc,
    fixed_agents: list[FixedPortAgent],
) -> None:
    cp = shared_cp
    if disk == "full":
        root = mounts.tmpfs(tmp_path / "disk", "8m")
    else:
        root = mounts.ext4(tmp_path / "disk")
    agent = _new_agent(cp, root / "agent", fixed_agents, tmp_path / "agent.log")
    dev = _serving_1_0_0(cp, agent)
    if disk == "full":
        fill(root)
        want = "insufficient disk"
    else:
        mounts.break_ext4(root)  # the flash failed: the kernel remounts it read-only
        want = "storage error: Read-only file system"
    cp.deploy("digits-next", "digits-mlp@1.1.0", priority=10, tag=agent.tag)

    def failed() -> dict[str, Any] | None:
        p = _pipeline(cp, dev)
        ok = p.get("status") == "failed" and p.get("version") == "1.1.0"
        return p if ok else None

    reported = wait_for(failed, 60, "the install reported failed")
    assert reported["reason"].startswith(want), reported["reason"]
    assert _serves(agent, "1.0.0")
    # It waits (RETRY_DISK_S) instead of trying again at every poll: a few polls later
    # the status still tells of the same failure, with no install started since.
    first = agent.status()["pipelines"]["digits"]
    polls = agent.status()["last_sync"]
    wait_for(lambda: agent.status()["last_sync"] > polls + 4, 30, "a few more polls")
    status = agent.status()
    now = status["pipelines"]["digits"]
    assert now["status"] == "failed" and now["reason"] == first["reason"]
    assert _serves(agent, "1.0.0")
    # A disk that says no is not the agent's own bug.
    assert not [e for e in status["errors"] if e.startswith("agent error")], status["errors"]


# -- the install steps, in process, on a real tiny disk ---------------------------------


@pytest.fixture
def host() -> Iterator[RuntimeHost]:
    h = RuntimeHost(monitor_interval_s=None)
    try:
        yield h
    finally:
        h.close()


class Rig:
    """An installer whose store and cache live on `root`, with a real state file there."""

    def __init__(self, root: Path, server: ArtifactServer, host: RuntimeHost, trust: Any) -> None:
        self.root = root
        self.http = httpx.Client(base_url=server.url)
        self.rec = PipelineRecord()
        self.state = StateFile(root / "state.json")
        self.on_persist: Callable[[PipelineRecord], None] = lambda rec: None
        self.trust = trust
        self.on_publishers: Callable[[], None] = lambda: None
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.installer = Installer(
            ModelStore(root / "models"),
            ArtifactCache(root / "cache"),
            HttpArtifactSource(self.http),
            host,
            self._publishers,
            CAPS,
            Backoff(base_s=0.0, max_tries=3, sleep=lambda s: None),
            self._persist,
            lambda cls, kind, data: self.events.append((kind, data)),
        )

    def _persist(self) -> None:
        self.on_persist(self.rec)
        self.state.save(AgentState(pipelines={"digits": self.rec}))

    def _publishers(self) -> Any:
        self.on_publishers()
        return self.trust

    def install(self, server: ArtifactServer, bundle: Path, version: str) -> None:
        action = _action(server, bundle, "digits-mlp", version)
        self.installer.install("digits", self.rec, action, action.fingerprint)

    @property
    def store(self) -> ModelStore:
        return self.installer.store

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def rig_factory(
    artifact_server: ArtifactServer, example_bundles: dict[str, Path], host: RuntimeHost
) -> Iterator[Callable[[Path], Rig]]:
    made: list[Rig] = []
    trust = [load_public_key(example_bundles["_pub"])]

    def make(root: Path) -> Rig:
        rig = Rig(root, artifact_server, host, trust)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.close()


@pytest.mark.parametrize("when", ["while writing", "between two attempts"])
def test_a_disk_filled_mid_download_fails_the_install_and_gives_the_partial_file_back(
    when: str,
    mounts: Mounts,
    tmp_path: Path,
    rig_factory: Callable[[Path], Rig],
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # Another writer fills the disk while a bundle downloads (here: at the first
    # progress tick): the next write fails, or the connection is cut there and the
    # resumed attempt finds no room. The partial file must not stay holding the space.
    root = mounts.tmpfs(tmp_path / "disk", "4m")
    rig = rig_factory(root)
    rig.install(artifact_server, example_bundles["digits-mlp@1.0.0"], "1.0.0")
    assert rig.rec.tracker.state is InstallState.ACTIVE
    fillers: list[Path] = []

    def fill_at_first_progress(rec: PipelineRecord) -> None:
        last = rec.tracker.timeline[-1]
        if last.state is InstallState.DOWNLOADING and (last.progress or 0) > 0:
            rig.on_persist = lambda rec: None
            fillers.append(fill(root))

    rig.on_persist = fill_at_first_progress
    if when == "while writing":  # 575 kB: the first tick comes with more to write
        bundle, version, why = example_bundles["ppocr-cls@1.0.0"], "9.0.0", "No space left"
    else:
        bundle, version, why = example_bundles["digits-mlp@2.0.0"], "2.0.0", "need"
        artifact_server.cut_after[f"/a/{hashlib.sha256(bundle.read_bytes()).hexdigest()}"] = 8000
    rig.install(artifact_server, bundle, version)
    assert rig.rec.tracker.state is InstallState.FAILED
    assert rig.rec.tracker.reason.startswith(f"insufficient disk: {why}"), rig.rec.tracker.reason
    assert not list((root / "cache").glob("*.part"))
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    assert rig.store.verify_slot("digits-mlp", "a")
    if when == "between two attempts":
        # Once there is room again, the retry (due after RETRY_DISK_S) installs it.
        fillers[0].unlink()
        rig.rec.retry_at = None
        rig.install(artifact_server, bundle, version)
        assert rig.rec.tracker.state is InstallState.ACTIVE, rig.rec.tracker.reason
        assert host.running() == {"digits": "digits-mlp@2.0.0"}


def test_a_read_only_cache_fails_the_install_as_storage_not_as_a_lost_uplink(
    mounts: Mounts,
    tmp_path: Path,
    rig_factory: Callable[[Path], Rig],
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # The device's own disk refusing a write is not the network being down: the install
    # fails with the reason (and waits), it is not left "downloading" forever.
    root = tmp_path / "dev"
    rig = rig_factory(root)
    mounts.tmpfs(root / "cache", "1m")
    mounts.read_only(root / "cache", "1m")
    rig.install(artifact_server, example_bundles["digits-mlp@1.0.0"], "1.0.0")
    assert rig.rec.tracker.state is InstallState.FAILED
    assert rig.rec.tracker.reason.startswith("storage error: Read-only file system")
    assert rig.rec.retry_at is not None
    assert rig.rec.retry_at - rig.installer.clock() == pytest.approx(RETRY_DISK_S, abs=5)
    assert host.running() == {}


@pytest.mark.parametrize("when", ["while extracting", "once extracted"])
def test_a_disk_that_fills_as_the_slot_is_written_gets_its_space_back_and_is_not_rewritten(
    when: str,
    mounts: Mounts,
    tmp_path: Path,
    rig_factory: Callable[[Path], Rig],
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # Another writer takes the disk as the inactive slot is written: all of it (the
    # extraction fails), or all but the slot (the slot's pointer file cannot be written).
    root = mounts.tmpfs(tmp_path / "disk", "4m")
    rig = rig_factory(root)
    rig.install(artifact_server, example_bundles["digits-mlp@1.0.0"], "1.0.0")
    assert rig.rec.tracker.state is InstallState.ACTIVE
    bundle = example_bundles["digits-mlp@1.1.0"]
    free = shutil.disk_usage(root).free
    extract(bundle, root / "probe", rig.trust)
    slot_bytes = free - shutil.disk_usage(root).free
    shutil.rmtree(root / "probe")
    calls: list[int] = []
    fillers: list[Path] = []

    def fill_when_extracting() -> None:
        # publishers() is read once to verify, once more to extract: fill at the second.
        calls.append(1)
        if len(calls) == 2:
            fillers.append(fill(root, leave=0 if when == "while extracting" else slot_bytes))

    rig.on_publishers = fill_when_extracting
    rig.install(artifact_server, bundle, "1.1.0")
    assert rig.rec.tracker.state is InstallState.FAILED
    assert rig.rec.tracker.reason.startswith("insufficient disk"), rig.rec.tracker.reason
    assert rig.rec.retry_at is not None
    assert rig.rec.retry_at - rig.installer.clock() == pytest.approx(RETRY_DISK_S, abs=5)
    assert not rig.store.slot_dir("digits-mlp", "b").exists()  # its space came back
    assert not list((root / "models" / "digits-mlp").glob(".b.*"))
    b = rig.store.slots("digits-mlp")["b"].state
    # With no byte free even the pointer cannot say `empty`; `recover` will at start.
    assert b == ("empty" if when == "once extracted" else "writing")
    assert rig.store.active_slot("digits-mlp") == "a" and rig.store.verify_slot("digits-mlp", "a")
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    if when == "once extracted":
        return
    # The retry, with room for the state but not for the slot, writes no slot: none is
    # claimed and nothing is extracted only to fail again.
    fillers[0].unlink()
    fill(root, leave=slot_bytes // 2)
    pointer = (root / "models" / "digits-mlp" / "slots.json").read_bytes()
    rig.rec.retry_at = None
    rig.on_publishers = lambda: None
    rig.install(artifact_server, bundle, "1.1.0")
    assert rig.rec.tracker.reason.startswith("insufficient disk: need"), rig.rec.tracker.reason
    assert (root / "models" / "digits-mlp" / "slots.json").read_bytes() == pointer
    assert host.running() == {"digits": "digits-mlp@1.0.0"}


def test_a_commit_the_disk_cannot_record_is_rolled_back_to_the_committed_model(
    mounts: Mounts,
    tmp_path: Path,
    rig_factory: Callable[[Path], Rig],
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # The disk fills between the switch and the commit point (state.json). A restart
    # would serve 1.0.0, so the device must serve 1.0.0 now, and say why.
    root = mounts.tmpfs(tmp_path / "disk", "4m")
    rig = rig_factory(root)
    rig.install(artifact_server, example_bundles["digits-mlp@1.0.0"], "1.0.0")
    committed = rig.rec.committed

    def fill_at_commit(rec: PipelineRecord) -> None:
        if rec.tracker.state is InstallState.ACTIVE:
            rig.on_persist = lambda rec: None
            fill(root)

    rig.on_persist = fill_at_commit
    rig.install(artifact_server, example_bundles["digits-mlp@1.1.0"], "1.1.0")
    assert rig.rec.tracker.state is InstallState.ROLLED_BACK
    assert rig.rec.tracker.reason.startswith("rolled back: the install could not be recorded")
    assert "insufficient disk" in rig.rec.tracker.reason
    assert rig.rec.committed == committed
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    assert rig.state.load().pipelines["digits"].committed == committed


def test_an_update_fits_in_the_space_of_the_inactive_slot_it_replaces(
    mounts: Mounts,
    tmp_path: Path,
    rig_factory: Callable[[Path], Rig],
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # Small flash holding both slots and little else: the next version goes where the
    # older inactive one was. Counting free space alone refused every update.
    root = mounts.tmpfs(tmp_path / "disk", "4m")
    rig = rig_factory(root)
    rig.install(artifact_server, example_bundles["digits-mlp@1.0.0"], "1.0.0")
    rig.install(artifact_server, example_bundles["digits-mlp@1.1.0"], "1.1.0")
    assert rig.store.active_slot("digits-mlp") == "b"
    bundle = example_bundles["digits-mlp@2.0.0"]
    size = bundle.stat().st_size
    # Room for the download and a little more, not for three times it (download plus
    # an extraction of twice its size), which is what the old check wanted.
    fill(root, leave=2 * size)
    assert shutil.disk_usage(root).free < 3 * size
    rig.install(artifact_server, bundle, "2.0.0")
    assert rig.rec.tracker.state is InstallState.ACTIVE, rig.rec.tracker.reason
    assert host.running() == {"digits": "digits-mlp@2.0.0"}
    assert rig.store.active_slot("digits-mlp") == "a"


# -- damage found between runs ----------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    (out / "precious").write_bytes(b"not the agent's")
    return out


def _store_with_a(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    slot = store.begin_write("m", "1", "1" * 64)
    (store.slot_dir("m", slot) / "model.onnx").write_bytes(b"one")
    store.finish_write("m", slot)
    store.commit("m", slot)
    return store


@pytest.mark.parametrize("damage", ["file", "symlink out", "dot-symlink out"])
def test_damage_where_a_slot_belongs_is_cleared_at_start_not_followed(
    damage: str, tmp_path: Path
) -> None:
    store = _store_with_a(tmp_path)
    out = _outside(tmp_path)
    where = store.slot_dir("m", "b")
    if damage == "file":
        where.write_bytes(b"junk")
    elif damage == "symlink out":
        where.symlink_to(out, target_is_directory=True)
    else:
        (where.parent / ".b.x1y2").symlink_to(out, target_is_directory=True)
    reopened = ModelStore(tmp_path / "models")
    reopened.recover()  # raised before: the agent exited at every start
    assert reopened.active_slot("m") == "a" and reopened.verify_slot("m", "a")
    assert not where.exists() and not where.is_symlink()
    assert not list(where.parent.glob(".b.*"))
    assert (out / "precious").read_bytes() == b"not the agent's"
    slot = reopened.begin_write("m", "2", "2" * 64)
    assert slot == "b" and reopened.slot_dir("m", "b").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["precious"]


def test_a_model_directory_that_is_a_symlink_out_is_dropped_not_written_through(
    tmp_path: Path,
) -> None:
    store = _store_with_a(tmp_path)
    out = _outside(tmp_path)
    shutil.copytree(tmp_path / "models" / "m", out / "m")
    shutil.rmtree(tmp_path / "models" / "m")
    (tmp_path / "models" / "m").symlink_to(out / "m", target_is_directory=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    reopened = ModelStore(tmp_path / "models")
    assert "m" in reopened.recover()
    slot = reopened.begin_write("m", "2", "2" * 64)
    (reopened.slot_dir("m", slot) / "model.onnx").write_bytes(b"two")
    reopened.finish_write("m", slot)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "models" / "m").is_symlink()
    assert store.verify_slot("m", slot)


@pytest.mark.parametrize(
    "damage", ["temp is a symlink out", "temp is a directory", "file is a directory"]
)
def test_a_state_file_commit_never_writes_through_damage(damage: str, tmp_path: Path) -> None:
    out = _outside(tmp_path)
    state = DurableJson(tmp_path / "state.json")
    state.commit({"revision": 1})
    tmp = tmp_path / ".state.json.tmp"
    if damage == "temp is a symlink out":
        tmp.symlink_to(out / "precious")
    elif damage == "temp is a directory":
        (tmp / "x").mkdir(parents=True)
    else:
        (tmp_path / "state.json").unlink()
        (tmp_path / "state.json" / "x").mkdir(parents=True)
    state.commit({"revision": 2})
    assert DurableJson(tmp_path / "state.json").load() == {"revision": 2}
    assert (out / "precious").read_bytes() == b"not the agent's"
    assert not tmp.exists() and not tmp.is_symlink()


def test_a_state_file_commit_on_a_full_disk_keeps_the_last_commit_and_gives_the_space_back(
    mounts: Mounts, tmp_path: Path
) -> None:
    root = mounts.tmpfs(tmp_path / "disk", "1m")
    state = StateFile(root / "state.json")
    first = AgentState(revision=1)
    state.save(first)
    fill(root, leave=8192)
    big = AgentState(revision=2, errors=["x" * 2000] * 20)  # about 40 kB
    with pytest.raises(OSError) as err:
        state.save(big)
    assert err.value.errno == errno.ENOSPC
    assert not (root / ".state.json.tmp").exists()  # its blocks came back
    assert StateFile(root / "state.json").load().revision == 1


def test_a_partial_download_that_is_a_symlink_out_is_not_appended_through(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data = os.urandom(50_000)
    sha = hashlib.sha256(data).hexdigest()
    artifact_server.blobs["/a"] = data
    out = _outside(tmp_path)
    cache = ArtifactCache(tmp_path / "cache")
    (tmp_path / "cache" / f"{sha}.part").symlink_to(out / "precious")
    with httpx.Client(base_url=artifact_server.url) as client:
        result = cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
    assert sha256_of(result.path) == sha
    assert (out / "precious").read_bytes() == b"not the agent's"
    assert artifact_server.ranges == [None]  # from zero, not from the link's length


# -- the telemetry buffer -----------------------------------------------------------------


def _filled_buffer(path: Path, n: int = 300) -> int:
    buf = TelemetryBuffer(path)
    for i in range(0, n, 100):
        buf.append([("event", "e", {"i": j, "pad": "x" * 200}, 0.0) for j in range(i, i + 100)])
    last = buf.last_seq()
    buf.close()
    return last


@pytest.mark.parametrize("damage", ["zeros", "truncated mid-record", "garbage"])
def test_a_damaged_buffer_file_is_set_aside_and_numbering_goes_on_above_it(
    damage: str, tmp_path: Path
) -> None:
    path = tmp_path / "telemetry.db"
    last = _filled_buffer(path)
    size = path.stat().st_size
    if damage == "zeros":
        path.write_bytes(b"\0" * size)
    elif damage == "truncated mid-record":
        os.truncate(path, size // 2 + 100)
    else:
        path.write_bytes(os.urandom(size))
    buf = TelemetryBuffer(path)  # raised before: the agent could not start at all
    try:
        assert buf.reset_reason.startswith("telemetry.db damaged")
        assert (tmp_path / "telemetry.db.damaged").exists()
        seq = buf.append([("event", "after", {}, 0.0)])[0].seq
        assert seq > last  # not taken by the control plane for an old record
        assert buf.depth() == 1
    finally:
        buf.close()


def test_damage_a_read_meets_later_resets_the_buffer_instead_of_failing_every_upload(
    tmp_path: Path,
) -> None:
    path = tmp_path / "telemetry.db"
    last = _filled_buffer(path, 1000)
    with path.open("r+b") as f:  # a page of records lost: the header still reads
        f.seek(4096 * 20)
        f.write(b"\0" * 4096)
    buf = TelemetryBuffer(path)
    try:
        assert buf.peek().records == []  # raised before, at every upload attempt
        assert buf.reset_reason.startswith("telemetry.db damaged")
        assert buf.append([("event", "after", {}, 0.0)])[0].seq > last
    finally:
        buf.close()


def test_a_buffer_file_that_is_a_symlink_out_is_not_written_through(tmp_path: Path) -> None:
    out = _outside(tmp_path)
    (tmp_path / "telemetry.db").symlink_to(out / "victim.db")
    buf = TelemetryBuffer(tmp_path / "telemetry.db")
    try:
        buf.append([("event", "e", {}, 0.0)])
    finally:
        buf.close()
    assert sorted(p.name for p in out.iterdir()) == ["precious"]
    assert not (tmp_path / "telemetry.db").is_symlink()


def test_a_buffer_on_a_read_only_disk_buffers_in_memory(mounts: Mounts, tmp_path: Path) -> None:
    root = mounts.tmpfs(tmp_path / "disk", "1m")
    last = _filled_buffer(root / "telemetry.db", 100)
    mounts.read_only(root, "1m")
    buf = TelemetryBuffer(root / "telemetry.db")  # raised before
    try:
        assert buf.volatile
        assert buf.append([("event", "e", {}, 0.0)])[0].seq > last
        assert buf.depth() == 1
    finally:
        buf.close()


def test_the_buffer_leaves_the_disk_floor_free_shedding_samples_before_events(
    mounts: Mounts, tmp_path: Path
) -> None:
    # A device offline for days with a budget larger than its disk: the buffer must not
    # fill the disk (state.json and installs need it), and events outlive samples.
    root = mounts.tmpfs(tmp_path / "disk", "4m")
    buf = TelemetryBuffer(root / "telemetry.db", budget_bytes=64 << 20, floor_bytes=1 << 20)
    lowest = shutil.disk_usage(root).free
    try:
        for i in range(300):
            buf.append([("sample", "s", {"pad": "x" * 400}, 0.0) for _ in range(20)])
            buf.append([("event", "e", {"i": i}, 0.0)])
            lowest = min(lowest, shutil.disk_usage(root).free)
        records = buf.peek(max_records=100_000, max_bytes=1 << 30).records
        events = [r.data["i"] for r in records if r.cls == "event"]
        dropped = buf.dropped()
    finally:
        buf.close()
    assert events == list(range(300))
    assert dropped["sample"] > 0 and dropped["event"] == 0
    assert lowest > (1 << 20) // 2


def _post_telemetry(app: Any, records: list[dict[str, Any]]) -> tuple[int, bytes]:
    """One `POST /telemetry` through the local API's handler, as its server runs it."""

    async def run() -> tuple[int, bytes]:
        answer = app("POST", "/telemetry", [], json.dumps({"records": records}).encode())
        await asyncio.wait([answer.fut])
        status, body, _ = answer.finish()  # (the server answers 500 if this raises)
        return status, body

    return asyncio.run(run())


def test_a_full_disk_drops_and_counts_new_records_and_keeps_what_is_stored(
    mounts: Mounts, tmp_path: Path
) -> None:

    root = mounts.tmpfs(tmp_path / "disk", "2m")
    buf = TelemetryBuffer(root / "telemetry.db", floor_bytes=0)
    app = make_local_app(dict, lambda records: len(buf.append(records)), lambda: None)
    try:
        buf.append([("event", "kept", {"i": i}, 0.0) for i in range(50)])
        filler = fill(root)
        refused = 0
        for i in range(400):
            try:
                buf.append([("event", "late", {"i": i, "pad": "x" * 300}, 0.0)])
            except BufferFull:
                refused += 1
        assert refused > 0  # it said so: an OperationalError about a rollback before
        stored = buf.peek(max_records=100_000, max_bytes=1 << 30).records
        assert [r.data["i"] for r in stored if r.kind == "kept"] == list(range(50))
        # An app posting to a full disk hears 507, not an internal error.
        status, body = _post_telemetry(app, [{"cls": "event", "kind": "app", "data": {}}])
        assert status == 507 and json.loads(body)["error"]["code"] == "insufficient_storage"
        refused += 1
        assert buf.dropped()["event"] == refused
        filler.unlink()
        buf.append([("event", "back", {}, 0.0)])
    finally:
        buf.close()
    reopened = TelemetryBuffer(root / "telemetry.db")
    try:
        assert reopened.dropped()["event"] == refused  # the count reached the disk
    finally:
        reopened.close()


# -- the whole agent: damage between runs, and enrollment on a full disk ---------------


@pytest.mark.slow
def test_an_agent_starts_and_updates_over_damage_left_between_runs(
    tmp_path: Path, shared_cp: ControlPlaneProc, agent_factory: Callable[..., AgentProc]
) -> None:
    cp = shared_cp
    agent = agent_factory(cp)
    dev = _serving_1_0_0(cp, agent)
    agent.kill()
    out = _outside(tmp_path)
    data = agent.data
    (data / ".state.json.tmp").mkdir()  # a directory where a temp file goes
    (data / "models" / "digits-mlp" / ".slots.json.tmp").symlink_to(out / "precious")
    (data / "models" / "digits-mlp" / "b").symlink_to(out, target_is_directory=True)
    db = data / "telemetry.db"
    for name in ("telemetry.db-wal", "telemetry.db-shm"):  # as after a clean stop
        (data / name).unlink(missing_ok=True)
    db.write_bytes(b"\0" * db.stat().st_size)
    # A download cut short, of a version no longer wanted: it must not hold its space.
    abandoned = data / "cache" / f"{'ab' * 32}.part"
    abandoned.write_bytes(b"x" * 100_000)
    agent.start()
    agent.wait_up()
    assert _serves(agent, "1.0.0")
    cp.deploy("digits-next", "digits-mlp@1.1.0", priority=10, tag=agent.tag)
    wait_for(
        lambda: (
            _pipeline(cp, dev).get("status") == "active"
            and _pipeline(cp, dev).get("version") == "1.1.0"
        ),
        90,
        "1.1.0 active",
    )
    assert _serves(agent, "1.1.0")
    assert not abandoned.exists()
    assert sorted(p.name for p in out.iterdir()) == ["precious"]
    assert (out / "precious").read_bytes() == b"not the agent's"


@pytest.mark.slow
def test_an_enrollment_the_disk_cannot_record_is_kept_and_written_once_there_is_room(
    mounts: Mounts,
    tmp_path: Path,
    shared_cp: ControlPlaneProc,
    fixed_agents: list[FixedPortAgent],
) -> None:
    # The token is spent once the control plane answers: exiting because identity.json
    # would not fit leaves a device that can never enroll again.
    cp = shared_cp
    proxy = TamperProxy(cp.url)
    try:
        proxy.down = True
        root = mounts.tmpfs(tmp_path / "disk", "4m")
        agent = _new_agent(cp, root / "agent", fixed_agents, tmp_path / "agent.log")
        agent.server = proxy.url
        agent.start()
        wait_for(lambda: (root / "agent" / "telemetry.db").exists(), 60, "the agent started")
        filler = fill(root)
        proxy.down = False

        def unsaved() -> dict[str, Any] | None:
            status = agent.status()
            errors = status["errors"]
            return (
                status if any(e.startswith("identity.json not written") for e in errors) else None
            )

        # Enrolled, running on the identity in memory, and saying it could not write it.
        status = wait_for(unsaved, 60, "the agent enrolled, reporting identity.json unwritten")
        assert agent.proc is not None and agent.proc.poll() is None
        dev = status["device_id"]
        wait_for(lambda: cp.device(dev)["reported_at"], 60, "reported")
        filler.unlink()
        wait_for(lambda: (root / "agent" / "identity.json").exists(), 60, "identity written")
        agent.kill()
        agent.token = None
        agent.start()
        wait_for(lambda: agent.status()["device_id"] == dev, 60, "the same device after restart")
    finally:
        proxy.close()


# -- the telemetry drain outlives its buffer's disk ---------------------------------------


def test_the_drain_keeps_running_when_its_buffer_cannot_be_written(
    mounts: Mounts, tmp_path: Path
) -> None:

    root = mounts.ext4(tmp_path / "disk")
    buf = TelemetryBuffer(root / "telemetry.db")
    buf.append([("event", "e", {"i": i}, 0.0) for i in range(10)])
    mounts.break_ext4(root)  # acks (deletes) now fail: the disk is read-only
    # An app posting now hears that storage is unavailable, not an internal error.
    app = make_local_app(dict, lambda records: len(buf.append(records)), lambda: None)
    status, body = _post_telemetry(app, [{"cls": "event", "kind": "app", "data": {}}])
    assert status == 503 and json.loads(body)["error"]["code"] == "storage_unavailable"
    sent: list[int] = []

    def send(batch: TelemetryBatch) -> TelemetryAck:  # the uplink answers "stored"
        sent.append(len(batch.records))
        return TelemetryAck(accepted=len(batch.records), duplicates=0, acked_seq=0)

    drain = TelemetryDrain(buf, send, TokenBucket(1e6, 1e6), Backoff(base_s=0.01, max_delay_s=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=drain.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: drain.last_error.startswith("buffer:"), 30, "an ack the disk refused")
        assert thread.is_alive() and buf.depth() == 0
    finally:
        stop.set()
        drain.wake.set()
        thread.join(10)
    # What the control plane stored is not uploaded again and again (it had been, every
    # backoff, for as long as the disk stayed read-only).
    assert drain.step(lambda _s: False) is False and sent == [10]
    buf.close()
    # After a restart the records go once more (the control plane keeps them once).
    again = TelemetryBuffer(root / "telemetry.db")
    assert [r.data["i"] for r in again.peek().records] == list(range(10))
    again.close()


# -- a first start on a disk that cannot take the device key ------------------------------


TOKEN = ("--enroll-token", "t")


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_a_first_start_the_disk_cannot_take_says_so_and_exits(
    disk: str, mounts: Mounts, tmp_path: Path
) -> None:
    # Before: a raw OSError traceback out of writing device.key (or making the directory).
    root = mounts.tmpfs(tmp_path / "disk", "1m")
    if disk == "full":
        fill(root)
        expect = "No space left on device (free space on that disk"
    else:
        mounts.read_only(root, "1m")
        expect = "Read-only file system (the disk is read-only"
    data = root / "agent"
    done = subprocess.run(
        [EDGEWISE, "agent", "--data", str(data), "--server", "http://127.0.0.1:9", *TOKEN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert expect in done.stderr and str(data) in done.stderr, done.stderr
