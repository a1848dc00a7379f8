"""Bundles an attacker (or a careless packer) built by hand: refused with a reason, never half
unpacked, and never trusted for bytes other than the ones verified."""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

from edgewise.bundle import (
    BundleError,
    SchemaError,
    extract,
    key_id,
    load_private_key,
    manifest_digest,
    trusted_manifest,
    verify,
)

from .conftest import TINY_MANIFEST, KeyPair


def _hand_built(
    out: Path,
    key: Path,
    files: dict[str, bytes],
    *,
    entries: list[tuple[str, bytes]] | None = None,
    compress: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """A bundle written entry by entry and signed, with no help (or check) from `pack`.

    `files` go into the signed manifest; `entries` (default: the same) into the archive.
    """
    manifest: dict[str, Any] = {
        **TINY_MANIFEST,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in files.items()
        },
    }
    signer = load_private_key(key)
    signature = signer.sign(bytes.fromhex(manifest_digest(manifest)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: wanted here
        with zipfile.ZipFile(out, "w", compress) as zf:
            for name, data in entries if entries is not None else list(files.items()):
                zf.writestr(name, data)
            zf.writestr("manifest.json", json.dumps(manifest))
            zf.writestr(f"signatures/{key_id(signer)}.sig", signature)
    return out


def test_a_signed_file_list_holding_a_file_and_a_folder_of_the_same_name_is_refused(
    alice: KeyPair, tmp_path: Path
) -> None:
    files = {"model.onnx": b"m" * 100, "x": b"a file", "x/y": b"a file in folder x"}
    bad = _hand_built(tmp_path / "clash.ewb", alice.key, files)
    with pytest.raises(SchemaError) as err:
        verify(bad, [alice.public])
    assert "'x' is both a file and a directory" in err.value.message
    dest = tmp_path / "dest"
    with pytest.raises(SchemaError):  # was FileExistsError halfway: "storage error" on a device
        extract(bad, dest, [alice.public])
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_a_deeper_file_and_folder_clash_is_refused_too(alice: KeyPair, tmp_path: Path) -> None:
    files = {"model.onnx": b"m", "w/a": b"1", "w/a/b/c": b"2"}
    bad = _hand_built(tmp_path / "clash.ewb", alice.key, files)
    with pytest.raises(SchemaError, match="'w/a' is both a file and a directory"):
        trusted_manifest(bad, [alice.public])


def test_folders_shared_by_several_files_are_fine(alice: KeyPair, tmp_path: Path) -> None:
    files = {"model.onnx": b"m", "w/a": b"1", "w/b/c": b"2", "w/b/d": b"3"}
    good = _hand_built(tmp_path / "ok.ewb", alice.key, files)
    assert sorted(verify(good, [alice.public]).manifest.files) == sorted(files)


@pytest.mark.parametrize("keep", ["first", "last"])
def test_an_archive_holding_a_signed_file_twice_is_refused_whichever_copy_is_good(
    alice: KeyPair, tmp_path: Path, keep: str
) -> None:
    good, evil = b"m" * 100, b"e" * 100
    twice = [("model.onnx", good), ("model.onnx", evil)]
    bad = _hand_built(
        tmp_path / "twice.ewb",
        alice.key,
        {"model.onnx": good},
        entries=twice if keep == "first" else twice[::-1],
    )
    with pytest.raises(BundleError) as err:
        verify(bad, [alice.public])
    assert err.value.reason == "duplicate_entry"
    with pytest.raises(BundleError):
        extract(bad, tmp_path / "dest", [alice.public])
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_local_header_naming_another_file_than_the_directory_is_refused(
    alice: KeyPair, tmp_path: Path, compress: int
) -> None:
    bad = _hand_built(
        tmp_path / "split.ewb", alice.key, {"model.onnx": b"m" * 1000}, compress=compress
    )
    data = bytearray(bad.read_bytes())
    at = data.index(b"PK\x03\x04")  # the first local header: model.onnx's
    name_at = at + 30
    assert bytes(data[name_at : name_at + 10]) == b"model.onnx"
    data[name_at : name_at + 10] = b"evil.onnxx"  # what a lenient unzip would create
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        verify(bad, [alice.public])
    assert err.value.reason == "corrupt_archive"
    with pytest.raises(BundleError):
        extract(bad, tmp_path / "dest", [alice.public])
    assert not (tmp_path / "dest").exists()


def test_trusted_manifest_checks_signatures_and_the_file_list_but_not_the_bytes(
    alice: KeyPair, keys: Any, tmp_path: Path
) -> None:
    listed = {"model.onnx": b"m" * 100}
    changed = _hand_built(
        tmp_path / "changed.ewb", alice.key, listed, entries=[("model.onnx", b"x" * 100)]
    )
    assert trusted_manifest(changed, [alice.public]).files.keys() == {"model.onnx"}
    with pytest.raises(BundleError) as err:  # the bytes are `verify`'s and `extract`'s
        verify(changed, [alice.public])
    assert err.value.reason == "hash_mismatch"
    with pytest.raises(BundleError) as err:
        trusted_manifest(changed, [keys("mallory").public])
    assert err.value.reason == "untrusted_signer"
    extra = _hand_built(
        tmp_path / "extra.ewb", alice.key, listed, entries=[*listed.items(), ("run.sh", b"")]
    )
    with pytest.raises(BundleError) as err:
        trusted_manifest(extra, [alice.public])
    assert err.value.reason == "unexpected_file"


@pytest.mark.parametrize(
    "name",
    ["n" * 256, "/".join(["d" * 250] * 20), "é" * 128],
    ids=["name-over-255-bytes", "path-over-4096-bytes", "multibyte-name-over-255-bytes"],
)
def test_a_signed_file_name_no_filesystem_can_hold_is_refused_before_unpacking(
    alice: KeyPair, tmp_path: Path, name: str
) -> None:
    bad = _hand_built(tmp_path / "long.ewb", alice.key, {"model.onnx": b"m", name: b"x"})
    with pytest.raises(BundleError, match="too long") as err:
        verify(bad, [alice.public])
    assert err.value.reason == "unsafe_path"
    dest = tmp_path / "dest"
    with pytest.raises(BundleError):  # was ENAMETOOLONG halfway: "storage error" on a device
        extract(bad, dest, [alice.public])
    assert not dest.exists()


def test_names_up_to_the_limits_unpack(alice: KeyPair, tmp_path: Path) -> None:
    name = "/".join(["d" * 254] * 4) + "/" + "f" * 4  # 255 bytes a name at most, 1024 in all
    assert len(name) == 1024
    good = _hand_built(tmp_path / "ok.ewb", alice.key, {"model.onnx": b"m", name: b"x"})
    extract(good, tmp_path / "dest", [alice.public])
    assert (tmp_path / "dest" / name).read_bytes() == b"x"
