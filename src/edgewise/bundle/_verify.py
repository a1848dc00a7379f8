"""Reading bundles: trust decisions, full verification, and safe extraction.

The order of checks is deliberate: archive layout and names first (nothing is inflated
from an unsafe archive), then the manifest schema, then signatures over the manifest
digest (a manifest nobody trusted says nothing), then the file list, the size caps, and
finally every file's bytes against the signed sizes and hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.bundle._canonical import manifest_digest
from edgewise.bundle._errors import BundleError, SignatureError, UnsafeArchiveError
from edgewise.bundle._keys import key_id, verify_signature
from edgewise.bundle._manifest import Manifest
from edgewise.bundle._zip import (
    MANIFEST_NAME,
    MAX_SIGNATURE_BYTES,
    check_file_list,
    entries,
    open_zip,
    read_capped,
    read_manifest_from,
    signature_key_id,
    stream_entry,
)

__all__ = [
    "DEFAULT_MAX_TOTAL_BYTES",
    "VerifiedBundle",
    "evaluate_signatures",
    "extract",
    "read_manifest",
    "trusted_manifest",
    "verify",
]

DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3
"""Global cap on the sum of declared file sizes: the most any bundle may unpack to."""

Trust = Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signatures and contents were checked.

    Attributes:
        path: The bundle file.
        manifest: The verified manifest.
        digest: sha256 hex of the canonical manifest, what the signatures cover.
        signers: Key ids of the trusted keys whose signatures verified, sorted.
    """

    path: Path
    manifest: Manifest
    digest: str
    signers: tuple[str, ...]


def _trusted(trust: Trust) -> dict[str, Ed25519PublicKey]:
    # Key ids are recomputed from the keys: a mislabelled trust entry cannot vouch
    # under another key's id.
    keys = trust.values() if isinstance(trust, Mapping) else trust
    return {key_id(k): k for k in keys}


def evaluate_signatures(
    digest: str, signatures: Mapping[str, bytes], trust: Trust, threshold: int = 1
) -> tuple[str, ...]:
    """Decide whether detached signatures establish trust in a manifest digest.

    Pure: no I/O.

    Args:
        digest: sha256 hex of the canonical manifest.
        signatures: key id -> raw 64-byte Ed25519 signature.
        trust: Trusted public keys (mapping by key id, or any iterable of keys).
        threshold: How many distinct trusted keys must have signed.

    Returns:
        The sorted key ids of the valid trusted signatures.

    Raises:
        SignatureError: ``unsigned``, ``untrusted_signer``, ``bad_signature`` or
            ``threshold_not_met``.
        ValueError: if threshold < 1.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if not signatures:
        raise SignatureError("bundle is unsigned", "unsigned")
    keys = _trusted(trust)
    message = bytes.fromhex(digest)
    valid: list[str] = []
    invalid: list[str] = []
    for kid, signature in signatures.items():
        public = keys.get(kid)
        if public is None:
            continue
        (valid if verify_signature(public, signature, message) else invalid).append(kid)
    if len(valid) >= threshold:
        return tuple(sorted(valid))
    if invalid:
        raise SignatureError(
            f"signature by key {invalid[0]} does not match the manifest "
            "(manifest or signature changed after signing)",
            "bad_signature",
        )
    if not valid:
        raise SignatureError(
            f"no signature by a trusted key (signed by {', '.join(sorted(signatures))})",
            "untrusted_signer",
        )
    raise SignatureError(
        f"{len(valid)} valid trusted signature(s), threshold is {threshold}", "threshold_not_met"
    )


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate a bundle's manifest without checking trust or file contents.

    For display only (inspect, registry listings): nothing in it is trusted yet.
    """
    with open_zip(Path(bundle)) as zf:
        return read_manifest_from(zf, entries(zf))


def _check_trust(
    zf: zipfile.ZipFile,
    found: Mapping[str, zipfile.ZipInfo],
    trust: Trust,
    threshold: int,
    max_total_bytes: int,
) -> tuple[Manifest, str, tuple[str, ...]]:
    manifest = read_manifest_from(zf, found)
    digest = manifest_digest(manifest)
    signatures = {}
    for name, info in found.items():
        kid = signature_key_id(name)
        if kid is not None:
            signatures[kid] = read_capped(zf, info, MAX_SIGNATURE_BYTES, name)
    signers = evaluate_signatures(digest, signatures, trust, threshold)
    check_file_list(found, manifest)
    if manifest.total_size > max_total_bytes:
        raise UnsafeArchiveError(
            f"bundle declares {manifest.total_size} bytes of files, over the cap of "
            f"{max_total_bytes}",
            "too_large",
        )
    return manifest, digest, signers


def trusted_manifest(
    bundle: Path,
    trust: Trust,
    threshold: int = 1,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Manifest:
    """The manifest of a bundle once its layout, schema, signatures and file list hold.

    Everything `verify` checks except the files' bytes, which `extract` checks as it
    writes them: an installer learns what it is about to install (name, version,
    requirements) without reading the model twice, and nothing is written for a bundle
    no trusted key signed.

    Raises:
        BundleError: a subclass with a `.reason` saying why the bundle is refused.
    """
    with open_zip(Path(bundle)) as zf:
        manifest, _, _ = _check_trust(zf, entries(zf), trust, threshold, max_total_bytes)
    return manifest


def verify(
    bundle: Path,
    trust: Trust,
    threshold: int = 1,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> VerifiedBundle:
    """Check a bundle completely: layout, schema, signatures, file list, sizes and hashes.

    Args:
        bundle: The `.ewb` file.
        trust: Trusted public keys: ``dict[key id, Ed25519PublicKey]`` or any iterable.
        threshold: Distinct trusted signatures required (default 1).
        max_total_bytes: Refuse bundles declaring more file bytes than this.

    Returns:
        The verified manifest, its digest and the signer key ids.

    Raises:
        BundleError: a subclass with a `.reason` saying why the bundle is refused.
    """
    bundle = Path(bundle)
    with open_zip(bundle) as zf:
        found = entries(zf)
        manifest, digest, signers = _check_trust(zf, found, trust, threshold, max_total_bytes)
        for name, entry in manifest.files.items():
            stream_entry(zf, found[name], entry.sha256, entry.size)
    return VerifiedBundle(bundle, manifest, digest, signers)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract(
    bundle: Path,
    dest: Path,
    trust: Trust,
    threshold: int = 1,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    fsync: bool = True,
) -> Manifest:
    """Verify a bundle and unpack it into `dest` in the same pass.

    Files are written into a temporary sibling directory while being hashed; only when
    every check has passed is it renamed to `dest`, so `dest` never holds an unverified
    byte and a failure leaves nothing behind. Writes ``manifest.json`` beside the files.

    Args:
        bundle: The `.ewb` file.
        dest: Target directory; must not exist, or be empty.
        trust: Trusted public keys.
        threshold: Distinct trusted signatures required.
        max_total_bytes: Global cap on the declared sizes.
        fsync: Flush files and directories to disk (what a device wants).

    Returns:
        The verified manifest.

    Raises:
        BundleError: why the bundle was refused (``dest_not_empty`` if `dest` has files).
    """
    bundle, dest = Path(bundle), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} exists and is not an empty directory", "dest_not_empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model is not a secret
    try:
        with open_zip(bundle) as zf:
            found = entries(zf)
            manifest, _, _ = _check_trust(zf, found, trust, threshold, max_total_bytes)
            for name, entry in manifest.files.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    stream_entry(zf, found[name], entry.sha256, entry.size, out.write)
                    if fsync:
                        out.flush()
                        os.fsync(out.fileno())
        # Written from the verified model, not re-read from the archive, which could have
        # changed on disk since it was checked; the digest is the same either way.
        body = json.dumps(manifest.model_dump(mode="json", exclude_unset=True), indent=2)
        (tmp / MANIFEST_NAME).write_text(body + "\n", encoding="utf-8")
        if fsync:
            for directory in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
                _fsync_dir(directory)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
