"""Model bundles (``.ewb``): manifest schema, pack, sign, verify, extract.

A bundle is a zip holding ``manifest.json``, the model files, and detached Ed25519
signatures ``signatures/<keyid>.sig`` over the sha256 of the canonical manifest bytes.
Trust sets are plain ``dict[key id, Ed25519PublicKey]`` (see `trust_set`); every function
that takes one also accepts any iterable of public keys. Every refusal raises a
`BundleError` whose ``.reason`` is a short stable code.

Example:
    >>> from pathlib import Path
    >>> from edgewise import bundle
    >>> key_file, pub_file = bundle.generate_keypair("release", Path("keys"))
    >>> manifest = bundle.pack(Path("my-model"), Path("my-model.ewb"))  # fills hashes
    >>> kid = bundle.sign(Path("my-model.ewb"), key_file)
    >>> trust = bundle.trust_set([bundle.load_public_key(pub_file)])
    >>> checked = bundle.verify(Path("my-model.ewb"), trust, threshold=1)
    >>> checked.signers == (kid,)
    True
    >>> bundle.extract(Path("my-model.ewb"), Path("unpacked"), trust).ref
    'my-model@1.0.0'
"""

from __future__ import annotations

from edgewise.bundle._canonical import canonical_json, manifest_digest
from edgewise.bundle._errors import (
    ArchiveError,
    BundleError,
    IntegrityError,
    KeyFileError,
    SchemaError,
    SignatureError,
    UnsafeArchiveError,
)
from edgewise.bundle._keys import (
    TrustSet,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_b64,
    public_key_to_b64,
    trust_set,
    verify_signature,
)
from edgewise.bundle._manifest import (
    DType,
    FileEntry,
    Health,
    HealthSample,
    Histogram,
    LabelSchema,
    Manifest,
    ModelFormat,
    Provenance,
    Reference,
    Requires,
    TensorSpec,
)
from edgewise.bundle._pack import pack, pack_files, sha256_file, sign
from edgewise.bundle._schema import manifest_json_schema
from edgewise.bundle._verify import (
    DEFAULT_MAX_TOTAL_BYTES,
    VerifiedBundle,
    evaluate_signatures,
    extract,
    read_manifest,
    trusted_manifest,
    verify,
)

__all__ = [
    "DEFAULT_MAX_TOTAL_BYTES",
    "ArchiveError",
    "BundleError",
    "DType",
    "FileEntry",
    "Health",
    "HealthSample",
    "Histogram",
    "IntegrityError",
    "KeyFileError",
    "LabelSchema",
    "Manifest",
    "ModelFormat",
    "Provenance",
    "Reference",
    "Requires",
    "SchemaError",
    "SignatureError",
    "TensorSpec",
    "TrustSet",
    "UnsafeArchiveError",
    "VerifiedBundle",
    "canonical_json",
    "evaluate_signatures",
    "extract",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "manifest_digest",
    "manifest_json_schema",
    "pack",
    "pack_files",
    "public_key_from_b64",
    "public_key_to_b64",
    "read_manifest",
    "sha256_file",
    "sign",
    "trust_set",
    "trusted_manifest",
    "verify",
    "verify_signature",
]
