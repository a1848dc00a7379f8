"""The device's signed trust root under attack: a network in the middle, a crash between writes.

An agent in this process, on real files, talking HTTP to a real server on loopback that
answers as whoever sits between a device and its control plane would.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent import Agent, AgentConfig
from edgewise.agent import _trust as trust_module
from edgewise.agent._client import DeviceKey
from edgewise.agent._host import RuntimeHost
from edgewise.agent._identity import Identity, load_identity, load_or_create_key, save_identity
from edgewise.agent._trust import TRUST_FILE, TrustKeeper
from edgewise.bundle import key_id, public_key_to_b64
from edgewise.protocol import (
    DesiredState,
    SignedDesiredState,
    sign_desired,
    sign_trust_root,
    trust_root_document,
)

ROOT, CONTROL, ATTACKER = (Ed25519PrivateKey.generate() for _ in range(3))


def _b64(key: Ed25519PrivateKey) -> dict[str, str]:
    return {key_id(key.public_key()): public_key_to_b64(key.public_key())}


def _root(
    version: int,
    publishers: list[Ed25519PrivateKey],
    signer: Ed25519PrivateKey = ROOT,
    control_plane: list[Ed25519PrivateKey] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    doc = trust_root_document(
        version,
        [signer.public_key()],
        1,
        [k.public_key() for k in publishers],
        0.0,
        control_plane=[k.public_key() for k in control_plane],
    )
    return sign_trust_root(doc, [signer])


class Middle:
    """A loopback HTTP server answering GET /device/v1/trust-root with `chain`."""

    def __init__(self) -> None:
        self.chain: list[Any] = []
        self.fetches = 0
        middle = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                middle.fetches += 1
                body = json.dumps({"chain": middle.chain}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def middle() -> Iterator[Middle]:
    m = Middle()
    yield m
    m.close()


def _agent(data: Path, url: str) -> Agent:
    agent = Agent(AgentConfig(data_dir=data, server=url), host=RuntimeHost(monitor_interval_s=None))
    assert agent.identity is not None
    agent.client.key = DeviceKey(agent.identity.device_id, agent.key)
    return agent


def _enrolled(data: Path, url: str, publishers: dict[str, str]) -> None:
    load_or_create_key(data)
    save_identity(data, Identity("dev-1", url, dict(publishers), _b64(CONTROL)))


def _signed_by(key: Ed25519PrivateKey, revision: int) -> SignedDesiredState:
    now = time.time()
    doc = DesiredState(device_id="dev-1", revision=revision, issued_at=now, expires_at=now + 600)
    return SignedDesiredState.model_validate(json.loads(sign_desired(doc, key).model_dump_json()))


def test_a_device_without_a_trust_root_takes_no_signer_from_an_unsigned_answer(
    tmp_path: Path, middle: Middle
) -> None:
    # Before: a device holding no trust root (every device of a fleet that never pushed
    # one) that got a document from an unknown signer fetched GET /device/v1/trust-root
    # and took its first version on its word; that answer is signed by no one, so
    # whoever sat on the network path named its own key as control plane and publisher,
    # and the device accepted the attacker's desired document and would install
    # whatever the attacker signed.
    _enrolled(tmp_path, middle.url, _b64(CONTROL))
    agent = _agent(tmp_path, middle.url)
    middle.chain = [_root(1, [ATTACKER], signer=ATTACKER, control_plane=[ATTACKER])]

    assert agent.accept(_signed_by(ATTACKER, 5), None) is False
    assert agent.state.errors[-1] == "desired state refused: unknown signer"
    assert agent.trust.version == 0 and not (tmp_path / TRUST_FILE).exists()
    assert set(agent.identity.control_plane) == set(_b64(CONTROL))  # type: ignore[union-attr]
    assert set(agent.identity.publishers) == set(_b64(CONTROL))  # type: ignore[union-attr]


def test_a_device_holding_a_trust_root_recovers_only_a_signer_it_names(
    tmp_path: Path, middle: Middle
) -> None:
    # The recovery the fetch is for still works where it is safe: checked against the
    # root key held, a chain naming the new control-plane key is taken; one the
    # network forged is not.
    _enrolled(tmp_path, middle.url, _b64(CONTROL))
    agent = _agent(tmp_path, middle.url)
    v1 = _root(1, [CONTROL])
    assert agent.trust.advance([v1], agent.identity) is not None  # type: ignore[arg-type]
    middle.chain = [v1, _root(2, [ATTACKER], signer=ATTACKER, control_plane=[ATTACKER])]
    assert agent.accept(_signed_by(ATTACKER, 5), None) is False
    assert agent.trust.version == 1 and middle.fetches == 1

    replaced = Ed25519PrivateKey.generate()
    middle.chain = [v1, _root(2, [CONTROL], control_plane=[replaced])]
    agent._trust_fetch_after = 0.0  # the minute between fetches has passed
    assert agent.accept(_signed_by(replaced, 6), None) is True
    assert agent.trust.version == 2 and middle.fetches == 2


def test_a_stop_between_the_two_writes_never_leaves_a_revoked_publisher_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: trust.json was written first, then identity.json; an agent stopped in
    # between (or a disk that took one and refused the other) came back holding v2 with
    # v1's publishers in identity.json, and since v2 was "already held", the chain
    # delivered again changed nothing: the publisher v2 revoked stayed trusted for good.
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    identity = Identity("dev-1", "http://127.0.0.1:9", _b64(old) | _b64(new), _b64(CONTROL))
    save_identity(tmp_path, identity)
    keeper = TrustKeeper(tmp_path)
    v1, v2 = _root(1, [old, new]), _root(2, [new])
    keeper.advance([v1], identity)

    # A disk that takes one write and refuses the other (full when identity.json is
    # written): what a stop between the two writes leaves behind.
    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trust_module, "save_identity", full)
    change = keeper.advance([v1, v2], identity)
    assert change is not None and "No space left" in change.problem
    monkeypatch.undo()

    restarted, stored = TrustKeeper(tmp_path), load_identity(tmp_path)
    assert stored is not None
    restarted.advance([v1, v2], stored)  # the next document carries the chain again
    assert restarted.version == 2
    assert set(stored.publishers) == set(_b64(new))
    assert set(load_identity(tmp_path).publishers) == set(_b64(new))  # type: ignore[union-attr]


def test_identity_behind_the_held_version_is_brought_up_to_it(tmp_path: Path) -> None:
    # A data directory left by the older build (trust.json at v2, identity.json still
    # with v1's publishers): the keys in force become v2's with the next chain.
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    identity = Identity("dev-1", "http://127.0.0.1:9", _b64(old) | _b64(new), _b64(CONTROL))
    keeper = TrustKeeper(tmp_path)
    v1, v2 = _root(1, [old, new]), _root(2, [new], control_plane=[CONTROL])
    keeper.advance([v1, v2], identity)
    stale = Identity("dev-1", "http://127.0.0.1:9", _b64(old) | _b64(new), {})
    save_identity(tmp_path, stale)

    change = TrustKeeper(tmp_path).advance([v1, v2], stale)
    assert change is not None and change.removed == (key_id(old.public_key()),)
    assert (change.version, change.previous, change.problem) == (2, 2, "")
    on_disk = load_identity(tmp_path)
    assert on_disk is not None and on_disk.publishers == _b64(new)
    assert on_disk.control_plane == _b64(CONTROL)


def test_a_trust_file_that_does_not_verify_falls_back_to_the_version_before(
    tmp_path: Path,
) -> None:
    # Before: a trust.json that did not verify (a flipped bit, an edit) was read as no
    # trust root at all although its previous commit was beside it: the device then took
    # the next chain's first version on the control plane's word, so a control plane
    # broken into could hand it a root and publishers of its own.
    other = Ed25519PrivateKey.generate()
    identity = Identity("dev-1", "http://127.0.0.1:9", {}, _b64(CONTROL))
    keeper = TrustKeeper(tmp_path)
    v1, v2 = _root(1, [CONTROL]), _root(2, [CONTROL, other])
    keeper.advance([v1], identity)
    keeper.advance([v1, v2], identity)  # trust.json holds v2, its previous commit v1
    raw = json.loads((tmp_path / TRUST_FILE).read_text())
    raw["doc"]["document"]["publishers"] = _b64(ATTACKER)  # edited on the device's disk
    (tmp_path / TRUST_FILE).write_text(json.dumps(raw))

    held = TrustKeeper(tmp_path)
    assert held.version == 1
    forged = _root(1, [ATTACKER], signer=ATTACKER)
    change = held.advance([forged], identity)
    assert change is not None and "other content" in change.problem
    assert identity.publishers == _b64(CONTROL)  # v1's, the version held
    change = held.advance([v1, v2], identity)
    assert change is not None and (change.version, change.problem) == (2, "")


def test_a_control_plane_key_revoked_on_the_way_stays_revoked(tmp_path: Path) -> None:
    # v2 lists the new control-plane key alone (the old one was stolen); v3 leaves the
    # set out (devices keep the one in force). Before: a device that was off through v2
    # and walked v1 -> v3 at once applied v3's (absent) set only, and kept trusting the
    # stolen key's desired documents for good.
    stolen = Ed25519PrivateKey.generate()
    identity = Identity("dev-1", "http://127.0.0.1:9", {}, _b64(stolen))
    keeper = TrustKeeper(tmp_path)
    v1 = _root(1, [CONTROL], control_plane=[stolen, CONTROL])
    v2, v3 = _root(2, [CONTROL], control_plane=[CONTROL]), _root(3, [CONTROL])
    keeper.advance([v1], identity)
    assert identity.control_plane == _b64(stolen) | _b64(CONTROL)

    change = keeper.advance([v3, v1, v2], identity)
    assert change is not None and (change.version, change.problem) == (3, "")
    assert identity.control_plane == _b64(CONTROL)
    assert load_identity(tmp_path).control_plane == _b64(CONTROL)  # type: ignore[union-attr]


def test_a_trust_root_the_disk_refused_is_written_with_the_next_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: after a failed write the new version was held in memory only, and the
    # next chain (the same one) changed nothing, so nothing wrote it until a restart;
    # a power cut meanwhile brought the device back on the old version.
    new = Ed25519PrivateKey.generate()
    identity = Identity("dev-1", "http://127.0.0.1:9", _b64(CONTROL), _b64(CONTROL))
    keeper = TrustKeeper(tmp_path)
    v1, v2 = _root(1, [CONTROL]), _root(2, [new])
    keeper.advance([v1], identity)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trust_module, "save_identity", full)
    change = keeper.advance([v1, v2], identity)
    assert change is not None and change.version == 2 and "No space left" in change.problem
    monkeypatch.undo()  # space again

    change = keeper.advance([v1, v2], identity)
    assert change is not None and (change.version, change.problem) == (2, "")
    assert keeper.advance([v1, v2], identity) is None
    assert TrustKeeper(tmp_path).version == 2
    assert load_identity(tmp_path).publishers == _b64(new)  # type: ignore[union-attr]
