"""Desired-state documents (control plane -> device) and reports (device -> control plane).

Usage::

    signed = sign_desired(doc, control_plane_key)          # control plane
    doc = verify_desired(signed, trust_root_keys, now=time.time(), last_revision=7)  # agent

A desired-state document is signed by the control plane's Ed25519 key over the canonical
JSON of the document. The agent refuses documents from other signers, with a bad signature,
past their expiry (freeze protection: a captured old document cannot be replayed forever)
or with a revision lower than the last it accepted (rollback protection). The same revision
with the same content is accepted again as a no-op, so a re-fetch after a restart is safe.

Agents and control planes are upgraded at different times, so the document can grow:

- the signature covers the document *as received* (its canonical JSON), not the agent's
  reading of it, so a field an agent was built before does not break the signature;
- an agent ignores fields it does not know (`ignored_fields` names them), unless the
  document lists them in `critical` (as JOSE's `crit` header and X.509's critical
  extensions do): a document that needs a field to be understood says so, and an agent
  that does not know it refuses the document ("needs a newer agent") and keeps serving
  what it accepted before;
- the control plane leaves `critical` out while it is empty, so agents built before it
  existed read today's documents byte for byte as before;
- re-signing an unchanged revision near its expiry (`refresh_desired`) changes its times
  and nothing else, so a replica older than the one that wrote the document does not
  drop the fields it does not know.
"""

from __future__ import annotations

import base64
import binascii
import copy
import types
import typing
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_serializer,
    model_validator,
)

from edgewise.bundle import canonical_json, key_id, verify_signature
from edgewise.protocol._trust import MAX_CHAIN

__all__ = [
    "CANNOT_RUN_PREFIXES",
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
    "cannot_run",
    "desired_document",
    "desired_fields",
    "desired_signing_bytes",
    "first_problem",
    "ignored_fields",
    "refresh_desired",
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
        reason: "unknown signer", "bad signature", "malformed", "expired", "stale
            revision" or "needs a newer agent" (a few fixed values, fit to count by).
        detail: what exactly, where there is more to say ("" otherwise); `str()` of the
            error is the reason and the detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DesiredModelRef(BaseModel):
    """One model a pipeline should run, pinned to the digest of its `.ewb` file."""

    # Fields a newer control plane added are ignored (the module docstring: `critical`).
    model_config = ConfigDict(extra="ignore")

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    url: str


class DesiredPipeline(BaseModel):
    """One pipeline a device should run, and which deployment asked for it."""

    model_config = ConfigDict(extra="ignore")

    deployment: str
    model: DesiredModelRef
    fallback: DesiredModelRef | None = None
    cascade: DesiredModelRef | None = None
    spec: dict[str, Any] = Field(default_factory=dict)


class DesiredState(BaseModel):
    """Everything a device should be running, as decided by the control plane."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    device_id: str
    revision: int = Field(ge=0)
    issued_at: float
    expires_at: float
    pipelines: dict[str, DesiredPipeline] = Field(default_factory=dict)
    egress: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    # Fields an agent must understand to act on this document, by dotted path with a
    # pipeline's name left out (`pipelines.model.encryption`); see `desired_fields`.
    critical: list[str] = Field(default_factory=list, max_length=100)
    # The signed trust root chain (`edgewise.protocol._trust`), when the fleet has one:
    # each version is checked on the device against the root keys of the one before.
    trust_roots: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_CHAIN)


class SignedDesiredState(BaseModel):
    """A desired-state document with the control plane's detached signature.

    Parsed from JSON, it keeps the document exactly as received (`signed_document`):
    that is what the signature covers and what it serialises back to, fields this side
    does not know included. `document` is this side's reading of it, for convenience;
    `verify_desired` reads the document again from what it verified.
    """

    model_config = ConfigDict(extra="ignore")

    document: DesiredState
    key_id: str
    signature: str
    _received: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_received(
        cls, data: Any, handler: ModelWrapValidatorHandler[SignedDesiredState]
    ) -> SignedDesiredState:
        signed = handler(data)
        raw = data.get("document") if isinstance(data, Mapping) else None
        if isinstance(raw, Mapping):
            signed._received = copy.deepcopy(dict(raw))
        return signed

    @field_serializer("document")
    def _serialise_as_signed(self, _doc: DesiredState) -> dict[str, Any]:
        return self.signed_document()

    def signed_document(self) -> dict[str, Any]:
        """The document as signed: as received, or `document` in its wire form."""
        if self._received is not None:
            return copy.deepcopy(self._received)
        return desired_document(self.document)


# A pipeline report's reason that starts with one of these says the device cannot run
# what it was asked to: requirements it lacks (a runtime, memory, an accelerator, named
# by the bundle's signed manifest, checked before installing) or spec terms its agent
# does not know (checked before downloading). A fact about the device, not the model:
# rollouts hold such devices back instead of counting them as failed. A model that does
# not load ("incompatible: model does not load") is not one of them: that may be the
# model's fault.
CANNOT_RUN_PREFIXES = ("incompatible: needs ", "incompatible: this agent does not know ")


def cannot_run(reason: str) -> bool:
    """Whether a pipeline report's reason says the device cannot run what it was sent."""
    return reason.startswith(CANNOT_RUN_PREFIXES)


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
    buffer_depth: int = Field(default=0, ge=0, le=2**63 - 1)
    dropped: dict[str, int] = Field(default_factory=dict)
    # Which pipeline-spec terms the agent understands (`edgewise.protocol._vocabulary`):
    # the digest in every report, the terms until a report carrying them was accepted.
    spec_digest: str = Field(default="", max_length=64)
    spec_vocabulary: list[str] | None = Field(default=None, max_length=10_000)
    # The version of the signed trust root the agent holds (0: none; `_trust`).
    trust_version: int = Field(default=0, ge=0, le=2**53)


class Report(BaseModel):
    """`POST /device/v1/report`: reported state; idempotent (the newest wins).

    `sent_at` is when the agent built the report (its clock, unix seconds; the body is
    signed with the request). The control plane keeps the newest report by it, so one
    that arrives late behind a newer one (a slow retry, a replay to another replica) is
    ignored. Reports without it (older agents) are ordered by the request's signed
    timestamp, to the second.
    """

    model_config = ConfigDict(extra="ignore")

    revision: int = Field(ge=0, le=2**63 - 1)  # stored as SQL BIGINT
    pipelines: dict[str, PipelineReport] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list, max_length=100)
    agent: AgentInfo = Field(default_factory=AgentInfo)
    sent_at: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # The device's capabilities (the enrollment document's shape), sent once per agent
    # start: an upgraded agent or runtime changes them after enrollment.
    capabilities: dict[str, Any] | None = None


def desired_document(doc: DesiredState) -> dict[str, Any]:
    """A document as it travels.

    `critical` and `trust_roots` are left out while empty: agents built before them
    refuse fields they do not know, and would refuse every document that carried them.
    """
    data = doc.model_dump(mode="json")
    for name in ("critical", "trust_roots"):
        if not data[name]:
            del data[name]
    return data


def desired_signing_bytes(doc: DesiredState) -> bytes:
    """The exact bytes the control plane signs for a document."""
    return canonical_json(desired_document(doc))


def _models(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """The models a field holds, and whether it holds them by name (`dict[str, X]`)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models(arg)
    elif origin is dict:
        yield from ((m, True) for m, _ in _models(typing.get_args(annotation)[1]))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, False


def _paths(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}"
        for inner, _ in _models(info.annotation):
            yield from _paths(inner, f"{prefix}{name}.")


@cache
def desired_fields() -> frozenset[str]:
    """Every field of the document this side knows, by the paths `critical` uses.

    `revision`, `pipelines.spec`, `pipelines.model.sha256`: a pipeline's name left out.
    """
    return frozenset(_paths(DesiredState, ""))


def _unknown(value: Mapping[str, Any], model: type[BaseModel], prefix: str) -> Iterator[str]:
    for key, item in value.items():
        info = model.model_fields.get(key)
        if info is None:
            yield f"{prefix}{key}"
            continue
        for inner, by_name in _models(info.annotation):
            if isinstance(item, Mapping):
                for each in item.values() if by_name else [item]:
                    if isinstance(each, Mapping):
                        yield from _unknown(each, inner, f"{prefix}{key}.")


def ignored_fields(document: Mapping[str, Any]) -> list[str]:
    """The fields of a document (as received) this side does not know and ignores, sorted.

    Free-form maps (`spec`, `egress`, `settings`) are not looked into.
    """
    return sorted(set(_unknown(document, DesiredState, "")))


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


def refresh_desired(
    stored: Mapping[str, Any],
    issued_at: float,
    expires_at: float,
    private_key: Ed25519PrivateKey,
    key_id: str | None = None,
) -> dict[str, Any]:
    """A stored signed document signed again with new times, every other field kept.

    The control plane re-signs a revision past half its lifetime. Taking the document as
    stored, not this side's reading of it, keeps the fields a newer control-plane
    replica wrote: dropping them would change the revision's content under the agents
    that accepted it (an agent that knows them refuses equal revisions that differ).

    Returns:
        The signed document in its wire form (`document`, `key_id`, `signature`).

    Raises:
        pydantic.ValidationError: `stored` is not a signed desired-state document.
    """
    document = SignedDesiredState.model_validate(stored).signed_document()
    document["issued_at"], document["expires_at"] = issued_at, expires_at
    kid = key_id or signer_key_id(private_key.public_key())
    signature = private_key.sign(canonical_json(document))
    return {
        "document": document,
        "key_id": kid,
        "signature": base64.b64encode(signature).decode(),
    }


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

    Returns:
        The document read from the bytes the signature covers (not `signed.document`,
        which may have been changed since it was parsed).

    Raises:
        DesiredStateError: "unknown signer", "bad signature", "needs a newer agent" (the
            document marks a field critical that this side does not know), "expired",
            "stale revision".
    """
    key = trusted.get(signed.key_id)
    if key is None:
        raise DesiredStateError("unknown signer")
    received = signed.signed_document()
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        message = canonical_json(received)  # NaN or unsafe integers: not what was signed
    except (binascii.Error, ValueError):
        raise DesiredStateError("bad signature") from None
    if not verify_signature(key, signature, message):
        raise DesiredStateError("bad signature")
    # The same validation as when `signed` was parsed (or built): this cannot fail.
    doc = DesiredState.model_validate(received)
    unknown = [c for c in doc.critical if c not in desired_fields()]
    if unknown:
        raise DesiredStateError(
            "needs a newer agent", f"this agent does not know {', '.join(unknown[:10])}"
        )
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


def first_problem(exc: ValidationError, whole: str = "document") -> str:
    """The first thing pydantic found wrong, where: `revision: Input should be ...`."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or whole
    return f"{where}: {err['msg']}"


def _content(doc: DesiredState) -> dict[str, Any]:
    # Re-signing near expiry changes issued_at/expires_at but not the content.
    data = doc.model_dump(mode="json")
    data.pop("issued_at", None)
    data.pop("expires_at", None)
    return data
