"""Hostile artifact servers, hostile bundles and damaged slots, against the real agent parts.

An attacker may control the bytes an artifact URL returns and the bundle file itself; a
device's flash may rot under a verified slot. The contract: a device trusts only keys in
its trust root, the running slot is never touched by an install, a power cut or damage
leaves a device that serves a verified model, and bad input gets a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent import (
    Agent,
    AgentConfig,
    ArtifactCache,
    Backoff,
    HttpArtifactSource,
    InstallState,
    RuntimeHost,
)
from edgewise.agent._client import DeviceClient, DeviceKey
from edgewise.agent._fetch import FetchError
from edgewise.agent._plan import Action
from edgewise.agent._state import PipelineRecord
from edgewise.bundle import key_id, load_public_key
from edgewise.protocol import DesiredPipeline, DesiredState, sign_desired

from .conftest import ArtifactServer
from .test_agent_installer import CAPS, _action, _installer

# -- a server that answers whatever the test scripts ----------------------------------

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class ScriptedServer:
    """Answers every GET with `respond(range header)`; records the ranges asked."""

    respond: Callable[[str | None], Answer] = lambda rng: (404, {}, b"")
    ranges: list[str | None] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    state = ScriptedServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            status, headers, body = state.respond(rng)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that refuses a response hangs up on it: expected here

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _blob(n: int) -> tuple[bytes, str]:
    data = os.urandom(n)
    return data, hashlib.sha256(data).hexdigest()


def _retrying() -> Backoff:
    return Backoff(base_s=0.0, max_tries=6, sleep=lambda s: None)


# -- artifact fetch ---------------------------------------------------------------------


def test_an_artifact_shorter_than_declared_fails_clearly_instead_of_retrying_for_ever(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    data, sha = _blob(100_000)
    # Truncated on the server: each try got 99990 bytes, each resume 416, for ever.
    scripted.respond = lambda rng: (416, {}, b"") if rng else (200, {}, data[:-10])
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=scripted.url) as client, pytest.raises(FetchError) as err:
        _retrying().call(lambda: cache.fetch(HttpArtifactSource(client), "/a", sha, len(data)))
    assert "99990 bytes" in err.value.reason and "100000" in err.value.reason
    assert scripted.ranges == [None]  # refused at once, not retried as a cut
    assert cache.partial_size(sha) == 0
    assert not cache.has(sha)


@pytest.mark.parametrize(
    "answer",
    [
        lambda start, data: (206, {"Content-Range": f"bytes {start}-99989/99990"}, data[start:-10]),
        lambda start, data: (416, {"Content-Range": "bytes */50000"}, b""),
    ],
    ids=["206-shorter-total", "416-shorter-total"],
)
def test_a_resume_the_server_says_is_past_its_shorter_artifact_fails_clearly(
    tmp_path: Path,
    scripted: ScriptedServer,
    answer: Callable[[int, bytes], Answer],
) -> None:
    data, sha = _blob(100_000)
    cache = ArtifactCache(tmp_path)
    (tmp_path / f"{sha}.part").write_bytes(data[:60_000])  # a download cut earlier
    scripted.respond = lambda rng: answer(60_000, data) if rng else (200, {}, data)
    with httpx.Client(base_url=scripted.url) as client, pytest.raises(FetchError) as err:
        _retrying().call(lambda: cache.fetch(HttpArtifactSource(client), "/a", sha, len(data)))
    assert err.value.reason.startswith("artifact too short")
    assert scripted.ranges == ["bytes=60000-"]
    assert cache.partial_size(sha) == 0


def test_a_resume_answered_with_another_range_starts_over_from_zero(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    data, sha = _blob(100_000)
    cache = ArtifactCache(tmp_path)
    (tmp_path / f"{sha}.part").write_bytes(data[:60_000])
    # A server (or proxy) that answers any Range with the whole file as a 206 "0-".
    whole = (206, {"Content-Range": f"bytes 0-99999/{len(data)}"}, data)
    scripted.respond = lambda rng: whole if rng else (200, {}, data)
    with httpx.Client(base_url=scripted.url) as client:
        result = _retrying().call(
            lambda: cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
        )
    assert result.path.read_bytes() == data
    assert scripted.ranges == ["bytes=60000-", None]  # one refused resume, then from zero


# -- hostile bundles reaching the installer ----------------------------------------------


def _corrupt_signature_entry(src: Path, out: Path) -> Path:
    """A copy whose deflated signature entry's compressed bytes are garbage."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        sig = next(i for i in zf.infolist() if i.filename.startswith("signatures/"))
    assert sig.compress_type == zipfile.ZIP_DEFLATED
    start = sig.header_offset + 30 + len(sig.filename) + len(sig.extra)
    data[start : start + sig.compress_size] = b"\xff" * sig.compress_size
    out.write_bytes(bytes(data))
    return out


def test_a_bundle_with_a_damaged_signature_entry_fails_the_install_with_a_reason(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
) -> None:
    bad = _corrupt_signature_entry(example_bundles["digits-mlp@1.0.0"], tmp_path / "bad.ewb")
    events: list[Any] = []
    host = RuntimeHost(monitor_interval_s=None)
    try:
        trust = [load_public_key(example_bundles["_pub"])]
        inst, http = _installer(tmp_path, artifact_server, host, trust, events)
        rec = PipelineRecord()
        action = _action(artifact_server, bad, "digits-mlp", "1.0.0")
        inst.install("digits", rec, action, action.fingerprint)  # raised zlib.error before
        http.close()
        assert host.running() == {}
    finally:
        host.close()
    assert rec.tracker.state is InstallState.FAILED
    assert rec.tracker.reason.startswith("bundle invalid: cannot read signatures/")
    assert not inst.cache.has(action.fingerprint)  # a refused bundle is fetched afresh
    assert ("install.failed", {"pipeline": "digits", "reason": rec.tracker.reason}) in events


# -- a verified slot damaged later --------------------------------------------------------


def _agent(data: Path) -> Agent:
    """An agent on `data` whose control plane is unreachable (nothing listens on port 9)."""
    host = RuntimeHost(monitor_interval_s=None)
    return Agent(AgentConfig(data_dir=data, server="http://127.0.0.1:9"), host=host)


def _use_artifacts(agent: Agent, server: ArtifactServer, pub: Path) -> httpx.Client:
    http = httpx.Client(base_url=server.url)
    trust = {key_id(load_public_key(pub)): load_public_key(pub)}
    agent.installer.source = HttpArtifactSource(http)
    agent.installer.publishers = lambda: trust
    agent.installer.capabilities = CAPS
    agent.installer.backoff = Backoff(base_s=0.0, max_tries=2, sleep=lambda s: None)
    return http


def _install(agent: Agent, action: Action) -> None:
    rec = agent.state.pipelines.setdefault("digits", PipelineRecord())
    agent.installer.install("digits", rec, action, action.fingerprint)
    assert rec.tracker.state is InstallState.ACTIVE, rec.tracker.reason


def _flip_a_bit_in_the_model(slot: Path) -> None:
    model = max((p for p in slot.rglob("*.onnx")), key=lambda p: p.stat().st_size)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10
    model.write_bytes(bytes(data))


def _events(agent: Agent) -> list[tuple[str, dict[str, Any]]]:
    return [(r.kind, r.data) for r in agent.buffer.peek(10_000).records]


def test_a_damaged_active_slot_falls_back_to_the_verified_previous_one_offline(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    data = tmp_path / "dev"
    first = _agent(data)
    http = _use_artifacts(first, artifact_server, example_bundles["_pub"])
    old = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    new = _action(artifact_server, example_bundles["digits-mlp@1.1.0"], "digits-mlp", "1.1.0")
    try:
        _install(first, old)
        _install(first, new)
    finally:
        first.close()
        http.close()
    models = data / "models" / "digits-mlp"
    _flip_a_bit_in_the_model(models / "b")  # the serving 1.1.0 rots on the flash
    for cached in (data / "cache").glob("*.ewb"):  # and nothing can be fetched again
        cached.unlink()

    second = _agent(data)
    try:
        second.boot()
        assert second.host.running() == {"digits": "digits-mlp@1.0.0"}
        rec = second.state.pipelines["digits"]
        assert rec.committed is not None and rec.committed["model"]["slot"] == "a"
        assert second.store.active_slot("digits-mlp") == "a"  # the next install writes b
        status = second.status()["pipelines"]["digits"]
        assert status["version"] == "1.0.0"
        assert "digits-mlp@1.1.0 (slot b) unusable" in status["reason"]
        assert "serving the previous digits-mlp@1.0.0 (slot a)" in status["reason"]
        assert any("serving the previous" in e for e in second.state.errors)
        fell = [d for k, d in _events(second) if k == "pipeline.fell_back"]
        assert fell == [
            {
                "pipeline": "digits",
                "from": "digits-mlp@1.1.0 (slot b)",
                "to": "digits-mlp@1.0.0 (slot a)",
                "reason": "committed slot digits-mlp/b failed verification",
            }
        ]
    finally:
        second.close()

    third = _agent(data)  # the fallback was recorded: the next start serves it directly
    http = _use_artifacts(third, artifact_server, example_bundles["_pub"])
    try:
        third.boot()
        assert third.host.running() == {"digits": "digits-mlp@1.0.0"}
        before = {p.name: p.read_bytes() for p in (models / "a").rglob("*") if p.is_file()}
        _install(third, new)  # back online: 1.1.0 again, into the damaged slot only
        assert third.host.running() == {"digits": "digits-mlp@1.1.0"}
        assert third.state.pipelines["digits"].committed["model"]["slot"] == "b"  # type: ignore[index]
        after = {p.name: p.read_bytes() for p in (models / "a").rglob("*") if p.is_file()}
        assert after == before
        assert third.store.verify_slot("digits-mlp", "a")
    finally:
        third.close()
        http.close()


def test_a_damaged_slot_with_no_verified_previous_one_serves_nothing_and_says_why(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    data = tmp_path / "dev"
    first = _agent(data)
    http = _use_artifacts(first, artifact_server, example_bundles["_pub"])
    old = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
    new = _action(artifact_server, example_bundles["digits-mlp@1.1.0"], "digits-mlp", "1.1.0")
    try:
        _install(first, old)
        _install(first, new)
    finally:
        first.close()
        http.close()
    models = data / "models" / "digits-mlp"
    _flip_a_bit_in_the_model(models / "b")
    _flip_a_bit_in_the_model(models / "a")  # the previous one rotted too: never served

    second = _agent(data)
    try:
        second.boot()
        assert second.host.running() == {}
        rec = second.state.pipelines["digits"]
        assert rec.committed is None  # the loop reinstalls what the desired state names
        assert rec.tracker.reason.startswith("committed model unusable")
        assert not [k for k, _ in _events(second) if k == "pipeline.fell_back"]
    finally:
        second.close()


# -- slots shared by models of the same name --------------------------------------------


def _with_fallback(primary: Action, fallback: Action) -> Action:
    assert primary.model is not None and fallback.model is not None
    ref = fallback.model
    spec = {"fallback": {"name": ref.name, "version": ref.version, "sha256": ref.sha256}}
    fingerprint = f"{primary.model.sha256}+{ref.sha256}+-"
    return Action("install", "digits", primary.model, spec, "d", ref, None, fingerprint)


def test_a_fallback_of_the_same_model_name_gets_its_own_slot_not_the_primarys(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    host = RuntimeHost(monitor_interval_s=None)
    try:
        trust = [load_public_key(example_bundles["_pub"])]
        inst, http = _installer(tmp_path, artifact_server, host, trust, [])
        new = _action(artifact_server, example_bundles["digits-mlp@1.1.0"], "digits-mlp", "1.1.0")
        old = _action(artifact_server, example_bundles["digits-mlp@1.0.0"], "digits-mlp", "1.0.0")
        action = _with_fallback(new, old)
        rec = PipelineRecord()
        inst.install("digits", rec, action, action.fingerprint)
        http.close()
        assert rec.tracker.state is InstallState.ACTIVE, rec.tracker.reason
        assert host.running() == {"digits": "digits-mlp@1.1.0"}
    finally:
        host.close()
    assert rec.committed is not None
    primary, fallback = rec.committed["model"], rec.committed["companions"]["fallback"]
    assert primary["slot"] != fallback["slot"]  # both were written into slot a before
    slots = inst.store.slots("digits-mlp")
    assert slots[primary["slot"]].sha256 == new.fingerprint
    assert slots[fallback["slot"]].sha256 == old.fingerprint
    assert inst.store.verify_slot("digits-mlp", primary["slot"])
    assert inst.store.verify_slot("digits-mlp", fallback["slot"])


def test_a_pipeline_rolls_its_primary_and_same_named_fallback_forward_without_touching_the_primary(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    host = RuntimeHost(monitor_interval_s=None)
    try:
        trust = [load_public_key(example_bundles["_pub"])]
        inst, http = _installer(tmp_path, artifact_server, host, trust, [])
        v1, v11, v2 = (
            _action(artifact_server, example_bundles[f"digits-mlp@{v}"], "digits-mlp", v)
            for v in ("1.0.0", "1.1.0", "2.0.0")
        )
        rec = PipelineRecord()
        first = _with_fallback(v11, v1)
        inst.install("digits", rec, first, first.fingerprint)
        assert rec.committed is not None
        serving = inst.store.slot_dir("digits-mlp", rec.committed["model"]["slot"])
        before = _files(serving)
        then = _with_fallback(v2, v11)  # the old primary becomes the fallback
        inst.install("digits", rec, then, then.fingerprint)
        http.close()
        assert rec.tracker.state is InstallState.ACTIVE, rec.tracker.reason
        assert host.running() == {"digits": "digits-mlp@2.0.0"}
    finally:
        host.close()
    assert _files(serving) == before  # 1.1.0 stayed where it served; 2.0.0 took 1.0.0's
    assert rec.committed["companions"]["fallback"]["slot"] == serving.name
    assert rec.committed["model"]["slot"] != serving.name
    assert inst.store.active_slot("digits-mlp") == rec.committed["model"]["slot"]


def _install_as(agent: Agent, pipeline: str, action: Action) -> PipelineRecord:
    rec = agent.state.pipelines.setdefault(pipeline, PipelineRecord())
    agent.installer.install(pipeline, rec, action, action.fingerprint)
    return rec


def _files(slot: Path) -> dict[str, bytes]:
    return {p.relative_to(slot).as_posix(): p.read_bytes() for p in slot.rglob("*") if p.is_file()}


def test_an_install_never_writes_the_slot_another_pipeline_serves_from(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    data = tmp_path / "dev"
    agent = _agent(data)
    http = _use_artifacts(agent, artifact_server, example_bundles["_pub"])
    v1, v11, v2 = (
        _action(artifact_server, example_bundles[f"digits-mlp@{v}"], "digits-mlp", v)
        for v in ("1.0.0", "1.1.0", "2.0.0")
    )
    slot_a = data / "models" / "digits-mlp" / "a"
    try:
        assert _install_as(agent, "digits", v1).tracker.state is InstallState.ACTIVE
        assert _install_as(agent, "canary", v11).tracker.state is InstallState.ACTIVE
        before = _files(slot_a)  # digits serves 1.0.0 from a, canary 1.1.0 from b
        canary = _install_as(agent, "canary", v2)
        assert canary.tracker.state is InstallState.FAILED
        assert canary.tracker.reason.startswith("no free slot for digits-mlp")
        assert canary.retry_at is not None  # tried again once a pipeline lets a slot go
        assert agent.host.running() == {
            "digits": "digits-mlp@1.0.0",
            "canary": "digits-mlp@1.1.0",
        }
        assert _files(slot_a) == before
    finally:
        agent.close()
        http.close()

    again = _agent(data)  # and a restart serves both as they were
    try:
        again.boot()
        assert again.host.running() == {
            "digits": "digits-mlp@1.0.0",
            "canary": "digits-mlp@1.1.0",
        }
    finally:
        again.close()


def test_a_committed_slot_rewritten_with_another_bundle_is_not_served_under_the_old_name(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    data = tmp_path / "dev"
    agent = _agent(data)
    http = _use_artifacts(agent, artifact_server, example_bundles["_pub"])
    agent.installer.serving = lambda pipeline: set()  # as an agent before this check did
    v1, v11, v2 = (
        _action(artifact_server, example_bundles[f"digits-mlp@{v}"], "digits-mlp", v)
        for v in ("1.0.0", "1.1.0", "2.0.0")
    )
    try:
        _install_as(agent, "digits", v1)
        _install_as(agent, "canary", v11)
        assert _install_as(agent, "canary", v2).tracker.state is InstallState.ACTIVE
        assert agent.store.slots("digits-mlp")["a"].version == "2.0.0"  # digits' slot
    finally:
        agent.close()
        http.close()

    again = _agent(data)
    try:
        again.boot()
        running = again.host.running()
        assert running.get("canary") == "digits-mlp@2.0.0"
        assert "digits" not in running  # it served 2.0.0 as digits-mlp@1.0.0 before
        reason = again.state.pipelines["digits"].tracker.reason
        assert "holds another bundle than digits-mlp@1.0.0" in reason
    finally:
        again.close()


@pytest.mark.parametrize(
    ("before", "after"),
    [('"version"', '"versiom"'), ('"ready"', '"readz"')],
    ids=["key", "state"],
)
def test_a_slot_pointer_file_rotted_into_other_valid_json_counts_as_torn(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    before: str,
    after: str,
) -> None:
    data = tmp_path / "dev"
    first = _agent(data)
    http = _use_artifacts(first, artifact_server, example_bundles["_pub"])
    try:
        for v in ("1.0.0", "1.1.0"):
            bundle = example_bundles[f"digits-mlp@{v}"]
            _install(first, _action(artifact_server, bundle, "digits-mlp", v))
    finally:
        first.close()
        http.close()
    pointer = data / "models" / "digits-mlp" / "slots.json"
    text = pointer.read_text()
    at = text.rindex(before)  # in slot b's record, the one serving
    pointer.write_text(text[:at] + after + text[at + len(before) :])  # a flipped bit: JSON still

    again = _agent(data)
    try:
        again.boot()  # raised TypeError (every start) or served nothing before
        assert again.host.running() == {"digits": "digits-mlp@1.1.0"}
        assert again.store.active_slot("digits-mlp") == "b"
    finally:
        again.close()


# -- an ONNX model reading data from outside its slot -------------------------------------


def _onnx_with_external_data(location: str) -> tuple[bytes, bytes]:
    """A MatMul model whose weights live in an external file named `location`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tensor = model.graph.initializer[0]
    raw = tensor.raw_data
    onnx.external_data_helper.set_external_data(tensor, location=location, length=len(raw))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return model.SerializeToString(), raw


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_signed_model_whose_external_data_points_outside_its_slot_is_refused(
    tmp_path: Path,
    artifact_server: ArtifactServer,
    example_bundles: dict[str, Path],
    where: str,
) -> None:
    from edgewise.bundle import pack_files, sign

    # Beside the slot directory (models/ext/a/model.onnx), in no bundle: the weights a
    # permissive runtime would read.
    outside = tmp_path / "models" / "ext" / "weights.bin"
    location = "../weights.bin" if where == "parent" else str(outside)
    model, raw = _onnx_with_external_data(location)
    outside.parent.mkdir(parents=True)
    outside.write_bytes(raw)
    manifest = {
        "name": "ext",
        "version": "1.0.0",
        "format": "onnx",
        "model": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
        "requires": {"runtime": "onnxruntime"},
    }
    bundle = tmp_path / "ext.ewb"
    pack_files(manifest, {"model.onnx": model}, bundle)  # a publisher signed it
    sign(bundle, example_bundles["_pub"].with_suffix(".key"))
    host = RuntimeHost(monitor_interval_s=None)
    try:
        trust = [load_public_key(example_bundles["_pub"])]
        inst, http = _installer(tmp_path, artifact_server, host, trust, [])
        rec = PipelineRecord()
        action = _action(artifact_server, bundle, "ext", "1.0.0")
        inst.install("digits", rec, action, action.fingerprint)
        http.close()
        assert host.running() == {}
    finally:
        host.close()
    assert rec.tracker.state is InstallState.FAILED
    assert rec.tracker.reason.startswith("incompatible: model does not load")
    assert "external data" in rec.tracker.reason.lower()
    assert rec.committed is None


def _as_planned(action: Action) -> Action:
    """The action with the fingerprint `plan` gives a pipeline of one model."""
    assert action.model is not None
    return dataclasses.replace(action, fingerprint=f"{action.model.sha256}+-+-")


def _accept(agent: Agent, want: Action) -> None:
    """Make `want` the accepted desired state (as `accept` keeps one it verified)."""
    assert want.model is not None
    doc = DesiredState(
        device_id="dev",
        revision=1,
        issued_at=0.0,
        expires_at=4e9,
        pipelines={"digits": DesiredPipeline(deployment="d", model=want.model)},
    )
    signed = sign_desired(doc, Ed25519PrivateKey.generate())
    agent.state.desired = {
        "document": signed.signed_document(),
        "key_id": signed.key_id,
        "signature": signed.signature,
    }


def test_a_committed_pipeline_started_on_a_damaged_slot_falls_back_too(
    tmp_path: Path, artifact_server: ArtifactServer, example_bundles: dict[str, Path]
) -> None:
    data = tmp_path / "dev"
    agent = _agent(data)
    http = _use_artifacts(agent, artifact_server, example_bundles["_pub"])
    old, new = (
        _as_planned(_action(artifact_server, example_bundles[f"digits-mlp@{v}"], "digits-mlp", v))
        for v in ("1.0.0", "1.1.0")
    )
    try:
        _install(agent, old)
        _install(agent, new)
        _accept(agent, new)
        agent.host.stop("digits")  # not serving (as after its runtime lost it)
        _flip_a_bit_in_the_model(data / "models" / "digits-mlp" / "b")
        agent.reconcile()  # plans "start" for the committed 1.1.0
        assert agent.host.running() == {"digits": "digits-mlp@1.0.0"}
        rec = agent.state.pipelines["digits"]
        assert "serving the previous digits-mlp@1.0.0 (slot a)" in rec.tracker.reason
        assert [k for k, _ in _events(agent) if k == "pipeline.fell_back"] == ["pipeline.fell_back"]
        agent.reconcile()  # and the next round installs 1.1.0 again, into slot b
        assert agent.host.running() == {"digits": "digits-mlp@1.1.0"}
        assert agent.state.pipelines["digits"].committed["model"]["slot"] == "b"  # type: ignore[index]
        assert agent.store.verify_slot("digits-mlp", "a")
    finally:
        agent.close()
        http.close()


def test_a_redirect_is_not_followed_so_no_signed_request_reaches_another_host(
    tmp_path: Path, scripted: ScriptedServer, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(10_000)
    artifact_server.blobs["/elsewhere"] = data  # the bytes are right: the host is not
    scripted.respond = lambda rng: (302, {"Location": f"{artifact_server.url}/elsewhere"}, b"")
    cache = ArtifactCache(tmp_path)
    key = DeviceKey("dev-1", Ed25519PrivateKey.generate())
    with httpx.Client(base_url=scripted.url) as http, pytest.raises(FetchError) as err:
        cache.fetch(DeviceClient(http, key), "/device/v1/artifacts/x", sha, len(data))
    assert err.value.reason == "artifact download refused: HTTP 302"
    assert artifact_server.ranges == []  # never asked, signed headers and all
    assert not cache.has(sha)
