from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgewise.bundle import (
    BundleError,
    Manifest,
    SignatureError,
    extract,
    key_id,
    manifest_digest,
    pack,
    pack_files,
    read_manifest,
    sha256_file,
    sign,
    trust_set,
    verify,
)
from edgewise.bundle._pack import STORE_THRESHOLD

from .conftest import TINY_MANIFEST, KeyPair


def test_pack_fills_in_sha256_and_size_of_every_file(src_dir: Path, tmp_path: Path) -> None:
    manifest = pack(src_dir, tmp_path / "t.ewb")
    assert set(manifest.files) == {"model.onnx", "extra/notes.txt"}
    entry = manifest.files["model.onnx"]
    assert entry.sha256 == sha256_file(src_dir / "model.onnx")
    assert entry.size == (src_dir / "model.onnx").stat().st_size
    assert read_manifest(tmp_path / "t.ewb") == manifest


def test_pack_overrides_stale_hashes_in_the_source_manifest(src_dir: Path, tmp_path: Path) -> None:
    stale = {**TINY_MANIFEST, "files": {"model.onnx": {"sha256": "0" * 64, "size": 1}}}
    (src_dir / "manifest.json").write_text(json.dumps(stale))
    assert pack(src_dir, tmp_path / "t.ewb").files["model.onnx"].size == 10240


def test_packing_is_reproducible_byte_for_byte(src_dir: Path, tmp_path: Path) -> None:
    pack(src_dir, tmp_path / "a.ewb")
    pack(src_dir, tmp_path / "b.ewb")
    assert sha256_file(tmp_path / "a.ewb") == sha256_file(tmp_path / "b.ewb")


def test_round_trip_pack_sign_verify_extract(signed: Path, alice: KeyPair, tmp_path: Path) -> None:
    checked = verify(signed, [alice.public])
    assert checked.signers == (key_id(alice.public),)
    assert checked.manifest.ref == "tiny@1.0.0"
    assert checked.digest == manifest_digest(read_manifest(signed))
    dest = tmp_path / "unpacked"
    manifest = extract(signed, dest, trust_set([alice.public]))
    assert (dest / "extra" / "notes.txt").read_text() == "calibrated on site 12\n"
    assert sha256_file(dest / "model.onnx") == manifest.files["model.onnx"].sha256
    # The unpacked manifest is the signed one.
    on_disk = Manifest.model_validate_json((dest / "manifest.json").read_text())
    assert manifest_digest(on_disk) == checked.digest


def test_signatures_live_in_signatures_keyid_sig(signed: Path, alice: KeyPair) -> None:
    with zipfile.ZipFile(signed) as zf:
        assert f"signatures/{key_id(alice.public)}.sig" in zf.namelist()
        assert len(zf.read(f"signatures/{key_id(alice.public)}.sig")) == 64


def test_several_signatures_meet_a_threshold(
    signed: Path, alice: KeyPair, keys: Callable[[str], KeyPair]
) -> None:
    bob, carol = keys("bob"), keys("carol")
    sign(signed, bob.key)
    trust = [alice.public, bob.public, carol.public]
    assert len(verify(signed, trust, threshold=2).signers) == 2
    with pytest.raises(SignatureError) as err:
        verify(signed, trust, threshold=3)
    assert err.value.reason == "threshold_not_met"


def test_signing_again_with_the_same_key_replaces_its_signature(
    signed: Path, alice: KeyPair
) -> None:
    sign(signed, alice.key)
    with zipfile.ZipFile(signed) as zf:
        assert sum(n.startswith("signatures/") for n in zf.namelist()) == 1
    assert verify(signed, [alice.public]).signers


def test_sign_refuses_a_bundle_whose_files_already_differ(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    from .conftest import rewrite_zip

    bad = rewrite_zip(signed, tmp_path / "bad.ewb", replace={"model.onnx": b"other"})
    with pytest.raises(BundleError) as err:
        sign(bad, alice.key)
    assert err.value.reason == "size_mismatch"


def test_large_files_are_stored_small_files_deflated(tmp_path: Path) -> None:
    big = b"\0" * (STORE_THRESHOLD + 1)
    out = tmp_path / "big.ewb"
    pack_files({**TINY_MANIFEST}, {"model.onnx": big, "small.txt": b"x" * 1000}, out)
    with zipfile.ZipFile(out) as zf:
        assert zf.getinfo("model.onnx").compress_type == zipfile.ZIP_STORED
        assert zf.getinfo("small.txt").compress_type == zipfile.ZIP_DEFLATED


def test_extract_refuses_a_non_empty_destination(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError) as err:
        extract(signed, dest, [alice.public])
    assert err.value.reason == "dest_not_empty"
    assert (dest / "keep.txt").read_text() == "mine"


def test_extracted_files_are_readable_not_secret(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    extract(signed, dest, [alice.public], fsync=False)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_pack_refuses_a_source_without_manifest_or_with_symlinks(
    tmp_path: Path, src_dir: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError) as err:
        pack(empty, tmp_path / "x.ewb")
    assert err.value.reason == "missing_manifest"
    (src_dir / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError) as err:
        pack(src_dir, tmp_path / "x.ewb")
    assert err.value.reason == "bad_source"
    assert not (tmp_path / "x.ewb").exists()


def test_large_stored_files_are_checked_byte_for_byte(alice: KeyPair, tmp_path: Path) -> None:
    payload = os.urandom(STORE_THRESHOLD + 4096)
    out = tmp_path / "big.ewb"
    pack_files(TINY_MANIFEST, {"model.onnx": payload}, out)
    sign(out, alice.key)
    extract(out, tmp_path / "ok", [alice.public], fsync=False)
    assert (tmp_path / "ok" / "model.onnx").read_bytes() == payload

    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("model.onnx")
    raw = bytearray(out.read_bytes())
    raw[info.header_offset + 30 + len("model.onnx") + 5000] ^= 0x01  # inside the data
    flipped = tmp_path / "flipped.ewb"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(BundleError) as err:
        verify(flipped, [alice.public])
    assert err.value.reason == "hash_mismatch"
    with pytest.raises(BundleError) as err:
        extract(flipped, tmp_path / "bad", [alice.public])
    assert err.value.reason == "hash_mismatch"
    assert not (tmp_path / "bad").exists()
