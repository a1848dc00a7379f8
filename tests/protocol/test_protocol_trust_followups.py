"""The trust root's version space, and the size a trust root may take."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import load_private_key
from edgewise.cli import main
from edgewise.protocol import (
    MAX_CHAIN,
    MAX_CHAIN_BYTES,
    MAX_DOCUMENT_BYTES,
    MAX_FIRST_VERSION,
    MAX_SIGNED_BYTES,
    MAX_VERSION,
    MAX_VERSION_STEP,
    TrustRootError,
    advance_trust_root,
    sign_trust_root,
    trust_root_document,
    verify_trust_root,
)

ROOT, PUBLISHER = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def _root(version: int, **extra: Any) -> dict[str, Any]:
    doc = trust_root_document(version, [ROOT.public_key()], 1, [PUBLISHER.public_key()], 0.0)
    return sign_trust_root(doc | extra, [ROOT])


def test_a_first_version_that_would_use_up_the_version_space_is_refused() -> None:
    # Before: a first version of 2**53 - 1 was taken; no version could ever follow it
    # (nothing above it is a JSON number held exactly), so the fleet's publisher and root
    # keys were frozen for good, from one typo.
    with pytest.raises(TrustRootError, match="would use up the version space"):
        verify_trust_root(_root(MAX_VERSION), None)
    with pytest.raises(TrustRootError, match=f"over {MAX_FIRST_VERSION}"):
        verify_trust_root(_root(MAX_FIRST_VERSION + 1), None)
    assert verify_trust_root(_root(MAX_FIRST_VERSION), None).version == MAX_FIRST_VERSION


def test_a_step_past_the_largest_is_refused_and_one_within_it_is_taken() -> None:
    v1 = verify_trust_root(_root(1), None)
    with pytest.raises(TrustRootError, match="would use up the version space") as caught:
        verify_trust_root(_root(MAX_VERSION), v1)
    assert f"skips {MAX_VERSION - 1} versions ahead of 1" in str(caught.value)
    with pytest.raises(TrustRootError, match=f"over {MAX_VERSION_STEP}"):
        verify_trust_root(_root(2 + MAX_VERSION_STEP), v1)
    assert verify_trust_root(_root(1 + MAX_VERSION_STEP), v1).version == 1 + MAX_VERSION_STEP
    # Walked on a device: the walk stops at the last good version, saying why.
    held, problem = advance_trust_root([_root(1), _root(MAX_VERSION)], v1)
    assert held is v1 and "would use up the version space" in problem


def test_a_version_past_the_json_safe_integers_is_malformed() -> None:
    with pytest.raises(TrustRootError, match=f"from 1 to {MAX_VERSION}"):
        verify_trust_root(_root(MAX_VERSION + 1), None)


def test_a_chain_walked_from_no_version_may_start_high() -> None:
    # A chain trimmed to its newest MAX_CHAIN versions starts wherever it was cut: a
    # device with no trust root yet, and a control plane reading its own chain, walk it.
    start = MAX_FIRST_VERSION + 10
    held, problem = advance_trust_root([_root(start + 1), _root(start)], None)
    assert problem == "" and held is not None and held.version == start + 1


def test_a_document_past_its_size_is_refused() -> None:
    big = _root(1, description="x" * MAX_DOCUMENT_BYTES)
    with pytest.raises(TrustRootError, match=f"over {MAX_DOCUMENT_BYTES}"):
        verify_trust_root(big, None)


def test_the_largest_trust_root_fits_what_a_device_reads() -> None:
    # The caps a device reads the chain with hold for any trust root a control plane
    # can have taken: three full key sets, and a full set of signatures as kept.
    keys = [Ed25519PrivateKey.generate() for _ in range(64)]
    pubs = [k.public_key() for k in keys]
    doc = trust_root_document(MAX_FIRST_VERSION, pubs, 64, pubs, 1.7e9, control_plane=pubs)
    signed = sign_trust_root(doc, keys)
    root = verify_trust_root(signed, None)
    assert len(root.signed["signatures"]) == 64
    for text in (json.dumps(dict(root.signed), indent=2), json.dumps(dict(root.signed))):
        assert len(text.encode()) <= MAX_SIGNED_BYTES
    chain = json.dumps({"chain": [dict(root.signed)] * MAX_CHAIN})
    assert len(chain.encode()) <= MAX_CHAIN_BYTES


# -- through `edgewise trust sign` and `trust verify` -------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["edgewise", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_trust_sign_and_verify_refuse_a_version_that_would_freeze_the_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    for name in ("root", "ci"):
        assert _run(capsys, "keys", "generate", name, "--dir", str(keys))[0] == 0
    frozen, v1 = tmp_path / "frozen.json", tmp_path / "v1.json"
    sign = (
        "trust",
        "sign",
        "--publisher",
        str(keys / "ci.pub"),
        "--sign-with",
        str(keys / "root.key"),
    )
    code, _, err = _run(capsys, *sign, "--version", str(MAX_VERSION), "--out", str(frozen))
    assert code == 1 and "not written" in err and "would use up the version space" in err
    assert not frozen.exists() and "Traceback" not in err

    assert _run(capsys, *sign, "--version", "1", "--out", str(v1))[0] == 0
    code, _, err = _run(
        capsys, *sign, "--version", str(MAX_VERSION), "--previous", str(v1), "--out", str(frozen)
    )
    assert code == 1 and f"skips {MAX_VERSION - 1} versions ahead of 1" in err
    # A document signed elsewhere (by hand, by an older build): `verify` says the same.
    doc = json.loads(v1.read_text())["document"] | {"version": MAX_VERSION}
    frozen.write_text(json.dumps(sign_trust_root(doc, [load_private_key(keys / "root.key")])))
    code, _, err = _run(capsys, "trust", "verify", str(frozen), "--previous", str(v1))
    assert code == 1 and "refused:" in err and "would use up the version space" in err
    code, _, err = _run(capsys, "trust", "verify", str(frozen))
    assert code == 1 and "would use up the version space" in err
