"""Secrets the control plane mints and keeps: its signing key and bearer tokens.

The signing key (Ed25519, signs desired-state documents) lives in `<data>/control-plane.key`
as PKCS#8 PEM, mode 0600, created exclusively so replicas sharing a data directory that
start together end up with one key. Tokens are 32 random bytes shown once; only their
sha256 is stored: they are high-entropy, so a fast hash is the right tool (no salt or
stretching needed, and lookups stay one indexed equality).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEY_FILE",
    "hash_token",
    "load_or_create_signing_key",
    "new_secret_token",
    "public_key_b64",
    "public_key_from_b64",
]

KEY_FILE = "control-plane.key"


def load_or_create_signing_key(data_dir: Path) -> Ed25519PrivateKey:
    """The control plane's signing key, created on first use."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: the first replica's key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return loaded


def new_secret_token(prefix: str) -> tuple[str, str]:
    """A new token: (public id, full secret text `<prefix>_<id>_<secret>`)."""
    token_id = secrets.token_hex(6)
    return token_id, f"{prefix}_{token_id}_{secrets.token_urlsafe(32)}"


def hash_token(text: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(text.encode()).hexdigest()


def public_key_b64(key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw public key.

    Raises:
        ValueError: not base64 of 32 bytes.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("public key is not base64") from exc
    if len(raw) != 32:
        raise ValueError("public key must be 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(raw)
