from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.bundle import (
    KeyFileError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_b64,
    public_key_to_b64,
    trust_set,
    verify_signature,
)
from edgewise.control._sodium import sodium_verify

from .conftest import KeyPair


def test_generate_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    key, pub = generate_keypair("release", tmp_path / "k")
    assert (key.name, pub.name) == ("release.key", "release.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private_key(key)) == key_id(load_public_key(pub))


def test_key_id_is_the_first_16_hex_of_sha256_of_the_raw_public_key(alice: KeyPair) -> None:
    raw = alice.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(alice.public) == hashlib.sha256(raw).hexdigest()[:16]
    assert len(key_id(alice.public)) == 16


def test_generate_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    generate_keypair("dup", tmp_path)
    with pytest.raises(KeyFileError) as err:
        generate_keypair("dup", tmp_path)
    assert err.value.reason == "key_exists"


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden"])
def test_generate_refuses_names_that_are_not_plain_file_stems(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError) as err:
        generate_keypair(name, tmp_path)
    assert err.value.reason == "bad_name"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_private_key_readable_by_group_or_others_is_refused(alice: KeyPair, mode: int) -> None:
    alice.key.chmod(mode)
    with pytest.raises(KeyFileError) as err:
        load_private_key(alice.key)
    assert err.value.reason == "key_permissions"
    assert "chmod 600" in str(err.value)


def test_a_missing_or_malformed_key_file_is_refused(tmp_path: Path, alice: KeyPair) -> None:
    with pytest.raises(KeyFileError) as err:
        load_private_key(tmp_path / "nope.key")
    assert err.value.reason == "key_not_found"
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError) as err:
        load_private_key(junk)
    assert err.value.reason == "bad_key_file"
    with pytest.raises(KeyFileError):
        load_public_key(alice.key)  # a private key is not a public key


def test_public_keys_round_trip_through_base64_of_the_raw_bytes(
    keys: Callable[[str], KeyPair], tmp_path: Path
) -> None:
    public = keys("bob").public
    text = public_key_to_b64(public)
    assert key_id(public_key_from_b64(text)) == key_id(public)
    b64_file = tmp_path / "bob.b64"
    b64_file.write_text(text + "\n")
    assert key_id(load_public_key(b64_file)) == key_id(public)
    for bad in ("%%%", "AAAA"):
        with pytest.raises(KeyFileError):
            public_key_from_b64(bad)


def test_trust_sets_are_keyed_by_key_id() -> None:
    a, b = Ed25519PrivateKey.generate().public_key(), Ed25519PrivateKey.generate().public_key()
    assert trust_set([a, b]) == {key_id(a): a, key_id(b): b}


@pytest.mark.parametrize("check", [verify_signature, sodium_verify], ids=["openssl", "sodium"])
@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=512), flip=st.integers(min_value=0, max_value=511))
def test_signature_checks_agree_with_cryptography(
    check: Callable[[Any, bytes, bytes], bool], message: bytes, flip: int
) -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate().public_key()
    signature = key.sign(message)
    assert check(key.public_key(), signature, message)
    bad = bytearray(signature)
    bad[flip % 64] ^= 1 << (flip % 8)
    for public, sig, msg in (
        (key.public_key(), bytes(bad), message),
        (other, signature, message),
        (key.public_key(), signature, message + b"x"),
        (key.public_key(), signature[:63], message),
    ):
        try:
            public.verify(sig, msg)
            expected = True
        except InvalidSignature:
            expected = False
        assert check(public, sig, msg) is expected is False
