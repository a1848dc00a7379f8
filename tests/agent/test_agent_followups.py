"""The agent against a control plane that answers too much, and its trust walk done once.

Real loopback HTTP servers answer as a broken or hostile control plane would; the agent
runs in this process on real files.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent import Agent, AgentConfig
from edgewise.agent import _agent as agent_module
from edgewise.agent import _trust as trust_module
from edgewise.agent._client import (
    MAX_DESIRED_BYTES,
    DeviceClient,
    DeviceKey,
    ResponseTooLarge,
)
from edgewise.agent._host import RuntimeHost
from edgewise.agent._identity import Identity, load_or_create_key, save_identity
from edgewise.agent._trust import TrustKeeper
from edgewise.bundle import key_id, public_key_to_b64
from edgewise.protocol import (
    MAX_CHAIN_BYTES,
    MAX_VERSION,
    DesiredState,
    SignedDesiredState,
    TrustRoot,
    advance_trust_root,
    sign_desired,
    sign_trust_root,
    trust_root_document,
)

ROOT, CONTROL, OTHER = (Ed25519PrivateKey.generate() for _ in range(3))
PIECE = 64 * 1024


def _b64(key: Ed25519PrivateKey) -> dict[str, str]:
    return {key_id(key.public_key()): public_key_to_b64(key.public_key())}


def _root(version: int, control_plane: Sequence[Ed25519PrivateKey] = ()) -> dict[str, Any]:
    doc = trust_root_document(
        version,
        [ROOT.public_key()],
        1,
        [CONTROL.public_key()],
        0.0,
        control_plane=[k.public_key() for k in control_plane],
    )
    return sign_trust_root(doc, [ROOT])


@dataclass
class Flood:
    """A loopback server answering every GET 200 with `size` bytes, sent until refused.

    `declare`: send a Content-Length (else the body ends when the connection closes).
    `sent` counts what the socket took before the client hung up; `done` is set then.
    """

    size: int
    declare: bool = False
    prefix: bytes = b'{"chain": ["'
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    url: str = ""


@pytest.fixture
def flood() -> Iterator[Flood]:
    state = Flood(size=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if state.declare:
                    self.send_header("Content-Length", str(state.size))
                self.end_headers()
                self.wfile.write(state.prefix)
                state.sent = len(state.prefix)
                while state.sent < state.size:
                    self.wfile.write(b"x" * PIECE)
                    state.sent += PIECE
            except OSError:
                pass  # the client hung up: what it meant to do
            finally:
                state.done.set()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _client(url: str) -> tuple[httpx.Client, DeviceClient]:
    http = httpx.Client(base_url=url)
    return http, DeviceClient(http, DeviceKey("dev-1", Ed25519PrivateKey.generate()))


# -- size caps on what the agent reads into memory ---------------------------------------


def test_a_desired_answer_past_its_cap_is_malformed_and_not_read_to_its_end(
    flood: Flood,
) -> None:
    # Before: the whole answer was read into memory, then parsed: a control plane (or
    # whoever answers in its place) sending without end ran the device out of memory.
    flood.size = 8 * MAX_DESIRED_BYTES
    http, client = _client(flood.url)
    with http:
        poll = client.desired()
    assert poll.signed is None
    assert poll.malformed == f"the desired document is larger than {MAX_DESIRED_BYTES} bytes"
    assert flood.done.wait(60)
    assert flood.sent < flood.size  # the client hung up long before the end


def test_a_desired_answer_declared_past_its_cap_is_refused_before_its_body(
    flood: Flood,
) -> None:
    flood.size, flood.declare = MAX_DESIRED_BYTES + 1, True
    http, client = _client(flood.url)
    with http:
        poll = client.desired()
    assert poll.signed is None and "larger than" in poll.malformed


def test_a_trust_root_chain_past_its_cap_is_refused_with_its_reason(flood: Flood) -> None:
    # Before: GET /device/v1/trust-root was read whole, however long.
    flood.size = 4 * MAX_CHAIN_BYTES
    http, client = _client(flood.url)
    with http, pytest.raises(ResponseTooLarge) as caught:
        client.trust_roots()
    assert caught.value.code == "too_large"
    assert f"the trust root chain is larger than {MAX_CHAIN_BYTES} bytes" in str(caught.value)
    assert flood.done.wait(60)
    assert flood.sent < flood.size


def _enrolled_agent(data: Path, url: str) -> Agent:
    load_or_create_key(data)
    save_identity(data, Identity("dev-1", url, _b64(CONTROL), _b64(CONTROL)))
    agent = Agent(AgentConfig(data_dir=data, server=url), host=RuntimeHost(monitor_interval_s=None))
    assert agent.identity is not None
    agent.client.key = DeviceKey(agent.identity.device_id, agent.key)
    return agent


def _signed_by(
    key: Ed25519PrivateKey, revision: int, trust_roots: Sequence[dict[str, Any]] = ()
) -> SignedDesiredState:
    now = time.time()
    doc = DesiredState(
        device_id="dev-1",
        revision=revision,
        issued_at=now,
        expires_at=now + 600,
        trust_roots=list(trust_roots),
    )
    return SignedDesiredState.model_validate(json.loads(sign_desired(doc, key).model_dump_json()))


def test_the_agent_reports_a_trust_root_chain_past_its_cap(tmp_path: Path, flood: Flood) -> None:
    # A document from a signer the device does not know makes it fetch the chain: an
    # answer past the cap is an event saying so, and the device holds what it held.
    flood.size = 4 * MAX_CHAIN_BYTES
    agent = _enrolled_agent(tmp_path, flood.url)
    assert agent.trust.advance([_root(1)], agent.identity) is not None  # type: ignore[arg-type]

    assert agent.accept(_signed_by(OTHER, 5), None) is False
    events = [(r.kind, r.data) for r in agent.buffer.peek(10_000).records]
    unavailable = [d for k, d in events if k == "trust.unavailable"]
    assert unavailable and "larger than" in unavailable[-1]["error"], events
    assert agent.trust.version == 1
    assert agent.state.errors[-1] == "desired state refused: unknown signer"


# -- the carried trust root walked once --------------------------------------------------


def test_the_carried_trust_root_is_walked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: `_follow_trust` walked the carried version to see whether the device was
    # behind, and `TrustKeeper.advance` walked it again to take it: every document
    # checked every signature of the newest trust root twice.
    agent = _enrolled_agent(tmp_path, "http://127.0.0.1:9")
    assert agent.trust.advance([_root(1)], agent.identity) is not None  # type: ignore[arg-type]
    walks: list[int] = []
    real = advance_trust_root

    def counted(chain: Any, current: TrustRoot | None) -> tuple[TrustRoot | None, str]:
        if current is not None:  # a walk from the version held (not a file's own check)
            walks.append(current.version)
        return real(chain, current)

    monkeypatch.setattr(trust_module, "advance_trust_root", counted)
    monkeypatch.setattr(agent_module, "advance_trust_root", counted, raising=False)

    v2 = _root(2, control_plane=[CONTROL])
    assert agent.accept(_signed_by(CONTROL, 5, [v2]), None) is True
    assert agent.trust.version == 2 and not agent.state.errors
    assert walks == [1]
    assert agent.accept(_signed_by(CONTROL, 6, [v2]), None) is True  # carried again
    assert walks == [1, 2]


def test_a_device_behind_still_fetches_the_chain_and_walks_it(tmp_path: Path, flood: Flood) -> None:
    # What the probe was for is kept: v3 signed by a root v1 does not know (rotated at
    # v2) is not taken from the document alone; the chain fetched makes the walk.
    root2 = Ed25519PrivateKey.generate()
    pubs = [CONTROL.public_key()]
    v2 = sign_trust_root(trust_root_document(2, [root2.public_key()], 1, pubs, 0.0), [ROOT, root2])
    v3 = sign_trust_root(trust_root_document(3, [root2.public_key()], 1, pubs, 0.0), [root2])
    body = json.dumps({"chain": [_root(1), v2, v3]}).encode()
    flood.prefix, flood.size = body, len(body)  # an answer of exactly this chain
    agent = _enrolled_agent(tmp_path, flood.url)
    assert agent.trust.advance([_root(1)], agent.identity) is not None  # type: ignore[arg-type]

    assert agent.accept(_signed_by(CONTROL, 5, [v3]), None) is True
    assert agent.trust.version == 3 and not agent.state.errors


# -- the version space ---------------------------------------------------------------------


def test_the_agent_refuses_a_version_that_would_freeze_its_chain(tmp_path: Path) -> None:
    # Before: a v1 device took v(2**53 - 1) signed by its root key; no version could
    # follow it, so the fleet's keys could never change again without re-enrolling.
    identity = Identity("dev-1", "http://127.0.0.1:9", _b64(CONTROL), _b64(CONTROL))
    keeper = TrustKeeper(tmp_path)
    keeper.advance([_root(1)], identity)
    change = keeper.advance([_root(1), _root(MAX_VERSION)], identity)
    assert change is not None and change.version == 1
    assert "would use up the version space" in change.problem
    assert TrustKeeper(tmp_path).version == 1


def test_a_version_reached_step_by_step_past_the_first_version_cap_reloads(
    tmp_path: Path,
) -> None:
    # trust.json is checked by itself when read back: a high version this device walked
    # to is not refused as a first version would be.
    identity = Identity("dev-1", "http://127.0.0.1:9", _b64(CONTROL), _b64(CONTROL))
    high = 2**32 + 5
    keeper = TrustKeeper(tmp_path)
    keeper.advance([_root(high - 1)], identity)  # a chain trimmed to its newest versions
    keeper.advance([_root(high)], identity)
    assert keeper.version == high
    assert TrustKeeper(tmp_path).version == high
