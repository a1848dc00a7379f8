"""Fixtures for bundle tests: keys, a small packed bundle, the example bundles (once)."""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.bundle import generate_keypair, load_public_key, pack, sign
from edgewise.examples import EXAMPLE_KEY_NAME, build_examples

EDGEWISE = str(Path(sys.executable).parent / "edgewise")

TINY_MANIFEST = {
    "name": "tiny",
    "version": "1.0.0",
    "format": "onnx",
    "model": "model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
    "labels": ["a", "b"],
    "label_schema": {"id": "ab", "version": 1},
    "requires": {"runtime": "onnxruntime", "min_opset": 17, "memory_mb": 16},
}


@dataclass(frozen=True)
class KeyPair:
    key: Path
    pub: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return load_public_key(self.pub)


@pytest.fixture
def keys(tmp_path: Path) -> Callable[[str], KeyPair]:
    """Make a named key pair in a per-test key directory."""
    directory = tmp_path / "keys"

    def make(name: str) -> KeyPair:
        return KeyPair(*generate_keypair(name, directory))

    return make


@pytest.fixture
def alice(keys: Callable[[str], KeyPair]) -> KeyPair:
    return keys("alice")


@pytest.fixture
def src_dir(tmp_path: Path) -> Path:
    """A bundle source directory: manifest.json without hashes, plus two files."""
    src = tmp_path / "src"
    (src / "extra").mkdir(parents=True)
    (src / "manifest.json").write_text(json.dumps(TINY_MANIFEST))
    (src / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (src / "extra" / "notes.txt").write_text("calibrated on site 12\n")
    return src


@pytest.fixture
def signed(tmp_path: Path, src_dir: Path, alice: KeyPair) -> Path:
    """A packed bundle signed by alice."""
    out = tmp_path / "tiny.ewb"
    pack(src_dir, out)
    sign(out, alice.key)
    return out


def rewrite_zip(
    src: Path,
    dst: Path,
    *,
    drop: tuple[str, ...] = (),
    replace: Mapping[str, bytes] | None = None,
    add: Mapping[str, bytes] | None = None,
) -> Path:
    """Copy a zip entry by entry, dropping, replacing or adding entries."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.pop(info.filename, None)
            zout.writestr(info, zin.read(info) if data is None else data)
        for name, data in {**replace, **(add or {})}.items():
            zout.writestr(name, data)
    return dst


@dataclass(frozen=True)
class Examples:
    bundles: dict[str, Path]
    pub: Path
    out: Path


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Examples:
    """The example bundles, built once per test session."""
    out = tmp_path_factory.mktemp("examples")
    bundles = build_examples(out)
    return Examples(bundles, out / f"{EXAMPLE_KEY_NAME}.pub", out)
