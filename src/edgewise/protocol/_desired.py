"""Desired-state documents (control plane -> device) and reports (device -> control plane).

Usage::

    signed = sign_desired(doc, control_plane_key)          # control plane
    doc = verify_desired(signed, trust_root_keys, now=time.time(), last_revision=7)  # agent

A desired-state document is signed by the control plane's Ed25519 key over the canonical
JSON of the document. The agent refuses documents from other signers, with a bad signature,
past their expiry (freeze protection: a captured old document cannot be replayed forever)
or with a revision lower than the last it accepted (rollback protection). The same revision
with the same content is accepted again as a no-op, so a re-fetch after a restart is safe.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from edgewise.bundle import canonical_json, key_id, verify_signature

__all__ = [
    "PIPELINE_STATUSES",
    "AgentInfo",
    "DesiredModelRef",
    "DesiredPipeline",
    "DesiredState",
    "DesiredStateError",
    "PipelineReport",
    "PipelineStatus",
    "Report",
    "SignedDesiredState",
    "TimelineEntry",
    "desired_signing_bytes",
    "sign_desired",
    "signer_key_id",
    "verify_desired",
]

PipelineStatus = Literal[
    "pending",
    "downloading",
    "verifying",
    "installing",
    "health_checking",
    "active",
    "failed",
    "rolled_back",
]
PIPELINE_STATUSES: tuple[str, ...] = (
    "pending",
    "downloading",
    "verifying",
    "installing",
    "health_checking",
    "active",
    "failed",
    "rolled_back",
)


class DesiredStateError(Exception):
    """A desired-state document the agent must refuse.

    Attributes:
        reason: "unknown signer", "bad signature", "expired" or "stale revision".
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DesiredModelRef(BaseModel):
    """One model a pipeline should run, pinned to the digest of its `.ewb` file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    url: str


class DesiredPipeline(BaseModel):
    """One pipeline a device should run, and which deployment asked for it."""

    model_config = ConfigDict(extra="forbid")

    deployment: str
    model: DesiredModelRef
    fallback: DesiredModelRef | None = None
    cascade: DesiredModelRef | None = None
    spec: dict[str, Any] = Field(default_factory=dict)


class DesiredState(BaseModel):
    """Everything a device should be running, as decided by the control plane."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    revision: int = Field(ge=0)
    issued_at: float
    expires_at: float
    pipelines: dict[str, DesiredPipeline] = Field(default_factory=dict)
    egress: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)


class SignedDesiredState(BaseModel):
    """A desired-state document with the control plane's detached signature."""

    model_config = ConfigDict(extra="forbid")

    document: DesiredState
    key_id: str
    signature: str


class TimelineEntry(BaseModel):
    """One step of a pipeline's install/run history on the device."""

    # NaN and infinities are not JSON: refused when a report is parsed (a 422), so the
    # control plane stores a parsed report as it is, without a second check.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    state: str
    reason: str = ""
    at: float
    progress: float | None = None


class PipelineReport(BaseModel):
    """What a device reports about one pipeline."""

    model_config = ConfigDict(extra="ignore")

    model: str
    version: str
    slot: Literal["a", "b"] | None = None
    status: PipelineStatus
    reason: str = ""
    timeline: list[TimelineEntry] = Field(default_factory=list, max_length=1000)


class AgentInfo(BaseModel):
    """The agent's own health, reported alongside its pipelines."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    version: str = ""
    uptime_s: float = 0.0
    buffer_depth: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    # Which pipeline-spec terms the agent understands (`edgewise.protocol._vocabulary`):
    # the digest in every report, the terms until a report carrying them was accepted.
    spec_digest: str = Field(default="", max_length=64)
    spec_vocabulary: list[str] | None = Field(default=None, max_length=10_000)


class Report(BaseModel):
    """`POST /device/v1/report`: reported state; idempotent (the newest wins).

    `sent_at` is when the agent built the report (its clock, unix seconds; the body is
    signed with the request). The control plane keeps the newest report by it, so one
    that arrives late behind a newer one (a slow retry, a replay to another replica) is
    ignored. Reports without it (older agents) are ordered by the request's signed
    timestamp, to the second.
    """

    model_config = ConfigDict(extra="ignore")

    revision: int = Field(ge=0)
    pipelines: dict[str, PipelineReport] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list, max_length=100)
    agent: AgentInfo = Field(default_factory=AgentInfo)
    sent_at: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # The device's capabilities (the enrollment document's shape), sent once per agent
    # start: an upgraded agent or runtime changes them after enrollment.
    capabilities: dict[str, Any] | None = None


def desired_signing_bytes(doc: DesiredState) -> bytes:
    """The exact bytes the control plane signs for a document."""
    return canonical_json(doc.model_dump(mode="json"))


def signer_key_id(public_key: Ed25519PublicKey) -> str:
    """The key id used in `SignedDesiredState.key_id`, same rule as the bundle package."""
    return key_id(public_key)


def sign_desired(
    doc: DesiredState, private_key: Ed25519PrivateKey, key_id: str | None = None
) -> SignedDesiredState:
    """Sign a document with the control plane key.

    Args:
        doc: the document.
        private_key: the control plane's signing key.
        key_id: the key id to name; derived from the public key by default.
    """
    kid = key_id or signer_key_id(private_key.public_key())
    signature = private_key.sign(desired_signing_bytes(doc))
    return SignedDesiredState(
        document=doc, key_id=kid, signature=base64.b64encode(signature).decode()
    )


def verify_desired(
    signed: SignedDesiredState,
    trusted: Mapping[str, Ed25519PublicKey],
    now: float,
    last_revision: int | None,
    last_document: DesiredState | None = None,
) -> DesiredState:
    """Check a signed document before the agent acts on it.

    Args:
        signed: the document as received.
        trusted: control-plane key id -> public key, from the trust root.
        now: current unix time.
        last_revision: the revision the agent last accepted (None: never).
        last_document: that document, if kept; an equal revision is accepted only when
            the content matches it (when not given, an equal revision is accepted).

    Raises:
        DesiredStateError: "unknown signer", "bad signature", "expired", "stale revision".
    """
    key = trusted.get(signed.key_id)
    if key is None:
        raise DesiredStateError("unknown signer")
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError):
        raise DesiredStateError("bad signature") from None
    if not verify_signature(key, signature, desired_signing_bytes(signed.document)):
        raise DesiredStateError("bad signature")
    doc = signed.document
    if doc.expires_at <= now:
        raise DesiredStateError("expired")
    if last_revision is not None:
        if doc.revision < last_revision:
            raise DesiredStateError("stale revision")
        if (
            doc.revision == last_revision
            and last_document is not None
            and _content(doc) != _content(last_document)
        ):
            raise DesiredStateError("stale revision")
    return doc


def _content(doc: DesiredState) -> dict[str, Any]:
    # Re-signing near expiry changes issued_at/expires_at but not the content.
    data = doc.model_dump(mode="json")
    data.pop("issued_at", None)
    data.pop("expires_at", None)
    return data
