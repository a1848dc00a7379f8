"""Ed25519 checks by libsodium (PyNaCl) for the control plane's device requests.

Every signed device request is one check on the control plane's event loop: 16 % of
its GIL time in a 10,000-device rollout wave with `cryptography`'s check (OpenSSL, 130 us
here), against 65 us with libsodium. Keys stay `cryptography` objects. The agent does not
import this: with PyNaCl loaded, bench/agent.py's idle RSS went from 59.8 to 60.6 MB,
past its 60 MB budget.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

__all__ = ["sodium_verify"]


def sodium_verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `message`."""
    if len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + message, public_key.public_bytes_raw())
    except BadSignatureError:
        return False
    return True
