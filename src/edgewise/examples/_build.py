"""Build the example bundles: real models, signed, reproducible.

| bundle              | what it is                                                  |
|---------------------|-------------------------------------------------------------|
| digits-mlp 1.0.0    | MLP on scikit-learn digits (float32)                        |
| digits-mlp 1.1.0    | the same MLP, int8 dynamic quantisation                     |
| digits-mlp 2.0.0    | "regressed": trained on 70% corrupted labels, valid, signed |
| digits-logreg 1.0.0 | logistic regression: the fallback / first cascade tier      |
| ppocr-cls 1.0.0     | PP-OCR text-direction CNN from rapidocr-onnxruntime (extra) |

Training runs once per process (cached), so test sessions that each call
`build_examples` pay for packing and signing only. Every timestamp is fixed, so the
same code and library versions give the same manifests.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgewise.examples import _models

__all__ = ["EXAMPLE_KEY_NAME", "build_examples", "example_manifests"]

EXAMPLE_KEY_NAME = "examples"


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # onnxruntime.quantization logs a pre-processing hint on the root logger at WARNING.
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


@functools.cache
def example_manifests() -> tuple[tuple[dict[str, Any], bytes], ...]:
    """Train (once per process) and describe every example model.

    Returns:
        (manifest fields without `files`, model bytes) per example, in build order;
        ppocr-cls is left out when rapidocr-onnxruntime is not installed.
    """
    with _quiet_quantizer():
        built = list(_models.digits_examples())
    ppocr = _models.ppocr_example()
    if ppocr is not None:
        built.append(ppocr)
    return tuple(built)


def _signing_key(out: Path, key_path: Path | None) -> Any:
    from edgewise.bundle import generate_keypair, load_private_key

    if key_path is None:
        key_path = out / f"{EXAMPLE_KEY_NAME}.key"
        if not key_path.exists():
            generate_keypair(EXAMPLE_KEY_NAME, out)
    return load_private_key(key_path)


def build_examples(out: Path, key_path: Path | None = None) -> dict[str, Path]:
    """Build and sign every example bundle into `out`.

    Args:
        out: Output directory (created). Bundles are written as ``NAME-VERSION.ewb``.
        key_path: Private key to sign with. When None, ``out/examples.key`` is used,
            generated on first use. Either way the signer's public key is written to
            ``out/examples.pub`` so callers can build a trust set.

    Returns:
        ``"name@version"`` -> bundle path.
    """
    from cryptography.hazmat.primitives import serialization

    from edgewise.bundle import pack_files, sign

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = _signing_key(out, key_path)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = out / f"{EXAMPLE_KEY_NAME}.pub"
    if not pub_path.exists() or pub_path.read_bytes() != pub:
        pub_path.write_bytes(pub)
    bundles: dict[str, Path] = {}
    for fields, model_bytes in example_manifests():
        path = out / f"{fields['name']}-{fields['version']}.ewb"
        manifest = pack_files(fields, {fields["model"]: model_bytes}, path)
        sign(path, key, check_files=False)  # just written from these bytes
        bundles[manifest.ref] = path
    return bundles
