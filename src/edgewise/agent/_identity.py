"""The device identity under DIR: its Ed25519 key (mode 0600), id and trust root.

Written once at enrollment; every later start reads it and needs no token. The trust
root holds two key sets: publishers (who may sign model bundles) and the control plane
(who may sign desired-state documents).
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.agent._durable import DurableJson, atomic_write_bytes

__all__ = [
    "Identity",
    "IdentityError",
    "ensure_private_dir",
    "load_identity",
    "load_or_create_key",
    "public_key_b64",
    "save_identity",
]

KEY_FILE = "device.key"
IDENTITY_FILE = "identity.json"


def public_key_to_b64(key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key (the wire form of every key)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw public key.

    Raises:
        IdentityError: not base64 of 32 bytes.
    """
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise IdentityError(f"bad public key in the trust root: {exc}") from exc


class IdentityError(Exception):
    """The identity files are missing, unreadable or unsafe."""


def load_or_create_key(data_dir: Path) -> Ed25519PrivateKey:
    """The device key, generated (mode 0600) on first use.

    Raises:
        IdentityError: the key file is readable by others or not a key.
    """
    path = data_dir / KEY_FILE
    try:
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write_bytes(path, pem, mode=0o600)
            return key
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
        text = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot {_verb(path)} the device key {path}: {_why(exc)}") from exc
    try:
        loaded = serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not a private key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return loaded


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The raw public key, base64, as enrollment sends it."""
    return public_key_to_b64(key.public_key())


@dataclass
class Identity:
    """Who this device is and whom it trusts."""

    device_id: str
    server: str
    publishers: dict[str, str] = field(default_factory=dict)  # key id -> b64 raw key
    control_plane: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def publisher_keys(self) -> dict[str, Ed25519PublicKey]:
        """Keys trusted to sign model bundles."""
        return {k: public_key_from_b64(v) for k, v in self.publishers.items()}

    def control_plane_keys(self) -> dict[str, Ed25519PublicKey]:
        """Keys trusted to sign desired-state documents."""
        return {k: public_key_from_b64(v) for k, v in self.control_plane.items()}

    @classmethod
    def from_enrollment(
        cls, answer: dict[str, Any], server: str, labels: dict[str, str]
    ) -> Identity:
        """Build from the enrollment answer.

        Raises:
            IdentityError: the answer lacks the device id or trust root.
        """
        try:
            trust = answer["trust_root"]
            return cls(
                device_id=str(answer["device_id"]),
                server=server,
                publishers=dict(trust.get("publishers", {})),
                control_plane=dict(trust.get("control_plane", {})),
                settings=dict(answer.get("settings", {})),
                labels=labels,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"enrollment answer is malformed: {exc}") from exc


def save_identity(data_dir: Path, identity: Identity) -> None:
    """Commit the identity durably."""
    DurableJson(data_dir / IDENTITY_FILE).commit(identity.__dict__)


def load_identity(data_dir: Path) -> Identity | None:
    """The stored identity, or None before the first enrollment.

    Raises:
        IdentityError: an identity file is there but neither it nor its previous commit
            reads: saying "no identity" would send the operator to enroll a second device.
    """
    stored = DurableJson(data_dir / IDENTITY_FILE)
    doc = stored.load(default=None)
    if doc is None and not (stored.path.exists() or stored.prev.exists()):
        return None
    damaged = (
        f"{stored.path} is damaged and its previous commit does not read either: restore "
        "it from a backup (this device's id and trust root), or move it away and start "
        "with --enroll-token to enroll as a new device"
    )
    if not isinstance(doc, dict):
        raise IdentityError(damaged)
    try:
        return Identity(**doc)
    except TypeError as exc:
        raise IdentityError(f"{damaged} ({exc})") from exc


def ensure_private_dir(data_dir: Path) -> None:
    """Create DIR readable by the agent's user only.

    The mode is only written when it differs: a data partition that went read-only
    (flash wearing out) must still let the agent start and serve its committed model.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if data_dir.stat().st_mode & 0o777 != 0o700:
            os.chmod(data_dir, 0o700)
    except OSError as exc:
        if data_dir.is_dir() and exc.errno == errno.EROFS:
            return  # its mode cannot change on this disk: serve on
        raise IdentityError(f"cannot create the data directory {data_dir}: {_why(exc)}") from exc


def _verb(path: Path) -> str:
    return "read" if path.exists() else "write"


def _why(exc: OSError) -> str:
    """An OSError as an operator reads it, with what to do about the usual ones."""
    what = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "free space on that disk, or point --data at another",
        errno.EROFS: "the disk is read-only; point --data at a writable one",
        errno.EACCES: "run the agent as a user that owns it, or point --data elsewhere",
    }.get(exc.errno or 0)
    return f"{what} ({hint})" if hint else what
