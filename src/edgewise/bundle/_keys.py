"""Ed25519 signing keys: files, key ids, and trust sets.

A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key. A trust
set is a plain ``dict[str, Ed25519PublicKey]`` keyed by key id (`trust_set` builds one).
Private keys live in unencrypted PKCS8 PEM files with mode 0600; loading one that group or
others can read is refused, as ssh does, because a leaked signing key signs fleet updates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.bundle._errors import KeyFileError

__all__ = [
    "TrustSet",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_from_b64",
    "public_key_to_b64",
    "trust_set",
    "verify_signature",
]

TrustSet = Mapping[str, Ed25519PublicKey]
_MAX_KEY_FILE = 64 * 1024


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `message` (OpenSSL).

    The control plane checks device requests with a faster one (`edgewise.control`'s
    libsodium check), passed to `verify_request`; the agent keeps this one, which loads
    nothing more.
    """
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key id: first 16 hex digits of sha256 over the raw public key bytes."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    """The raw 32 public key bytes, standard base64."""
    return base64.b64encode(_raw(public_key)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a public key from base64 of its raw 32 bytes.

    Raises:
        KeyFileError: if the text is not base64 of exactly 32 bytes.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError("public key is not valid base64", "bad_public_key") from exc
    if len(raw) != 32:
        raise KeyFileError("public key must be 32 raw bytes", "bad_public_key")
    return Ed25519PublicKey.from_public_bytes(raw)


def trust_set(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Build a trust set (key id -> public key) from public keys."""
    return {key_id(k): k for k in keys}


def generate_keypair(name: str, directory: Path) -> tuple[Path, Path]:
    """Create ``NAME.key`` (PKCS8 PEM, mode 0600) and ``NAME.pub`` (PEM) in `directory`.

    Args:
        name: File stem; letters, digits, ``.``, ``_`` and ``-``.
        directory: Created if missing.

    Returns:
        (private key path, public key path).

    Raises:
        KeyFileError: if the name is unusable or either file already exists.
    """
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise KeyFileError(
            f"key name {name!r} must be letters, digits, '.', '_' or '-'", "bad_name"
        )
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite", "key_exists")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL + mode at creation: the secret is never on disk with looser permissions.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(key_path, 0o600)  # the umask cannot widen it, but a pre-set ACL might
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def _read_key_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_KEY_FILE:
            raise KeyFileError(f"{path} is too large to be a key file", "bad_key_file")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist", "key_not_found") from exc
    except IsADirectoryError as exc:
        raise KeyFileError(f"key file {path} is a directory", "bad_key_file") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}", "bad_key_file") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM (PKCS8) file that only its owner can read.

    Raises:
        KeyFileError: ``key_permissions`` if group/others can read it, or another reason
            if it is missing or not an Ed25519 private key.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist", "key_not_found") from exc
    if mode & 0o077:
        raise KeyFileError(
            f"private key {path} is accessible by group/others (mode {mode:04o}); "
            f"run: chmod 600 {path}",
            "key_permissions",
        )
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key", "bad_key_file") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key", "bad_key_file")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key: PEM (SubjectPublicKeyInfo) or base64 of the raw bytes.

    Raises:
        KeyFileError: if the file is missing or holds no Ed25519 public key.
    """
    path = Path(path)
    data = _read_key_file(path)
    if b"-----BEGIN" not in data:
        return public_key_from_b64(data.decode("ascii", "replace"))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key", "bad_key_file") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key", "bad_key_file")
    return key
