from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.protocol import (
    DesiredState,
    DesiredStateError,
    Report,
    SignedDesiredState,
    sign_desired,
    verify_desired,
)

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def _doc(revision: int = 3, expires: float = NOW + 100, **kw: object) -> DesiredState:
    return DesiredState(
        device_id="dev-1", revision=revision, issued_at=NOW - 1, expires_at=expires, **kw
    )  # type: ignore[arg-type]


def _trust() -> dict[str, object]:
    signed = sign_desired(_doc(), KEY)
    return {signed.key_id: KEY.public_key()}


def test_signed_document_round_trips_through_json() -> None:
    signed = sign_desired(_doc(settings={"x": 1.5}), KEY)
    again = SignedDesiredState.model_validate_json(signed.model_dump_json())
    assert verify_desired(again, _trust(), NOW, None).revision == 3  # type: ignore[arg-type]


def test_unknown_signer_is_refused() -> None:
    signed = sign_desired(_doc(), Ed25519PrivateKey.generate())
    with pytest.raises(DesiredStateError, match="unknown signer"):
        verify_desired(signed, _trust(), NOW, None)  # type: ignore[arg-type]


def test_edited_document_is_refused() -> None:
    signed = sign_desired(_doc(), KEY)
    signed.document.revision = 9
    with pytest.raises(DesiredStateError, match="bad signature"):
        verify_desired(signed, _trust(), NOW, None)  # type: ignore[arg-type]


def test_expired_document_is_refused() -> None:
    signed = sign_desired(_doc(expires=NOW - 1), KEY)
    with pytest.raises(DesiredStateError, match="expired"):
        verify_desired(signed, _trust(), NOW, None)  # type: ignore[arg-type]


def test_older_revision_is_refused_and_equal_revision_is_a_no_op() -> None:
    signed = sign_desired(_doc(revision=3), KEY)
    with pytest.raises(DesiredStateError, match="stale revision"):
        verify_desired(signed, _trust(), NOW, last_revision=4)  # type: ignore[arg-type]
    doc = verify_desired(signed, _trust(), NOW, 3, last_document=_doc(revision=3))  # type: ignore[arg-type]
    assert doc.revision == 3
    other = _doc(revision=3, settings={"changed": True})
    with pytest.raises(DesiredStateError, match="stale revision"):
        verify_desired(signed, _trust(), NOW, 3, last_document=other)  # type: ignore[arg-type]


def test_report_accepts_the_contract_shape() -> None:
    report = Report.model_validate(
        {
            "revision": 2,
            "pipelines": {
                "digits": {
                    "model": "digits-mlp",
                    "version": "1.0.0",
                    "slot": "a",
                    "status": "active",
                    "reason": "",
                    "timeline": [{"state": "active", "reason": "", "at": 1.0, "progress": None}],
                }
            },
            "errors": ["desired state refused: expired"],
            "agent": {
                "version": "0.1",
                "uptime_s": 3.0,
                "buffer_depth": 0,
                "dropped": {"events": 0, "metrics": 0, "samples": 0},
            },
        }
    )
    assert report.pipelines["digits"].status == "active"
