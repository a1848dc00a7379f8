"""Manifests whose numbers are not numbers, and names one file on a case-insensitive disk."""

from __future__ import annotations

import copy
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from edgewise.bundle import (
    SchemaError,
    extract,
    key_id,
    load_private_key,
    manifest_digest,
    verify,
)
from edgewise.bundle._zip import validate_manifest

from .conftest import TINY_MANIFEST, KeyPair

MODEL = b"m" * 10


def _bundle(out: Path, key: Path, files: dict[str, bytes], written: Any = None) -> Path:
    """A bundle signed over a manifest of `files`; manifest.json is `written` when given.

    Signed by hand, with no help (or check) from `pack`.
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
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        body = written(copy.deepcopy(manifest)) if written else manifest
        zf.writestr("manifest.json", json.dumps(body))
        zf.writestr(f"signatures/{key_id(signer)}.sig", signature)
    return out


# -- numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["10", True, 10.0])
def test_a_file_size_that_is_not_an_integer_is_a_schema_error_naming_it(
    alice: KeyPair, tmp_path: Path, size: Any
) -> None:
    # Before: "10" (and 10.0) were read as 10, so a manifest.json holding a string where
    # the publisher signed a number still verified: the signatures cover the parsed
    # manifest. true was read as 1.
    def as_given(manifest: dict[str, Any]) -> dict[str, Any]:
        manifest["files"]["model.onnx"]["size"] = size
        return manifest

    bad = _bundle(tmp_path / "bad.ewb", alice.key, {"model.onnx": MODEL}, as_given)
    with pytest.raises(SchemaError) as err:
        verify(bad, [alice.public])
    assert err.value.reason == "schema_invalid"
    assert "files.model.onnx.size" in err.value.message
    with pytest.raises(SchemaError):
        extract(bad, tmp_path / "dest", [alice.public])
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("requires", "min_opset"), "17"),
        (("requires", "memory_mb"), True),
        (("label_schema", "version"), True),
        (("label_schema", "version"), 1.0),
        (("inputs", 0, "shape", 1), True),
        (("inputs", 0, "shape", 1), "4"),
        (("manifest_version",), True),
        (("health", "tolerance"), "0.1"),
        (("health", "tolerance"), True),
    ],
)
def test_every_number_of_the_manifest_is_a_json_number(path: tuple[Any, ...], value: Any) -> None:
    data = copy.deepcopy(TINY_MANIFEST) | {"health": {}}
    at: Any = data
    for step in path[:-1]:
        at = at[step]
    at[path[-1]] = value
    with pytest.raises(SchemaError) as err:
        validate_manifest(data)
    assert ".".join(str(p) for p in path) in err.value.message, err.value.message


def test_integers_and_fractions_where_they_belong_still_validate() -> None:
    data = copy.deepcopy(TINY_MANIFEST) | {"health": {"tolerance": 0, "max_latency_ms": 5}}
    manifest = validate_manifest(data)
    assert manifest.health.tolerance == 0.0 and manifest.requires.min_opset == 17


# -- names one file on a case-insensitive, normalising filesystem --------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("model.onnx", "Model.onnx"),
        ("extra/notes.txt", "EXTRA/Notes.TXT"),
        ("caf\u00e9.txt", "cafe\u0301.txt"),  # composed, decomposed
        ("stra\u00dfe", "STRASSE"),  # full case folding: more than vfat folds
    ],
)
def test_names_that_differ_only_by_case_or_normalisation_are_refused_naming_both(
    alice: KeyPair, tmp_path: Path, first: str, second: str
) -> None:
    # Before: both unpacked on ext4; on a vfat SD card (or exFAT, APFS) the second
    # overwrote the first, so the model on disk was not the one verified.
    files = {"model.onnx": MODEL, first: b"one", second: b"two"}
    bad = _bundle(tmp_path / "case.ewb", alice.key, files)
    with pytest.raises(SchemaError) as err:
        verify(bad, [alice.public])
    assert repr(first) in err.value.message and repr(second) in err.value.message
    assert "differ only by case or Unicode normalisation" in err.value.message
    dest = tmp_path / "dest"
    with pytest.raises(SchemaError):
        extract(bad, dest, [alice.public])
    assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("MANIFEST.json", "'manifest.json'"),
        ("Signatures/extra.sig", "'signatures/'"),
        ("W", "'w'"),  # a file, and the folder of w/a
    ],
)
def test_a_name_that_meets_a_reserved_name_or_a_folder_on_such_a_disk_is_refused(
    alice: KeyPair, tmp_path: Path, name: str, named: str
) -> None:
    files = {"model.onnx": MODEL, name: b"x", "w/a": b"y"}
    bad = _bundle(tmp_path / "reserved.ewb", alice.key, files)
    with pytest.raises(SchemaError) as err:
        verify(bad, [alice.public])
    assert repr(name) in err.value.message and named in err.value.message, err.value.message


def test_names_distinct_on_every_disk_still_verify(alice: KeyPair, tmp_path: Path) -> None:
    files = {"model.onnx": MODEL, "model.onnx.txt": b"a", "Models/a": b"b", "models/b": b"c"}
    good = _bundle(tmp_path / "ok.ewb", alice.key, files)
    assert sorted(verify(good, [alice.public]).manifest.files) == sorted(files)
