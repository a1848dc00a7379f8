"""Low-level, defensive reading of the bundle zip.

Every name in the archive is checked before anything is read, every read is capped, and
zipfile's many exception types collapse into `ArchiveError`, so callers above see either a
`BundleError` with a reason or bytes they may trust as far as the caller checks them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgewise.bundle._canonical import canonical_json
from edgewise.bundle._errors import ArchiveError, IntegrityError, SchemaError, UnsafeArchiveError
from edgewise.bundle._manifest import Manifest, check_bundle_path

__all__ = [
    "CHUNK",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SIGNATURE_DIR",
    "check_file_list",
    "describe_validation_error",
    "entries",
    "open_zip",
    "parse_manifest",
    "read_capped",
    "read_manifest_from",
    "signature_key_id",
    "stream_entry",
    "validate_manifest",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_DIR = "signatures/"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_ENTRIES = 10_000
CHUNK = 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_SIG_NAME = re.compile(r"^signatures/([0-9a-f]{16})\.sig$")
_ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What zipfile and zlib raise for damaged archives; all become one reason.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


@contextmanager
def open_zip(bundle: Path) -> Iterator[zipfile.ZipFile]:
    """Open a bundle for reading.

    Raises:
        ArchiveError: ``not_found``, or ``corrupt_archive`` for a truncated or damaged zip.
    """
    try:
        zf = zipfile.ZipFile(bundle, "r")
    except FileNotFoundError as exc:
        raise ArchiveError(f"bundle {bundle} does not exist", "not_found") from exc
    except IsADirectoryError as exc:
        raise ArchiveError(f"bundle {bundle} is a directory", "not_found") from exc
    except (*_ZIP_ERRORS, ValueError, OSError) as exc:
        # Name neither the file nor an OSError's path: a server reads uploads from its own
        # temporary files, and its refusals must not reveal where they live.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if _starts_like_zip(bundle):
            raise ArchiveError(
                f"bundle is a truncated zip archive (no end of central directory): {why}",
                "truncated_archive",
            ) from exc
        raise ArchiveError(f"bundle is not a readable zip archive: {why}") from exc
    try:
        yield zf
    finally:
        zf.close()


def _starts_like_zip(path: Path) -> bool:
    # A local file header at offset 0 but no readable end record: the tail is missing.
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def entries(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """All entries by name, after refusing anything unsafe or unexpected in the layout.

    Raises:
        UnsafeArchiveError: ``unsafe_path`` (``..``, absolute, backslash) or
            ``duplicate_entry``.
        ArchiveError: ``encrypted_entry`` or ``unsupported_compression``.
    """
    found: dict[str, zipfile.ZipInfo] = {}
    if len(zf.infolist()) > MAX_ENTRIES:
        raise UnsafeArchiveError(
            f"archive holds more than {MAX_ENTRIES} entries", "too_many_entries"
        )
    for info in zf.infolist():
        name = info.filename
        if name != MANIFEST_NAME and not _SIG_NAME.match(name):
            try:
                check_bundle_path(name)
            except ValueError as exc:
                raise UnsafeArchiveError(f"unsafe entry in archive: {exc}", "unsafe_path") from exc
        # zipfile rewrites "\\" to "/" in filename; orig_filename keeps what was stored.
        if info.orig_filename != name and "\\" in info.orig_filename:
            raise UnsafeArchiveError(
                f"unsafe entry in archive: {info.orig_filename!r} uses backslashes", "unsafe_path"
            )
        if name in found:
            raise UnsafeArchiveError(f"archive holds {name!r} twice", "duplicate_entry")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"entry {name!r} is encrypted", "encrypted_entry")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise ArchiveError(
                f"entry {name!r} uses an unsupported compression method", "unsupported_compression"
            )
        found[name] = info
    return found


def signature_key_id(name: str) -> str | None:
    """The key id of a ``signatures/<keyid>.sig`` entry, else None."""
    match = _SIG_NAME.match(name)
    return match.group(1) if match else None


def read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, what: str) -> bytes:
    """Read a small entry whole, refusing it when it inflates beyond `cap` bytes."""
    if info.file_size > cap:
        raise UnsafeArchiveError(f"{what} is larger than {cap} bytes", "size_exceeded")
    out = bytearray()
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(min(CHUNK, cap + 1 - len(out))):
                out += chunk
                if len(out) > cap:
                    raise UnsafeArchiveError(f"{what} is larger than {cap} bytes", "size_exceeded")
    except _ZIP_ERRORS as exc:
        raise ArchiveError(f"cannot read {what}: {exc}") from exc
    return bytes(out)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first schema violation (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "manifest"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        SchemaError: ``bad_json`` or ``schema_invalid``.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting too deep too
        raise SchemaError(f"manifest.json is not valid JSON: {exc}", "bad_json") from exc
    return validate_manifest(data)


def validate_manifest(data: Any) -> Manifest:
    """Validate manifest fields, and that they have the canonical form signatures cover.

    JSON allows integers a double cannot hold and lone surrogates in strings; the schema
    lets both through, but a manifest holding one has no canonical bytes to sign or check.

    Raises:
        SchemaError: ``schema_invalid``.
    """
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(f"manifest breaks the schema: {describe_validation_error(exc)}") from exc
    try:
        canonical_json(manifest)
    except ValueError as exc:
        raise SchemaError(f"manifest has no canonical JSON form: {exc}") from exc
    return manifest


def read_manifest_from(zf: zipfile.ZipFile, found: Mapping[str, zipfile.ZipInfo]) -> Manifest:
    """Read and validate `manifest.json` from an opened archive."""
    info = found.get(MANIFEST_NAME)
    if info is None:
        raise SchemaError("bundle has no manifest.json", "missing_manifest")
    return parse_manifest(read_capped(zf, info, MAX_MANIFEST_BYTES, MANIFEST_NAME))


def stream_entry(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    sha256: str,
    size: int,
    sink: Callable[[bytes], object] | None = None,
) -> None:
    """Inflate one entry, feeding `sink`, and check it against its declared hash and size.

    Reading stops as soon as the data passes the declared size, so a compression bomb
    costs at most `size` plus one chunk of work.

    Raises:
        IntegrityError: ``size_exceeded``, ``size_mismatch`` or ``hash_mismatch``.
        ArchiveError: if the compressed data is damaged.
    """
    name = info.filename
    if info.file_size > size:
        raise IntegrityError(
            f"{name} is larger than its declared size ({info.file_size} > {size} bytes)",
            "size_exceeded",
        )
    if info.compress_type == zipfile.ZIP_STORED and zf.filename:
        _stream_stored(Path(zf.filename), info, sha256, size, sink)
        return
    digest = hashlib.sha256()
    total = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(CHUNK):
                total += len(chunk)
                if total > size:
                    raise IntegrityError(
                        f"{name} inflates beyond its declared size of {size} bytes",
                        "size_exceeded",
                    )
                digest.update(chunk)
                if sink is not None:
                    sink(chunk)
    except _ZIP_ERRORS as exc:
        raise ArchiveError(f"cannot read {name}: {exc}") from exc
    if total != size:
        raise IntegrityError(
            f"{name} has {total} bytes but the manifest declares {size}", "size_mismatch"
        )
    if digest.hexdigest() != sha256:
        raise IntegrityError(f"{name} does not match its sha256 in the manifest", "hash_mismatch")


def _stream_stored(
    path: Path,
    info: zipfile.ZipInfo,
    sha256: str,
    size: int,
    sink: Callable[[bytes], object] | None,
) -> None:
    """Hash a stored entry straight from the file: no CRC pass, no extra copies.

    sha256 already proves the bytes, so zipfile's CRC-32 would only cost time (a quarter
    of verify on large models). The local header is parsed here to find the data.
    """
    name = info.filename
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise ArchiveError(f"local header of {name} is truncated", "truncated_archive")
        magic, *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if magic != _LOCAL_MAGIC:
            raise ArchiveError(f"bad local header for {name}")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # as zipfile decodes
        if fh.read(name_len).decode(encoding, "replace") != info.orig_filename:
            raise ArchiveError(f"local header name of {name} differs from the directory")
        fh.seek(extra_len, 1)
        digest = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        left = info.file_size
        while left:
            n = fh.readinto(view[: min(CHUNK, left)])
            if not n:
                raise ArchiveError(f"{name} is cut short", "truncated_archive")
            digest.update(view[:n])
            if sink is not None:
                sink(bytes(view[:n]))
            left -= n
    if info.file_size != size:
        raise IntegrityError(
            f"{name} has {info.file_size} bytes but the manifest declares {size}", "size_mismatch"
        )
    if digest.hexdigest() != sha256:
        raise IntegrityError(f"{name} does not match its sha256 in the manifest", "hash_mismatch")


def check_file_list(found: Mapping[str, zipfile.ZipInfo], manifest: Manifest) -> None:
    """The archive must hold exactly the manifest's files, besides manifest and signatures.

    Raises:
        IntegrityError: ``missing_file`` or ``unexpected_file``.
    """
    if manifest.model not in manifest.files:
        raise IntegrityError(f"model file {manifest.model} is not in the manifest", "missing_file")
    present = {n for n in found if n != MANIFEST_NAME and not n.startswith(SIGNATURE_DIR)}
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise IntegrityError(
            f"file {missing[0]} is in the manifest but not in the bundle", "missing_file"
        )
    extra = sorted(present - set(manifest.files))
    if extra:
        raise IntegrityError(
            f"file {extra[0]} is in the bundle but not in the manifest", "unexpected_file"
        )
