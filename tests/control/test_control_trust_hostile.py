"""The signed trust root under attack at the control plane: what must not get through.

Each test names what happened before its fix; together they keep a control plane that
holds an operator token's requests, a damaged database or two racing replicas from
locking devices out or answering 500.
"""

from __future__ import annotations

import base64
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import update

from edgewise.bundle import load_private_key
from edgewise.control import SqlStore, open_store
from edgewise.control import _schema as schema
from edgewise.control._store import ConflictError
from edgewise.protocol import sign_trust_root, trust_root_document, verify_trust_root

from .conftest import Plane, make_plane

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # as in conftest: starlette's nudge towards httpx2
    from fastapi.testclient import TestClient

ROOT = Ed25519PrivateKey.generate()


def _root(version: int, publishers: list[Ed25519PrivateKey], **kw: Any) -> dict[str, Any]:
    pubs = [k.public_key() for k in publishers]
    doc = trust_root_document(version, [ROOT.public_key()], 1, pubs, 1.7e9 + version, **kw)
    return sign_trust_root(doc, [ROOT])


def _doc(p: Plane, dev: Any) -> dict[str, Any]:
    r = dev.get("/device/v1/desired")
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()["document"]
    return document


def _damage(store: SqlStore, version: int, value: str) -> None:
    m = schema.meta
    with store.engine.begin() as c:
        c.execute(update(m).where(m.c.key == f"trust_root:{version:012d}").values(value=value))


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        "5",
        "null",
        '["document", 1]',
        '{"document": {"version": NaN}, "signatures": []}',
        '{"document": ' + "[" * 990 + "]" * 990 + "}",
    ],
)
def test_a_damaged_trust_root_row_is_left_out_not_a_500_everywhere(
    plane: Plane, examples: dict[str, Any], damage: str
) -> None:
    # Before: a trust root row edited (or rotted) in the database made GET and POST
    # /api/v1/trust-root, GET /device/v1/trust-root and every desired recompute (so
    # every deployment created) answer 500; a row that read as JSON but not as an
    # object broke every recompute in desired_content.
    p = plane
    p.deploy_digits(examples, "base", "site=a")
    dev = p.enroll(labels={"site": "a"})
    key = load_private_key(Path(examples["key"]))
    v1, v2 = _root(1, [key]), _root(2, [key])
    for body in (v1, v2):
        assert p.api("POST", "/api/v1/trust-root", json=body).status_code == 201
    _damage(p.client.app.state.plane.store, 2, damage)

    shown = p.api("GET", "/api/v1/trust-root")
    assert shown.status_code == 200 and shown.json()["version"] == 1, shown.text
    fetched = dev.get("/device/v1/trust-root")
    assert fetched.status_code == 200 and fetched.json()["chain"] == [v1], fetched.text
    pipelines = {"digits": {"model": "digits-mlp@1.0.0"}}
    body = {"name": "more", "selector": "site=a", "priority": 5, "pipelines": pipelines}
    r = p.api("POST", "/api/v1/deployments", json=body)
    assert r.status_code == 201, r.text
    assert _doc(p, dev)["trust_roots"] == [v1]
    r = p.api("POST", "/api/v1/trust-root", json=_root(3, [key]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text


def test_padding_in_the_signatures_never_reaches_devices(
    plane: Plane, examples: dict[str, Any]
) -> None:
    # Before: signatures are outside what the root keys sign, and were stored and sent
    # as received: an operator token could pad a legitimate version (first to push it)
    # with up to 64 entries of any shape and size, sent to every device in every
    # desired document from then on.
    p = plane
    p.deploy_digits(examples, "base", "site=a")
    dev = p.enroll(labels={"site": "a"})
    v1 = _root(1, [load_private_key(Path(examples["key"]))])
    padded = json.loads(json.dumps(v1))
    padded["signatures"][0]["padding"] = "x" * 1000
    padded["signatures"] += [{"key_id": "k" * 500, "signature": "AAAA" * 2000, "n": [[[1]]]}] * 60
    padded["signatures"].append(dict(v1["signatures"][0]))  # the good one again
    assert len(json.dumps(padded)) > 500_000
    r = p.api("POST", "/api/v1/trust-root", json=padded)
    assert r.status_code == 201, r.text
    assert _doc(p, dev)["trust_roots"] == [v1]
    assert dev.get("/device/v1/trust-root").json()["chain"] == [v1]


def test_two_replicas_cannot_both_extend_the_chain_from_one_version(store_url: str) -> None:
    # Replica A stores v3 and replica B v4, both checked against v2 (each read the chain
    # before the other wrote). Before: both were stored; if v3 rotated the root keys,
    # v4 was never checked against them and every device stopped at v3 for good, while
    # the registry trusted v4's publishers and every later install answered 409.
    a, b = open_store(store_url), open_store(store_url)
    try:
        chain: list[Any] = []
        for version in (1, 2):
            root = verify_trust_root(_root(version, [ROOT]), chain[-1] if chain else None)
            a.add_trust_root(
                version, dict(root.signed), root.publishers, 1.0, 32, after=version - 1
            )
            chain.append(root)
        v3 = verify_trust_root(_root(3, [ROOT]), chain[-1])
        v4 = verify_trust_root(_root(4, [ROOT]), chain[-1])
        a.add_trust_root(3, dict(v3.signed), v3.publishers, 1.0, 32, after=2)
        with pytest.raises(ConflictError, match="no longer the newest"):
            b.add_trust_root(4, dict(v4.signed), v4.publishers, 1.0, 32, after=2)
        assert [r["document"]["version"] for r in b.trust_roots()] == [1, 2, 3]
        b.add_trust_root(4, dict(v4.signed), v4.publishers, 1.0, 32, after=3)
        assert [r["document"]["version"] for r in a.trust_roots()] == [1, 2, 3, 4]
    finally:
        a.close()
        b.close()


def test_a_chain_longer_than_a_document_carries_is_cut_to_the_newest(
    plane: Plane, examples: dict[str, Any]
) -> None:
    # Before: rows past 32 (written around the trim by a racing replica, or by hand)
    # went into every desired document, which devices then refused whole (at most 32),
    # and every install answered 409 trust_root_broken.
    p = plane
    p.deploy_digits(examples, "base", "site=a")
    dev = p.enroll(labels={"site": "a"})
    key = load_private_key(Path(examples["key"]))
    store = p.client.app.state.plane.store
    for version in range(1, 35):
        signed = _root(version, [key])
        with store.engine.begin() as c:
            c.execute(
                schema.meta.insert().values(
                    key=f"trust_root:{version:012d}", value=json.dumps(signed)
                )
            )
    assert [r["document"]["version"] for r in store.trust_roots()] == list(range(3, 35))
    r = p.api("POST", "/api/v1/trust-root", json=_root(35, [key]))
    assert r.status_code == 201, r.text
    assert [r["document"]["version"] for r in _doc(p, dev)["trust_roots"]] == [35]
    assert [r["document"]["version"] for r in store.trust_roots()] == list(range(4, 36))


def test_a_version_leaving_the_control_plane_set_out_is_checked_against_the_set_in_force(
    plane: Plane, store: SqlStore, tmp_path: Path
) -> None:
    # The control plane's key was replaced (a data directory restored without it): the
    # fleet's v1 names the old key alone. Before: v2 leaving control_plane out was taken
    # (only a set it named was checked), and devices, keeping v1's set, refused every
    # document of the new key; the operator learnt nothing until they were all stuck.
    old_key = plane.api("GET", "/api/v1/trust-root").json()["signing_key"]["public_key"]
    raw = base64.b64decode(old_key)
    v1 = _root(1, [ROOT], control_plane=[Ed25519PublicKey.from_public_bytes(raw)])
    assert plane.api("POST", "/api/v1/trust-root", json=v1).status_code == 201

    app, _, _ = make_plane(store, tmp_path / "restored")
    with TestClient(app, raise_server_exceptions=False) as client:
        restored = Plane(client, plane.admin, plane.clock, plane.settings)  # one store
        r = restored.api("POST", "/api/v1/trust-root", json=_root(2, [ROOT]))
        assert r.status_code == 400, r.text
        assert "control_plane of version 1 leaves out" in r.json()["error"]["message"]
        new_key = restored.api("GET", "/api/v1/trust-root").json()["signing_key"]["public_key"]
        named = Ed25519PublicKey.from_public_bytes(base64.b64decode(new_key))
        r = restored.api("POST", "/api/v1/trust-root", json=_root(2, [ROOT], control_plane=[named]))
        assert r.status_code == 201, r.text
        assert restored.api("POST", "/api/v1/trust-root", json=_root(3, [ROOT])).status_code == 201


def test_the_trust_cli_answers_bad_inputs_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a --previous (or a trust root to verify) nested past the JSON decoder said
    # "error: RecursionError: maximum recursion depth exceeded ...", and a --version past
    # what JSON carries exactly "error: ValueError: integer ... is beyond the exactly
    # representable range": right exit code, but nothing an operator could act on.
    from .test_control_cli import run

    keys = tmp_path / "keys"
    for name in ("root", "ci"):
        assert run(capsys, "keys", "generate", name, "--dir", str(keys))[0] == 0
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    sign = ["trust", "sign", "--publisher", str(keys / "ci.pub"), "--out", str(tmp_path / "o")]
    root_key = ["--sign-with", str(keys / "root.key")]
    cases = [
        ([*sign, "--version", "2", *root_key, "--previous", str(deep)], "nested too deeply"),
        (["trust", "verify", str(deep)], "nested too deeply"),
        ([*sign, "--version", str(2**60), *root_key], "--version"),
        ([*sign, "--version", "1", *root_key, "--threshold", "3"], "not written"),
        ([*sign, "--version", "2", *root_key, "--previous", str(junk)], "--previous"),
        ([*sign, "--version", "1", "--sign-with", str(keys / "nope.key")], "does not exist"),
        ([*sign, "--version", "1", "--sign-with", str(keys / "ci.pub")], "private key"),
        (["trust", "verify", str(tmp_path)], "cannot read"),
    ]
    for args, why in cases:
        code, _, err = run(capsys, *args)
        assert code != 0 and why in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()


def test_of_two_replicas_extending_one_version_at_once_exactly_one_succeeds(
    store_url: str,
) -> None:
    # The same race, run for real: two stores (two replicas' connections) storing
    # v3 and v4 against v2 at once. Whatever the interleaving, one of them must lose.
    stores = [open_store(store_url) for _ in range(2)]
    try:
        held = None
        for version in (1, 2):
            held = verify_trust_root(_root(version, [ROOT]), held)
            stores[0].add_trust_root(
                version, dict(held.signed), held.publishers, 1.0, 32, after=version - 1
            )
        barrier, outcomes = threading.Barrier(2), []

        def install(store: SqlStore, version: int) -> None:
            root = verify_trust_root(_root(version, [ROOT]), held)
            barrier.wait()
            try:
                store.add_trust_root(version, dict(root.signed), root.publishers, 1.0, 32, after=2)
                outcomes.append(version)
            except ConflictError:
                outcomes.append(-version)

        threads = [
            threading.Thread(target=install, args=(s, v))
            for s, v in zip(stores, (3, 4), strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        won = [v for v in outcomes if v > 0]
        assert len(outcomes) == 2 and len(won) == 1
        assert [r["document"]["version"] for r in stores[1].trust_roots()] == [1, 2, *won]
    finally:
        for s in stores:
            s.close()
