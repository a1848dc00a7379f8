"""Why a bundle was refused.

Every refusal is a `BundleError` carrying a short machine-readable `reason` code and a
one-line human message; the CLI prints the message, APIs return the code.

    BundleError
    ├── SchemaError          manifest.json missing, not JSON, or breaks the schema
    ├── ArchiveError         the file is not a readable zip (truncated, corrupt)
    ├── UnsafeArchiveError   zip-slip paths, duplicate entries, sizes beyond the caps
    ├── IntegrityError       a file changed, added, removed, or larger than declared
    ├── SignatureError       unsigned, untrusted signer, bad signature, threshold not met
    └── KeyFileError         a key file is missing, malformed, or readable by others
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "BundleError",
    "IntegrityError",
    "KeyFileError",
    "SchemaError",
    "SignatureError",
    "UnsafeArchiveError",
]


class BundleError(Exception):
    """A bundle (or key) was refused.

    Attributes:
        reason: A short stable code such as ``"hash_mismatch"`` or ``"unsigned"``.
        message: The one-line human explanation (also ``str(error)``).
    """

    default_reason = "bundle_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class SchemaError(BundleError):
    """The manifest is missing, is not JSON, or does not match the schema."""

    default_reason = "schema_invalid"


class ArchiveError(BundleError):
    """The bundle file is not a readable zip archive."""

    default_reason = "corrupt_archive"


class UnsafeArchiveError(BundleError):
    """The archive tries to escape its directory or exceed the size caps."""

    default_reason = "unsafe_archive"


class IntegrityError(BundleError):
    """A file does not match the hash, size or file list the manifest declares."""

    default_reason = "integrity"


class SignatureError(BundleError):
    """The signatures do not establish trust in the manifest."""

    default_reason = "signature"


class KeyFileError(BundleError):
    """A key file cannot be used."""

    default_reason = "key_file"
