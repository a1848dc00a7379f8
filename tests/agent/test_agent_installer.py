"""The installer with real parts: a local artifact server, real files, the real runtime."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
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
from edgewise.agent._installer import Installer, InstallFailed
from edgewise.agent._plan import Action
from edgewise.agent._state import PipelineRecord
from edgewise.bundle import generate_keypair, load_public_key
from edgewise.protocol import DesiredModelRef

from .conftest import ArtifactServer

CAPS = {"runtimes": {"onnxruntime": "1"}, "memory_mb": 4096, "accelerators": []}


@pytest.fixture
def host() -> Iterator[RuntimeHost]:
    h = RuntimeHost(monitor_interval_s=None)
    try:
        yield h
    finally:
        h.close()


def _installer(
    tmp_path: Path, server: ArtifactServer, host: RuntimeHost, trust: Any, events: list[Any]
) -> tuple[Installer, httpx.Client]:
    http = httpx.Client(base_url=server.url)
    inst = Installer(
        ModelStore(tmp_path / "models"),
        ArtifactCache(tmp_path / "cache"),
        HttpArtifactSource(http),
        host,
        lambda: trust,
        CAPS,
        Backoff(base_s=0.0, max_tries=2, sleep=lambda s: None),
        lambda: None,
        lambda cls, kind, data: events.append((kind, data)),
    )
    return inst, http


def _action(server: ArtifactServer, bundle: Path, name: str, version: str) -> Action:
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.blobs[f"/a/{sha}"] = data
    ref = DesiredModelRef(name=name, version=version, sha256=sha, size=len(data), url=f"/a/{sha}")
    return Action("install", "digits", ref, {}, "d", fingerprint=sha)


def _resign(src: Path, out: Path, key: Path, pub: Path, edit: Any) -> Path:
    from edgewise.bundle import extract, pack, sign

    work = out.with_suffix("")
    extract(src, work, [load_public_key(pub)])
    manifest = json.loads((work / "manifest.json").read_text())
    edit(manifest)
    (work / "manifest.json").write_text(json.dumps(manifest))
    pack(work, out)
    sign(out, key)
    return out


def test_install_goes_through_every_state_and_serves(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    trust = [load_public_key(example_bundles["_pub"])]
    events: list[Any] = []
    inst, http = _installer(tmp_path, artifact_server, host, trust, events)
    rec = PipelineRecord()
    action = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    inst.install("digits", rec, action, action.fingerprint)
    http.close()
    states = [str(e.state) for e in rec.tracker.timeline]
    assert states == [
        "pending",
        "downloading",
        "verifying",
        "installing",
        "health_checking",
        "active",
    ]
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    assert rec.committed is not None and rec.committed["model"]["slot"] == "a"
    assert [k for k, _ in events] == ["install.started", "install.succeeded"]


def test_bundle_signed_by_an_untrusted_key_is_refused_as_signature_invalid(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    _, other_pub = generate_keypair("other", tmp_path / "keys")
    inst, http = _installer(tmp_path, artifact_server, host, [load_public_key(other_pub)], [])
    rec = PipelineRecord()
    action = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    inst.install("digits", rec, action, action.fingerprint)
    http.close()
    assert rec.tracker.state is InstallState.FAILED
    assert rec.tracker.reason.startswith("signature invalid")
    assert rec.refused == action.fingerprint and rec.retry_at is None
    assert host.running() == {}


def test_bundle_needing_an_absent_accelerator_is_refused_as_incompatible(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    pub = example_bundles["_pub"]
    bundle = _resign(
        example_bundles["digits-mlp@1.0.0"],
        tmp_path / "cuda.ewb",
        pub.with_suffix(".key"),
        pub,
        lambda m: m["requires"].update(accelerators=["cuda"]),
    )
    inst, http = _installer(tmp_path, artifact_server, host, [load_public_key(pub)], [])
    rec = PipelineRecord()
    action = _action(artifact_server, bundle, "digits-mlp", "1.0.0")
    inst.install("digits", rec, action, action.fingerprint)
    http.close()
    assert rec.tracker.state is InstallState.FAILED
    assert rec.tracker.reason == "incompatible: needs accelerator cuda"


def test_bundle_that_is_not_the_named_model_is_refused(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    inst, http = _installer(
        tmp_path, artifact_server, host, [load_public_key(example_bundles["_pub"])], []
    )
    rec = PipelineRecord()
    action = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "9.9.9")
    inst.install("digits", rec, action, action.fingerprint)
    http.close()
    assert rec.tracker.state is InstallState.FAILED
    assert "expected digits-mlp@9.9.9" in rec.tracker.reason


def test_a_spec_with_terms_this_agent_does_not_know_is_refused_before_download(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # A control plane newer than this agent deploys a field and a stage it was built
    # without: say which, fetch nothing, keep serving what runs, try again later (the
    # agent may have been upgraded by then).
    from edgewise.agent._installer import RETRY_VOCABULARY_S

    inst, http = _installer(
        tmp_path, artifact_server, host, [load_public_key(example_bundles["_pub"])], []
    )
    rec = PipelineRecord()
    first = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    inst.install("digits", rec, first, first.fingerprint)
    assert rec.tracker.state is InstallState.ACTIVE
    sent = artifact_server.bytes_sent
    newer = {"batching": {"max_batch": 8, "spill": "disk"}, "sinks": [{"type": "kafka"}]}
    action = _action(artifact_server, example_bundles["digits-mlp@1.1.0"], "digits-mlp", "1.1.0")
    action = Action("install", "digits", action.model, newer, "d", fingerprint=action.fingerprint)
    inst.install("digits", rec, action, action.fingerprint)
    http.close()
    assert rec.tracker.state is InstallState.FAILED
    assert rec.tracker.reason == (
        "incompatible: this agent does not know batching.spill, sink:kafka "
        "(the spec needs a newer agent)"
    )
    assert artifact_server.bytes_sent == sent  # nothing fetched for it
    assert rec.refused == action.fingerprint and rec.retry_at is not None
    assert rec.retry_at - inst.clock() == pytest.approx(RETRY_VOCABULARY_S, abs=5)
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    # The same spec as a change to the running pipeline: refused, the old one serves.
    with pytest.raises(InstallFailed, match=r"does not know batching\.spill"):
        inst.start_committed("digits", rec, {"name": "digits", **newer})
    assert host.running() == {"digits": "digits-mlp@1.0.0"}


def test_a_refused_spec_is_looked_at_again_quietly_and_installs_once_its_stage_exists(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    # Refused for a stage this agent lacks, the install is looked at again every few
    # minutes: an old agent must not send two events and a report each time to say the
    # same thing, and once a plugin registers the stage it installs.
    from edgewise.runtime._stages import PREPROCESS

    events: list[Any] = []
    inst, http = _installer(
        tmp_path, artifact_server, host, [load_public_key(example_bundles["_pub"])], events
    )
    rec = PipelineRecord()
    base = _action(artifact_server, example_bundles["digits-mlp@1.1.0"], "digits-mlp", "1.1.0")
    spec = {"preprocess": [{"type": "crop", "params": {"box": [0, 0, 1, 64]}}]}
    action = Action("install", "digits", base.model, spec, "d", fingerprint=base.fingerprint)
    inst.install("digits", rec, action, action.fingerprint)
    assert rec.tracker.reason.startswith("incompatible: this agent does not know preprocess:crop")
    told, timeline, first_retry = list(events), list(rec.tracker.timeline), rec.retry_at
    assert [kind for kind, _ in told] == ["install.started", "install.failed"]
    inst.install("digits", rec, action, action.fingerprint)  # the plan's retry, later
    assert events == told and rec.tracker.timeline == timeline
    assert rec.retry_at is not None and first_retry is not None and rec.retry_at >= first_retry
    PREPROCESS.register("crop")(lambda params: lambda x: x)  # a plugin's stage
    try:
        inst.install("digits", rec, action, action.fingerprint)
        assert rec.tracker.state is InstallState.ACTIVE, rec.tracker.reason
        assert host.running() == {"digits": "digits-mlp@1.1.0"}
    finally:
        host.stop("digits")
        PREPROCESS._factories.pop("crop")
        http.close()


def test_a_slow_download_is_installed_over_several_rounds_not_one_long_one(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    host: RuntimeHost,
) -> None:
    trust = [load_public_key(example_bundles["_pub"])]
    events: list[Any] = []
    inst, http = _installer(tmp_path, artifact_server, host, trust, events)
    inst.download_slice_s = 0.2
    artifact_server.drip_s = 0.02  # the bundle (about 11 KiB) a KiB at a time
    rec = PipelineRecord()
    action = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    rounds = 0
    while rec.tracker.state is not InstallState.ACTIVE:
        inst.install("digits", rec, action, action.fingerprint)
        rounds += 1
        if rec.tracker.state is not InstallState.ACTIVE:
            # Between rounds the install waits in `downloading`, part of the way there.
            assert rec.tracker.state is InstallState.DOWNLOADING and rec.refused == ""
        assert rounds < 500
    http.close()
    assert rounds >= 2 and host.running() == {"digits": "digits-mlp@1.0.0"}
    assert [k for k, _ in events] == ["install.started", "install.succeeded"]
