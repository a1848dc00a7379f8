"""Signed device requests: how an agent proves who it is on every call after enrollment.

Usage::

    headers = sign_request(key, "dev-1", "GET", "/device/v1/desired?wait=30", b"", now=time.time())
    # ... on the control plane:
    signed = verify_request(headers, "GET", "/device/v1/desired?wait=30", b"", pub, now=time.time())

The signature covers the method, the path with its query string exactly as sent, the
timestamp, a random nonce and the sha256 of the raw body, joined by newlines. The timestamp
bounds replays to a skew window; the nonce, remembered by the control plane for that window,
refuses replays inside it. Both sides import this module, so they cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.bundle import verify_signature

__all__ = [
    "HEADER_DEVICE",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_SKEW_S",
    "RequestAuthError",
    "SignedRequest",
    "new_nonce",
    "parse_signed_headers",
    "sign_request",
    "signing_bytes",
    "verify_request",
]

HEADER_DEVICE = "X-Edgewise-Device"
HEADER_TIMESTAMP = "X-Edgewise-Timestamp"
HEADER_NONCE = "X-Edgewise-Nonce"
HEADER_SIGNATURE = "X-Edgewise-Signature"
MAX_SKEW_S = 300.0

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX = frozenset("0123456789abcdef")
_TIMESTAMP_RE = re.compile(r"-?[0-9]{1,15}")


class RequestAuthError(Exception):
    """A device request whose signature headers are missing, malformed, stale or wrong.

    Attributes:
        reason: a short machine-friendly code: "unsigned", "malformed", "stale_timestamp",
            "bad_signature".
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The identity a verified request carries."""

    device_id: str
    timestamp: int
    nonce: str


def new_nonce() -> str:
    """A fresh random nonce: 32 lowercase hex characters."""
    return secrets.token_hex(16)


def signing_bytes(method: str, path_qs: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The exact bytes a device signs for one request."""
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
    return "\n".join([method.upper(), path_qs, str(timestamp), nonce, digest]).encode()


def sign_request(
    private_key: Ed25519PrivateKey,
    device_id: str,
    method: str,
    path_qs: str,
    body: bytes,
    now: float,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign one request; returns the four headers to send with it.

    Args:
        private_key: the device key.
        device_id: the id the control plane assigned at enrollment.
        method: HTTP method.
        path_qs: the path including the query string, exactly as it will be sent.
        body: the raw body bytes as sent (compressed if the body is compressed).
        now: current unix time (seconds).
        nonce: a fixed nonce (tests); a random one by default.
    """
    timestamp = int(now)
    nonce = nonce or new_nonce()
    signature = private_key.sign(signing_bytes(method, path_qs, timestamp, nonce, body))
    return {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(signature).decode(),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def parse_signed_headers(headers: Mapping[str, str]) -> tuple[str, int, str, bytes]:
    """Read (device id, timestamp, nonce, signature) without checking the signature.

    The control plane needs the device id first, to find the key to verify with.

    Raises:
        RequestAuthError: "unsigned" when any header is absent, "malformed" when one is
            not in its format.
    """
    device = _header(headers, HEADER_DEVICE)
    ts_text = _header(headers, HEADER_TIMESTAMP)
    nonce = _header(headers, HEADER_NONCE)
    sig_text = _header(headers, HEADER_SIGNATURE)
    if not device or ts_text is None or nonce is None or sig_text is None:
        raise RequestAuthError("unsigned", "request is not signed by a device key")
    if len(device) > 128:
        raise RequestAuthError("malformed", "device id too long")
    # ASCII digits only, at most 15 of them (unix seconds until the year 31,000,000; the
    # skew check then compares it with a float exactly): int() alone takes "١٢", "1_0"
    # and numbers no float holds.
    if not _TIMESTAMP_RE.fullmatch(ts_text):
        raise RequestAuthError("malformed", "timestamp is not an integer of at most 15 digits")
    timestamp = int(ts_text)
    if len(nonce) != 32 or not set(nonce) <= _HEX:
        raise RequestAuthError("malformed", "nonce must be 32 lowercase hex characters")
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestAuthError("malformed", "signature is not base64") from None
    if len(signature) != 64:
        raise RequestAuthError("malformed", "signature must be 64 bytes")
    return device, timestamp, nonce, signature


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path_qs: str,
    body: bytes,
    public_key: Ed25519PublicKey,
    now: float,
    max_skew_s: float = MAX_SKEW_S,
    verify: Callable[[Ed25519PublicKey, bytes, bytes], bool] = verify_signature,
) -> SignedRequest:
    """Check a request's signature and timestamp; nonce replay is the caller's job.

    `verify` checks the signature (`verify_signature` by default; the control plane
    passes a faster one).

    Raises:
        RequestAuthError: reason "unsigned", "malformed", "stale_timestamp" or
            "bad_signature".
    """
    device, timestamp, nonce, signature = parse_signed_headers(headers)
    if abs(now - timestamp) > max_skew_s:
        raise RequestAuthError(
            "stale_timestamp", f"timestamp is {now - timestamp:+.0f} s off (bound {max_skew_s:g})"
        )
    if not verify(public_key, signature, signing_bytes(method, path_qs, timestamp, nonce, body)):
        raise RequestAuthError("bad_signature", "signature does not match")
    return SignedRequest(device_id=device, timestamp=timestamp, nonce=nonce)
