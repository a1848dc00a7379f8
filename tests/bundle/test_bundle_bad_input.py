"""Every bad input of issue 2 is refused with its own reason (API level)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgewise.bundle import (
    BundleError,
    SchemaError,
    extract,
    pack,
    pack_files,
    read_manifest,
    sign,
    verify,
)

from .conftest import TINY_MANIFEST, KeyPair, rewrite_zip


def _refused(bundle: Path, trust: list[Any], **kwargs: Any) -> BundleError:
    with pytest.raises(BundleError) as err:
        verify(bundle, trust, **kwargs)
    return err.value


def _resigned(bundle: Path, out: Path, key: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy whose manifest was edited and then signed again (a signer vouching for it)."""
    with zipfile.ZipFile(bundle) as zf:
        data = json.loads(zf.read("manifest.json"))
        sigs = tuple(n for n in zf.namelist() if n.startswith("signatures/"))
    edit(data)
    rewrite_zip(bundle, out, drop=sigs, replace={"manifest.json": json.dumps(data).encode()})
    sign(out, key, check_files=False)
    return out


def test_a_file_changed_after_signing_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    with zipfile.ZipFile(signed) as zf:
        model = bytearray(zf.read("model.onnx"))
    model[100] ^= 0x01
    bad = rewrite_zip(signed, tmp_path / "b.ewb", replace={"model.onnx": bytes(model)})
    assert _refused(bad, [alice.public]).reason == "hash_mismatch"


def test_a_file_added_after_signing_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    bad = rewrite_zip(signed, tmp_path / "b.ewb", add={"payload.sh": b"rm -rf /"})
    error = _refused(bad, [alice.public])
    assert error.reason == "unexpected_file"
    assert "payload.sh" in str(error)


def test_a_file_removed_after_signing_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    bad = rewrite_zip(signed, tmp_path / "b.ewb", drop=("extra/notes.txt",))
    assert _refused(bad, [alice.public]).reason == "missing_file"


def test_a_manifest_edited_after_signing_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    with zipfile.ZipFile(signed) as zf:
        data = json.loads(zf.read("manifest.json"))
    data["health"] = {"tolerance": 1.0}  # loosen the install gate
    bad = rewrite_zip(
        signed, tmp_path / "b.ewb", replace={"manifest.json": json.dumps(data).encode()}
    )
    assert _refused(bad, [alice.public]).reason == "bad_signature"


def test_reformatting_the_manifest_keeps_the_signature_valid(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    with zipfile.ZipFile(signed) as zf:
        data = json.loads(zf.read("manifest.json"))
    text = json.dumps(dict(reversed(list(data.items()))), indent=7)
    same = rewrite_zip(signed, tmp_path / "b.ewb", replace={"manifest.json": text.encode()})
    assert verify(same, [alice.public]).signers


def test_a_signature_by_a_key_outside_the_trust_set_is_refused(
    signed: Path, keys: Callable[[str], KeyPair]
) -> None:
    error = _refused(signed, [keys("mallory").public])
    assert error.reason == "untrusted_signer"


def test_fewer_valid_signatures_than_the_threshold_is_refused(
    signed: Path, alice: KeyPair, keys: Callable[[str], KeyPair]
) -> None:
    error = _refused(signed, [alice.public, keys("bob").public], threshold=2)
    assert error.reason == "threshold_not_met"


def test_an_unsigned_bundle_is_refused(src_dir: Path, alice: KeyPair, tmp_path: Path) -> None:
    unsigned = tmp_path / "u.ewb"
    pack(src_dir, unsigned)
    assert _refused(unsigned, [alice.public]).reason == "unsigned"


def test_a_truncated_zip_is_refused(signed: Path, alice: KeyPair, tmp_path: Path) -> None:
    data = signed.read_bytes()
    cut = tmp_path / "cut.ewb"
    cut.write_bytes(data[: len(data) // 2])
    assert _refused(cut, [alice.public]).reason == "truncated_archive"


def test_a_file_that_is_not_a_zip_is_refused(alice: KeyPair, tmp_path: Path) -> None:
    junk = tmp_path / "junk.ewb"
    junk.write_bytes(b"\x89PNG not a bundle" * 100)
    assert _refused(junk, [alice.public]).reason == "corrupt_archive"


def test_corrupt_compressed_data_is_refused(signed: Path, alice: KeyPair, tmp_path: Path) -> None:
    with zipfile.ZipFile(signed) as zf:
        info = zf.getinfo("model.onnx")
    data = bytearray(signed.read_bytes())
    # Flip bytes inside the deflated data of model.onnx (past its local header).
    start = info.header_offset + 30 + len(info.filename) + 10
    for i in range(start, start + 16):
        data[i] ^= 0xA5
    bad = tmp_path / "flipped.ewb"
    bad.write_bytes(bytes(data))
    assert _refused(bad, [alice.public]).reason == "corrupt_archive"


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt"])
def test_a_zip_slip_entry_is_refused_before_anything_is_written(
    signed: Path, alice: KeyPair, tmp_path: Path, name: str
) -> None:
    bad = rewrite_zip(signed, tmp_path / "slip.ewb", add={name: b"owned"})
    with zipfile.ZipFile(bad) as zf:
        assert name in zf.namelist()  # the archive really holds the hostile name
    assert _refused(bad, [alice.public]).reason == "unsafe_path"
    with pytest.raises(BundleError):
        extract(bad, tmp_path / "dest" / "inner", [alice.public])
    assert not (tmp_path / "dest" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "dest" / "inner").exists()


def test_a_file_larger_than_its_declared_size_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    def shrink(data: dict[str, Any]) -> None:
        data["files"]["model.onnx"]["size"] -= 1

    bad = _resigned(signed, tmp_path / "big.ewb", alice.key, shrink)
    assert _refused(bad, [alice.public]).reason == "size_exceeded"


def test_a_compression_bomb_stops_at_the_declared_size(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    # 64 MiB of zeros deflates to ~64 KiB; the signed manifest says 10 KiB.
    bomb = rewrite_zip(signed, tmp_path / "bomb0.ewb", replace={"model.onnx": bytes(64 << 20)})
    bad = _resigned(bomb, tmp_path / "bomb.ewb", alice.key, lambda d: None)
    assert bad.stat().st_size < 1 << 20
    assert _refused(bad, [alice.public]).reason == "size_exceeded"
    dest = tmp_path / "dest"
    with pytest.raises(BundleError):
        extract(bad, dest, [alice.public])
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


def test_a_bundle_declaring_more_than_the_global_cap_is_refused(
    alice: KeyPair, tmp_path: Path
) -> None:
    out = tmp_path / "huge.ewb"
    pack_files(TINY_MANIFEST, {"model.onnx": bytes(8 << 20)}, out)
    sign(out, alice.key)
    error = _refused(out, [alice.public], max_total_bytes=1 << 20)
    assert error.reason == "too_large"
    assert verify(out, [alice.public]).manifest.total_size == 8 << 20  # default cap is higher


@pytest.mark.parametrize(
    ("edit", "mentions"),
    [
        (lambda d: d.pop("name"), "name"),
        (lambda d: d.update(version="1.0"), "version"),
        (lambda d: d["inputs"][0].update(dtype="complex256"), "dtype"),
    ],
    ids=["missing-field", "bad-semver", "unknown-dtype"],
)
def test_a_manifest_that_breaks_the_schema_is_refused(
    src_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any], mentions: str
) -> None:
    data = json.loads((src_dir / "manifest.json").read_text())
    edit(data)
    (src_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SchemaError) as err:
        pack(src_dir, tmp_path / "x.ewb")
    assert err.value.reason == "schema_invalid"
    assert mentions in str(err.value)
    assert "\n" not in str(err.value)


def test_a_signed_bundle_whose_manifest_breaks_the_schema_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    bad = rewrite_zip(
        signed, tmp_path / "b.ewb", replace={"manifest.json": b'{"name": "x", "version": "1"}'}
    )
    assert _refused(bad, [alice.public]).reason == "schema_invalid"
    with pytest.raises(SchemaError):
        read_manifest(bad)


def test_a_manifest_that_is_not_json_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    bad = rewrite_zip(signed, tmp_path / "b.ewb", replace={"manifest.json": b"{not json"})
    assert _refused(bad, [alice.public]).reason == "bad_json"
    deep = b"[" * 100_000 + b"]" * 100_000  # nesting past the parser's recursion limit
    bad = rewrite_zip(signed, tmp_path / "c.ewb", replace={"manifest.json": deep})
    assert _refused(bad, [alice.public]).reason == "bad_json"


def _with_manifest_edit(bundle: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy whose manifest was edited, keeping its signatures.

    No signer can vouch for these edits: the manifest has no canonical bytes to sign.
    """
    with zipfile.ZipFile(bundle) as zf:
        data = json.loads(zf.read("manifest.json"))
    edit(data)
    return rewrite_zip(bundle, out, replace={"manifest.json": json.dumps(data).encode()})


def _huge_size(m: dict[str, Any]) -> None:
    m["files"]["model.onnx"]["size"] = 10**30  # beyond what a double holds exactly


def _lone_surrogate(m: dict[str, Any]) -> None:
    m["description"] = "\ud800"  # json.dumps writes it as the escape JSON allows


@pytest.mark.parametrize(
    ("edit", "why"),
    [(_huge_size, "beyond the exactly representable range"), (_lone_surrogate, "lone surrogate")],
    ids=["huge_int", "lone_surrogate"],
)
def test_a_manifest_without_a_canonical_form_is_refused_as_a_schema_error(
    signed: Path,
    alice: KeyPair,
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None],
    why: str,
) -> None:
    bad = _with_manifest_edit(signed, tmp_path / "b.ewb", edit)
    error = _refused(bad, [alice.public])
    assert isinstance(error, SchemaError) and error.reason == "schema_invalid"
    assert why in error.message
    with pytest.raises(SchemaError):
        read_manifest(bad)  # what `model inspect` reads


def test_signing_with_a_key_file_readable_by_others_is_refused(
    src_dir: Path, alice: KeyPair, tmp_path: Path
) -> None:
    out = tmp_path / "t.ewb"
    pack(src_dir, out)
    alice.key.chmod(0o644)
    with pytest.raises(BundleError) as err:
        sign(out, alice.key)
    assert err.value.reason == "key_permissions"
    with zipfile.ZipFile(out) as zf:
        assert not any(n.startswith("signatures/") for n in zf.namelist())


def test_a_signed_manifest_without_its_model_file_is_refused(
    src_dir: Path, alice: KeyPair, tmp_path: Path
) -> None:
    out = tmp_path / "t.ewb"
    pack(src_dir, out)
    bad = _resigned(out, tmp_path / "b.ewb", alice.key, lambda d: d.update(files={}))
    with zipfile.ZipFile(bad) as zf:
        names = tuple(n for n in zf.namelist() if not n.startswith(("signatures/", "manifest")))
    bare = rewrite_zip(bad, tmp_path / "bare.ewb", drop=names)
    assert _refused(bare, [alice.public]).reason == "missing_file"


def test_an_archive_with_too_many_entries_is_refused(
    signed: Path, alice: KeyPair, tmp_path: Path
) -> None:
    many = {f"f/{i}": b"" for i in range(10_001)}
    bad = rewrite_zip(signed, tmp_path / "many.ewb", add=many)
    assert _refused(bad, [alice.public]).reason == "too_many_entries"
