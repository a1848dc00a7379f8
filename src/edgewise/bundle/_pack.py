"""Writing bundles: pack a directory (or in-memory files) and add signatures.

Bundles are reproducible: entries are sorted, timestamps fixed to 1980-01-01 and
permissions fixed, so the same inputs give the same bytes. Small files are deflated;
files above `STORE_THRESHOLD` are stored, because model weights barely compress and
inflating them would slow every device's verification.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle._canonical import manifest_digest
from edgewise.bundle._errors import BundleError, SchemaError
from edgewise.bundle._keys import key_id, load_private_key
from edgewise.bundle._manifest import Manifest, check_bundle_path
from edgewise.bundle._zip import (
    CHUNK,
    MANIFEST_NAME,
    SIGNATURE_DIR,
    check_file_list,
    entries,
    open_zip,
    read_manifest_from,
    stream_entry,
    validate_manifest,
)

__all__ = ["STORE_THRESHOLD", "pack", "pack_files", "sha256_file", "sign"]

STORE_THRESHOLD = 16 * 1024 * 1024
_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP64_LIMIT = (1 << 31) - 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _zinfo(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED if size > STORE_THRESHOLD else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 3  # unix, so the permission bits above mean what they say
    info.file_size = size
    return info


def _write_entry(zf: zipfile.ZipFile, name: str, source: Path | bytes) -> dict[str, Any]:
    """Write one entry while hashing it: a single pass over the bytes."""
    digest = hashlib.sha256()
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    with zf.open(_zinfo(name, size), "w", force_zip64=size > _ZIP64_LIMIT) as out:
        if isinstance(source, bytes):
            digest.update(source)
            out.write(source)
            written = size
        else:
            written = 0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            with open(source, "rb") as fh:
                while n := fh.readinto(buf):
                    digest.update(view[:n])
                    out.write(view[:n])
                    written += n
    if written != size:
        raise BundleError(f"{name} changed size while being packed", "source_changed")
    return {"sha256": digest.hexdigest(), "size": written}


def _atomic_zip_path(out: Path) -> tuple[int, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    return fd, Path(tmp)


def pack_files(
    manifest: Manifest | Mapping[str, Any], files: Mapping[str, Path | bytes], out: Path
) -> Manifest:
    """Write a bundle from a manifest (whose `files` is ignored) and named files.

    Args:
        manifest: Manifest fields; `files` is filled in from what is written.
        files: Bundle path -> source file or bytes. Must include the manifest's `model`.
        out: Where to write the `.ewb` (atomically: temp file, then rename).

    Returns:
        The manifest as written, with every file's sha256 and size.

    Raises:
        SchemaError: if the manifest breaks the schema.
        BundleError: ``bad_path`` for an unusable file name.
    """
    data = (
        manifest.model_dump(mode="json", exclude_unset=True)
        if isinstance(manifest, Manifest)
        else dict(manifest)
    )
    data.pop("files", None)
    validate_manifest(data)  # fail before writing gigabytes for a typo in the manifest
    for name in files:
        try:
            check_bundle_path(name)
        except ValueError as exc:
            raise BundleError(str(exc), "bad_path") from exc
    fd, tmp = _atomic_zip_path(out)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            table = {name: _write_entry(zf, name, files[name]) for name in sorted(files)}
            data["files"] = table
            result = validate_manifest(data)
            body = json.dumps(
                result.model_dump(mode="json", exclude_unset=True), indent=2, sort_keys=True
            )
            _write_entry(zf, MANIFEST_NAME, body.encode("utf-8") + b"\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def pack(src_dir: Path, out: Path) -> Manifest:
    """Pack a directory holding ``manifest.json`` (no hashes needed) plus the files.

    Every regular file under `src_dir` except ``manifest.json`` goes into the bundle.

    Raises:
        SchemaError: if manifest.json is missing, not JSON, or breaks the schema.
        BundleError: ``bad_source`` for a missing directory or a symlink inside it.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise BundleError(f"{src_dir} is not a directory", "bad_source")
    manifest_path = src_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SchemaError(f"{src_dir} has no manifest.json", "missing_manifest")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting too deep too
        raise SchemaError(f"manifest.json is not valid JSON: {exc}", "bad_json") from exc
    if not isinstance(data, dict):
        raise SchemaError("manifest.json must hold a JSON object")
    out_resolved = Path(out).resolve()
    files: dict[str, Path | bytes] = {}
    for path in sorted(src_dir.rglob("*")):
        if path.is_symlink():
            raise BundleError(f"{path} is a symlink; bundles hold regular files", "bad_source")
        if not path.is_file() or path.resolve() == out_resolved:
            continue
        rel = path.relative_to(src_dir).as_posix()
        if rel != MANIFEST_NAME and not rel.startswith(SIGNATURE_DIR):
            files[rel] = path
    return pack_files(data, files, Path(out))


def sign(
    bundle: Path,
    private_key: Ed25519PrivateKey | Path,
    *,
    check_files: bool = True,
) -> str:
    """Add (or replace) this key's detached signature ``signatures/<keyid>.sig``.

    The signature is Ed25519 over the 32 raw bytes of `manifest_digest(manifest)`.

    Args:
        bundle: The `.ewb` file, changed in place (atomically).
        private_key: A key, or a key file path (refused when group/others can read it).
        check_files: Verify every file against the manifest first, so a signer never
            vouches for a bundle whose contents already differ from its manifest.

    Returns:
        The key id of the signer.
    """
    bundle = Path(bundle)
    key = (
        private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    )
    kid = key_id(key)
    sig_name = f"{SIGNATURE_DIR}{kid}.sig"
    with open_zip(bundle) as zf:
        found = entries(zf)
        manifest = read_manifest_from(zf, found)
        if check_files:
            _check_contents(zf, found, manifest)
        already = sig_name in found
    signature = key.sign(bytes.fromhex(manifest_digest(manifest)))
    if not already:
        with zipfile.ZipFile(bundle, "a") as zf:
            zf.writestr(_zinfo(sig_name, len(signature)), signature)
        return kid
    # zip has no delete: replacing an entry means rewriting the archive.
    fd, tmp = _atomic_zip_path(bundle)
    try:
        with open_zip(bundle) as src, os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as dst:
            for info in src.infolist():
                if info.filename != sig_name:
                    with src.open(info) as fin, dst.open(info, "w") as fout:
                        while chunk := fin.read(CHUNK):
                            fout.write(chunk)
            dst.writestr(_zinfo(sig_name, len(signature)), signature)
        os.replace(tmp, bundle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return kid


def _check_contents(
    zf: zipfile.ZipFile, found: Mapping[str, zipfile.ZipInfo], manifest: Manifest
) -> None:
    check_file_list(found, manifest)
    for name, entry in manifest.files.items():
        stream_entry(zf, found[name], entry.sha256, entry.size)
