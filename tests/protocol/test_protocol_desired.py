from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import canonical_json
from edgewise.protocol import (
    DesiredModelRef,
    DesiredPipeline,
    DesiredState,
    DesiredStateError,
    Report,
    SignedDesiredState,
    desired_fields,
    ignored_fields,
    sign_desired,
    signer_key_id,
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


# -- a control plane newer than the agent ----------------------------------------------

# The fields an agent built before `critical` existed knows (extra="forbid" there).
FIRST_FIELDS = {
    "device_id",
    "revision",
    "issued_at",
    "expires_at",
    "pipelines",
    "egress",
    "settings",
}


def _with_pipeline() -> DesiredState:
    ref = DesiredModelRef(name="m", version="1", sha256="0" * 64, size=1, url="/m")
    return _doc(pipelines={"cam": DesiredPipeline(deployment="d", model=ref)})


def _sign_raw(document: dict[str, Any], key: Ed25519PrivateKey = KEY) -> SignedDesiredState:
    """What a newer control plane sends: its own document, signed as it travels."""
    signature = base64.b64encode(key.sign(canonical_json(document))).decode()
    body = {"document": document, "key_id": signer_key_id(key.public_key()), "signature": signature}
    return SignedDesiredState.model_validate_json(json.dumps(body))


def _newer() -> dict[str, Any]:
    raw = sign_desired(_with_pipeline(), KEY).model_dump(mode="json")["document"]
    raw["quota"] = {"gb": 3}
    raw["pipelines"]["cam"]["window"] = "night"
    raw["pipelines"]["cam"]["model"]["encryption"] = "aes-gcm"
    return raw


def test_todays_documents_carry_only_the_fields_the_first_agents_knew() -> None:
    wire = sign_desired(_doc(), KEY).model_dump(mode="json")["document"]
    assert set(wire) == FIRST_FIELDS
    marked = sign_desired(_doc(critical=["revision"]), KEY)
    assert marked.model_dump(mode="json")["document"]["critical"] == ["revision"]
    again = SignedDesiredState.model_validate_json(marked.model_dump_json())
    assert verify_desired(again, _trust(), NOW, None).critical == ["revision"]  # type: ignore[arg-type]


def test_fields_this_agent_does_not_know_are_signed_as_received_and_ignored() -> None:
    raw = _newer()
    signed = _sign_raw(raw)
    doc = verify_desired(signed, _trust(), NOW, None)  # type: ignore[arg-type]
    assert doc.pipelines["cam"].model.name == "m"
    assert ignored_fields(signed.signed_document()) == [
        "pipelines.model.encryption",
        "pipelines.window",
        "quota",
    ]
    # Serialised back exactly as received: kept, it verifies again after a restart.
    kept = json.loads(signed.model_dump_json())
    assert kept["document"] == raw
    assert verify_desired(SignedDesiredState.model_validate(kept), _trust(), NOW, None) == doc  # type: ignore[arg-type]


def test_a_changed_field_this_agent_does_not_know_still_breaks_the_signature() -> None:
    signed = _sign_raw(_newer())
    body = json.loads(signed.model_dump_json())
    body["document"]["quota"]["gb"] = 300
    with pytest.raises(DesiredStateError, match="bad signature"):
        verify_desired(SignedDesiredState.model_validate(body), _trust(), NOW, None)  # type: ignore[arg-type]


def test_the_document_returned_is_the_one_verified_not_the_parsed_copy() -> None:
    signed = _sign_raw(_newer())
    signed.document.revision = 99
    assert verify_desired(signed, _trust(), NOW, None).revision == 3  # type: ignore[arg-type]


def test_a_document_marking_a_field_this_agent_does_not_know_critical_is_refused() -> None:
    raw = _newer()
    raw["critical"] = ["quota", "pipelines.model.sha256"]
    with pytest.raises(DesiredStateError, match="needs a newer agent") as err:
        verify_desired(_sign_raw(raw), _trust(), NOW, None)  # type: ignore[arg-type]
    assert err.value.reason == "needs a newer agent"
    assert err.value.detail == "this agent does not know quota"
    raw["critical"] = ["pipelines.model.sha256", "revision", "pipelines.spec"]
    assert verify_desired(_sign_raw(raw), _trust(), NOW, None).revision == 3  # type: ignore[arg-type]


def test_desired_fields_names_nested_fields_without_the_pipeline_name() -> None:
    fields = desired_fields()
    assert {"pipelines.model.sha256", "pipelines.fallback.url", "pipelines.spec"} <= fields
    assert FIRST_FIELDS | {"critical", "trust_roots"} == {f for f in fields if "." not in f}
    assert "pipelines.cam" not in fields


def test_a_document_that_is_not_json_as_signed_is_refused_not_raised() -> None:
    raw = _newer()
    raw["settings"] = {"gain": float("nan")}  # Python's json writes NaN; JCS has none
    body = {"document": raw, "key_id": signer_key_id(KEY.public_key()), "signature": "AA=="}
    signed = SignedDesiredState.model_validate_json(json.dumps(body))
    with pytest.raises(DesiredStateError, match="bad signature"):
        verify_desired(signed, _trust(), NOW, None)  # type: ignore[arg-type]
