from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.protocol import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RequestAuthError,
    sign_request,
    signing_bytes,
    verify_request,
)

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def _verify(headers: dict[str, str], **kw: object) -> object:
    args: dict[str, object] = {
        "method": "POST",
        "path_qs": "/device/v1/report?x=1",
        "body": b"{}",
        "public_key": KEY.public_key(),
        "now": NOW,
    }
    args.update(kw)
    return verify_request(headers, **args)  # type: ignore[arg-type]


def test_signed_request_verifies_and_names_the_device() -> None:
    headers = sign_request(KEY, "dev-1", "post", "/device/v1/report?x=1", b"{}", NOW)
    signed = _verify(headers)
    assert signed.device_id == "dev-1"  # type: ignore[attr-defined]
    assert len(headers[HEADER_NONCE]) == 32


def test_signing_bytes_follow_the_contract() -> None:
    import hashlib

    raw = signing_bytes("get", "/a?b=c", 12, "n" * 32, b"")
    assert raw == f"GET\n/a?b=c\n12\n{'n' * 32}\n{hashlib.sha256(b'').hexdigest()}".encode()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": b"{ }"}, "bad_signature"),
        ({"path_qs": "/device/v1/report?x=2"}, "bad_signature"),
        ({"method": "GET"}, "bad_signature"),
        ({"public_key": Ed25519PrivateKey.generate().public_key()}, "bad_signature"),
        ({"now": NOW + 301}, "stale_timestamp"),
        ({"now": NOW - 301}, "stale_timestamp"),
    ],
)
def test_any_change_is_refused(change: dict[str, object], reason: str) -> None:
    headers = sign_request(KEY, "dev-1", "POST", "/device/v1/report?x=1", b"{}", NOW)
    with pytest.raises(RequestAuthError) as err:
        _verify(headers, **change)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [
        (HEADER_SIGNATURE, None, "unsigned"),
        (HEADER_TIMESTAMP, "soon", "malformed"),
        (HEADER_TIMESTAMP, "1" + "0" * 400, "malformed"),  # no float holds it
        (
            HEADER_TIMESTAMP,
            "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",
            "malformed",
        ),  # int() reads other scripts' digits
        (HEADER_TIMESTAMP, "1_700_000_000", "malformed"),
        (HEADER_NONCE, "xyz", "malformed"),
        (HEADER_SIGNATURE, "!!!", "malformed"),
        (HEADER_SIGNATURE, base64.b64encode(b"short").decode(), "malformed"),
    ],
)
def test_missing_or_malformed_headers_are_refused(
    header: str, value: str | None, reason: str
) -> None:
    headers = sign_request(KEY, "dev-1", "POST", "/device/v1/report?x=1", b"{}", NOW)
    if value is None:
        del headers[header]
    else:
        headers[header] = value
    with pytest.raises(RequestAuthError) as err:
        _verify(headers)
    assert err.value.reason == reason
