"""The signed trust root: which publisher keys devices accept, changed without re-enrolling.

A device learns whom to trust when it enrolls. Keys change after that: a CI pipeline gets
a new signing key, a laptop holding one is stolen. A trust root document names the
publisher keys (whose bundle signatures devices accept) and the root keys (who may sign
the next trust root), with a version:

    {"document": {"type": "edgewise-trust-root", "version": 2, "issued_at": ...,
                  "root": {"threshold": 1, "keys": {KEY_ID: BASE64}},
                  "publishers": {KEY_ID: BASE64, ...}},
     "signatures": [{"key_id": KEY_ID, "signature": BASE64}, ...]}

Signatures are Ed25519 over the document's canonical JSON, like a bundle manifest's. The
root keys are meant to be kept offline (`edgewise trust sign` needs the private key; the
control plane never holds it): the control plane only passes documents on, inside each
device's signed desired state, so a control plane that is broken into cannot make
devices trust a publisher of its choosing. As in TUF's root role, a new version must be
signed by a threshold of the root keys of the version the device trusts now *and* by a
threshold of its own root keys (so the root keys themselves can be rotated), and a
version never goes back. A device with no trust root yet takes its first one on the
control plane's word, as it took its publishers at enrollment.

A trust root may also name the control-plane keys (`control_plane`: whose signatures on
desired documents devices accept). Left out, devices keep the ones they enrolled with;
named, that set replaces them: a control plane's signing key is rotated by listing the
old and the new key, waiting for the fleet to hold that version, switching the key, and
listing the new key alone. Since a trust root verifies by itself, a device that refuses
every document ("unknown signer": the key was lost and replaced) fetches the chain
directly and recovers, without being touched.

The control plane keeps every version (the last `MAX_CHAIN`). Desired documents carry
the newest; a device that was off while the root keys were rotated twice fetches the
chain and walks from the version it trusts to the newest, each step checked by the keys
of the one before (`advance_trust_root`).

Versions are JSON numbers, exact up to 2**53 - 1 (`MAX_VERSION`): a version there would
leave no room for a next one, and the chain would be frozen for good. Unlike TUF's root
role, a version may skip ahead (a device off while its fleet took several versions signed
by the same root keys takes the newest at once, and a chain trimmed to its newest
`MAX_CHAIN` versions stays walkable), but by at most `MAX_VERSION_STEP` from the version
trusted now, and a first version (signed or checked with no previous one) is at most
`MAX_FIRST_VERSION`: the space then outlasts 2**32 rotations made at the largest step,
and a typo (`--version 9007199254740991`) is refused instead of freezing the chain. A
chain walked from no version (`advance_trust_root(chain, None)`) may start anywhere, as
one trimmed to its newest versions does.

A trust root is small (at most `MAX_KEYS` keys a set): its document is refused beyond
`MAX_DOCUMENT_BYTES` of canonical JSON, so whoever reads one (a device fetching the
chain) knows how much to read at most (`MAX_SIGNED_BYTES`, `MAX_CHAIN_BYTES`).

Usage::

    signed = sign_trust_root(trust_root_document(2, root_pubs, 1, publisher_pubs, now), keys)
    root = verify_trust_root(signed, current)   # current: the TrustRoot trusted now, or None
    root, problem = advance_trust_root(chain, current)   # on a device
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.bundle import canonical_json, key_id, verify_signature

__all__ = [
    "MAX_CHAIN",
    "MAX_CHAIN_BYTES",
    "MAX_DOCUMENT_BYTES",
    "MAX_FIRST_VERSION",
    "MAX_SIGNED_BYTES",
    "MAX_VERSION",
    "MAX_VERSION_STEP",
    "TRUST_ROOT_TYPE",
    "TrustRoot",
    "TrustRootError",
    "advance_trust_root",
    "sign_trust_root",
    "trust_root_document",
    "verify_trust_root",
]

TRUST_ROOT_TYPE = "edgewise-trust-root"
MAX_KEYS = 64  # per set: a document is small, whatever a sender writes into it
MAX_CHAIN = 32  # versions a desired document carries (a device further behind re-enrolls)
MAX_KEY_ID = 64  # characters of a key id kept with a signature no key checked (ours: 16)
SIGNATURE_BYTES = 64  # Ed25519
MAX_VERSION = 2**53 - 1  # the largest integer a JSON number holds exactly
MAX_VERSION_STEP = 2**20  # how far a version may skip ahead of the one trusted now
MAX_FIRST_VERSION = 2**32  # a first version leaves room for 2**32 steps of the largest size
# Three sets of MAX_KEYS keys take about 14 KB of canonical JSON: twice that is room for
# a description and whatever a newer version adds, and a bound a reader can rely on.
MAX_DOCUMENT_BYTES = 32 * 1024
# A signed trust root as passed on (`TrustRoot.signed`: at most MAX_KEYS signatures of
# SIGNATURE_BYTES, each with a key id of at most MAX_KEY_ID characters, about 12 KB),
# serialised with or without spaces.
MAX_SIGNED_BYTES = 64 * 1024
MAX_CHAIN_BYTES = MAX_CHAIN * MAX_SIGNED_BYTES  # a whole chain, as the control plane serves it


class TrustRootError(ValueError):
    """A trust root document that must not be trusted (the message says why)."""


@dataclass(frozen=True)
class TrustRoot:
    """A verified trust root: its version, root keys and threshold, publisher keys."""

    version: int
    threshold: int
    root_keys: Mapping[str, str]  # key id -> base64 raw public key
    publishers: Mapping[str, str]
    signed: Mapping[str, Any]  # the document as received, with the signatures that verified
    control_plane: Mapping[str, str] = field(default_factory=dict)  # empty: not named

    def root_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The root keys, parsed (they were checked when the document was verified)."""
        return {kid: _public(b64) for kid, b64 in self.root_keys.items()}


def _b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _public(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))


def trust_root_document(
    version: int,
    root_keys: Sequence[Ed25519PublicKey],
    threshold: int,
    publishers: Sequence[Ed25519PublicKey],
    issued_at: float,
    control_plane: Sequence[Ed25519PublicKey] = (),
) -> dict[str, Any]:
    """An unsigned trust root document (pure); `control_plane` left out when empty."""
    doc: dict[str, Any] = {
        "type": TRUST_ROOT_TYPE,
        "version": version,
        "issued_at": issued_at,
        "root": {"threshold": threshold, "keys": {key_id(k): _b64(k) for k in root_keys}},
        "publishers": {key_id(k): _b64(k) for k in publishers},
    }
    if control_plane:
        doc["control_plane"] = {key_id(k): _b64(k) for k in control_plane}
    return doc


def sign_trust_root(
    document: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]
) -> dict[str, Any]:
    """The document with one signature per key (the old root's and the new root's)."""
    message = canonical_json(dict(document))
    signatures = {}
    for key in keys:
        signatures[key_id(key)] = base64.b64encode(key.sign(message)).decode()
    return {
        "document": dict(document),
        "signatures": [{"key_id": k, "signature": s} for k, s in sorted(signatures.items())],
    }


def _key_set(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or len(value) > MAX_KEYS:
        raise TrustRootError(f"{where} must be an object of at most {MAX_KEYS} keys")
    out = {}
    for kid, b64 in value.items():
        try:
            key = _public(b64) if isinstance(b64, str) else None
        except (binascii.Error, ValueError):
            key = None
        if key is None:
            raise TrustRootError(f"{where}: {str(kid)[:40]!r} is not a base64 Ed25519 key")
        if kid != key_id(key):
            raise TrustRootError(f"{where}: key id {str(kid)[:40]!r} is not its key's id")
        out[kid] = b64
    return out


def _parse(signed: Any) -> tuple[TrustRoot, list[tuple[str, bytes]], bytes]:
    if not isinstance(signed, Mapping):
        raise TrustRootError("a trust root is an object with a document and signatures")
    doc, sigs = signed.get("document"), signed.get("signatures")
    if not isinstance(doc, Mapping) or doc.get("type") != TRUST_ROOT_TYPE:
        raise TrustRootError(f"document.type must be {TRUST_ROOT_TYPE!r}")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise TrustRootError(f"document.version must be a whole number from 1 to {MAX_VERSION}")
    root = doc.get("root")
    if not isinstance(root, Mapping):
        raise TrustRootError("document.root must be an object")
    keys = _key_set(root.get("keys"), "document.root.keys")
    threshold = root.get("threshold")
    if type(threshold) is not int or not 1 <= threshold <= len(keys):
        raise TrustRootError(f"document.root.threshold must be from 1 to the {len(keys)} root keys")
    publishers = _key_set(doc.get("publishers"), "document.publishers")
    if not publishers:
        raise TrustRootError("document.publishers is empty: no bundle could be installed")
    control_plane = {}
    if "control_plane" in doc:
        control_plane = _key_set(doc["control_plane"], "document.control_plane")
        if not control_plane:
            raise TrustRootError(
                "document.control_plane is empty: devices would accept no desired document"
            )
    if not isinstance(sigs, list) or not sigs or len(sigs) > MAX_KEYS:
        raise TrustRootError(f"signatures must be a list of 1 to {MAX_KEYS}")
    pairs = []
    for s in sigs:
        try:
            pairs.append((str(s["key_id"]), base64.b64decode(s["signature"], validate=True)))
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise TrustRootError("each signature needs a key_id and a base64 signature") from None
    try:
        message = canonical_json(dict(doc))
    except RecursionError:  # nested past what the encoder walks: a 400, never a 500
        raise TrustRootError("document is not canonical JSON: nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise TrustRootError(f"document is not canonical JSON: {exc}") from None
    if len(message) > MAX_DOCUMENT_BYTES:
        raise TrustRootError(
            f"document is {len(message)} bytes of canonical JSON, over {MAX_DOCUMENT_BYTES}"
        )
    signed_as_received = {"document": dict(doc), "signatures": sigs}
    parsed = TrustRoot(version, threshold, keys, publishers, signed_as_received, control_plane)
    return parsed, pairs, message


def _good(
    pairs: Sequence[tuple[str, bytes]], keys: Mapping[str, str], message: bytes
) -> dict[str, bytes]:
    """The distinct keys of `keys` that validly signed `message`, with their signatures."""
    good: dict[str, bytes] = {}
    for kid, signature in pairs:
        b64 = keys.get(kid)
        if kid in good or b64 is None:
            continue
        if verify_signature(_public(b64), signature, message):
            good[kid] = signature
    return good


def _keeping(
    root: TrustRoot, pairs: Sequence[tuple[str, bytes]], good: Mapping[str, bytes]
) -> TrustRoot:
    """`root` with its signatures as plain {key_id, signature} pairs, one per key.

    Signatures are outside what the root keys sign: anyone passing a document on (an
    operator token, a control plane broken into) could pad them with entries of any size
    or shape, and every device would then be sent them in every desired document. Kept:
    the ones that verified, and one of Ed25519's size per other key id (a device that
    holds an older version than whoever checked this one needs its root keys'
    signatures: a control plane restored without its chain checks against none).
    """
    kept = dict(good)
    for kid, sig in pairs:
        if kid not in kept and len(kid) <= MAX_KEY_ID and len(sig) == SIGNATURE_BYTES:
            kept[kid] = sig
    signatures = [
        {"key_id": kid, "signature": base64.b64encode(sig).decode()}
        for kid, sig in sorted(kept.items())
    ]
    signed = {"document": dict(root.signed["document"]), "signatures": signatures}
    return replace(root, signed=signed)


def verify_trust_root(signed: Any, current: TrustRoot | None) -> TrustRoot:
    """Check a trust root against the one trusted now (None: none yet; pure).

    Returns:
        The verified trust root (`current` itself when `signed` is the same version
        with the same content: a document delivered again is a no-op).

    Raises:
        TrustRootError: malformed, too few valid signatures of its own root keys or of
            the current ones, a version that goes back (or repeats with other content),
            or one that would use up the version space: a first version above
            `MAX_FIRST_VERSION`, or a step past `MAX_VERSION_STEP`.
    """
    return _verify(signed, current, first_capped=True)


def _verify(signed: Any, current: TrustRoot | None, *, first_capped: bool) -> TrustRoot:
    """`verify_trust_root`; a first version unbounded unless `first_capped`."""
    root, pairs, message = _parse(signed)
    if current is not None and root.version == current.version:
        # Checked already when it was taken: every desired document carries it again.
        if canonical_json(dict(current.signed["document"])) == message:
            return current
        raise TrustRootError(f"version {root.version} again, with other content")
    own = _good(pairs, root.root_keys, message)
    if len(own) < root.threshold:
        raise TrustRootError(
            f"version {root.version} is not signed by {root.threshold} of its own root keys"
        )
    if current is None:
        if first_capped and root.version > MAX_FIRST_VERSION:
            raise TrustRootError(
                f"version {root.version} is over {MAX_FIRST_VERSION}, the most a first "
                "version may be: first versions that high would use up the version space "
                f"(no later version can follow one at {MAX_VERSION})"
            )
        return _keeping(root, pairs, own)
    if root.version < current.version:
        raise TrustRootError(f"version {root.version} is older than {current.version}")
    if root.version - current.version > MAX_VERSION_STEP:
        raise TrustRootError(
            f"version {root.version} skips {root.version - current.version} versions ahead of "
            f"{current.version}, over {MAX_VERSION_STEP}: steps that large would use up the "
            f"version space (no later version can follow one at {MAX_VERSION})"
        )
    held = _good(pairs, current.root_keys, message)
    if len(held) < current.threshold:
        raise TrustRootError(
            f"version {root.version} is not signed by {current.threshold} of the root keys "
            f"of version {current.version} (trusted now)"
        )
    return _keeping(root, pairs, own | held)


def _version_of(signed: Any) -> int:
    doc = signed.get("document") if isinstance(signed, Mapping) else None
    version = doc.get("version") if isinstance(doc, Mapping) else None
    return version if type(version) is int else 0


def advance_trust_root(
    chain: Sequence[Any], current: TrustRoot | None
) -> tuple[TrustRoot | None, str]:
    """Walk `chain` (every version, any order) from `current` to the newest it can (pure).

    With no `current`, the walk starts at the chain's oldest version, whatever it is (a
    chain the control plane trimmed to its newest `MAX_CHAIN` starts where it was cut);
    every step after it is bounded as `verify_trust_root` bounds it.

    Returns:
        (the trust root to hold now, "" or why the walk stopped short): a step that does
        not verify ends the walk at the last good version, never skips past it.
    """
    if not isinstance(chain, Sequence) or len(chain) > MAX_CHAIN:
        return current, f"a trust root chain is a list of at most {MAX_CHAIN}"
    held = current
    for signed in sorted(chain, key=_version_of):
        if held is not None and _version_of(signed) < held.version:
            continue  # behind us
        try:
            held = _verify(signed, held, first_capped=False)
        except TrustRootError as exc:
            return held, str(exc)
    return held, ""
