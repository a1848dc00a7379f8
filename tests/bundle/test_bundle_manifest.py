from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import edgewise.bundle as bundle_pkg
from edgewise.bundle import Manifest
from edgewise.bundle._schema import manifest_json_schema_text

from .conftest import EDGEWISE, TINY_MANIFEST

REPO = Path(__file__).resolve().parents[2]


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(TINY_MANIFEST)
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


def test_a_minimal_manifest_validates_with_defaults() -> None:
    m = Manifest.model_validate(TINY_MANIFEST)
    assert m.ref == "tiny@1.0.0"
    assert m.health.samples == []
    assert m.files == {}


@pytest.mark.parametrize("field", ["name", "version", "format", "model", "inputs", "requires"])
def test_a_missing_required_field_is_refused(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Manifest.model_validate(_with(**{field: None}))


@pytest.mark.parametrize("version", ["1.0", "01.0.0", "1.0.0.0", "v1.0.0", "1.0.0-", ""])
def test_a_version_that_is_not_semver_is_refused(version: str) -> None:
    with pytest.raises(ValidationError, match="semantic versioning"):
        Manifest.model_validate(_with(version=version))


@pytest.mark.parametrize("version", ["0.0.1", "1.2.3-rc.1", "1.2.3+build.5", "10.20.30-alpha"])
def test_semver_prereleases_and_build_metadata_are_accepted(version: str) -> None:
    assert Manifest.model_validate(_with(version=version)).version == version


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValidationError, match="dtype"):
        Manifest.model_validate(
            _with(inputs=[{"name": "x", "dtype": "float128", "shape": ["N", 4]}])
        )


def test_an_unknown_field_is_refused_so_typos_cannot_drop_settings() -> None:
    with pytest.raises(ValidationError, match="tolerence"):
        Manifest.model_validate(_with(health={"tolerence": 0.1}))


@pytest.mark.parametrize("path", ["../x.onnx", "/abs.onnx", "a/../b", "a\\b", "signatures/x", ""])
def test_unsafe_or_reserved_file_paths_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(_with(files={path: {"sha256": "0" * 64, "size": 1}}))


def test_the_model_file_must_be_listed_when_files_are_given() -> None:
    with pytest.raises(ValidationError, match="not listed"):
        Manifest.model_validate(_with(files={"other.onnx": {"sha256": "0" * 64, "size": 1}}))


def test_shapes_take_sizes_or_symbolic_names_only() -> None:
    ok = _with(inputs=[{"name": "x", "dtype": "uint8", "shape": ["N", 3, 224, 224]}])
    assert Manifest.model_validate(ok).inputs[0].shape == ["N", 3, 224, 224]
    for shape in (["N", -1], ["bad name"], [1.5]):
        with pytest.raises(ValidationError):
            Manifest.model_validate(_with(inputs=[{"name": "x", "dtype": "uint8", "shape": shape}]))


def test_histograms_need_one_frequency_per_bin_and_increasing_edges() -> None:
    good = {"bin_edges": [0, 0.5, 1], "frequencies": [0.25, 0.75]}
    assert Manifest.model_validate(_with(reference={"features": [good]})).reference is not None
    for bad in (
        {"bin_edges": [0, 0.5, 1], "frequencies": [1.0]},
        {"bin_edges": [0, 1, 0.5], "frequencies": [0.5, 0.5]},
        {"bin_edges": [0, 1], "frequencies": [-1.0]},
    ):
        with pytest.raises(ValidationError):
            Manifest.model_validate(_with(reference={"features": [bad]}))


def test_class_prior_needs_one_value_per_label() -> None:
    with pytest.raises(ValidationError, match="class_prior"):
        Manifest.model_validate(_with(reference={"class_prior": [1.0]}))


def test_created_at_must_carry_a_timezone() -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(_with(provenance={"created_at": "2025-01-01T00:00:00"}))


def test_published_json_schema_is_current() -> None:
    published = (REPO / "docs" / "manifest.schema.json").read_text(encoding="utf-8")
    assert published == manifest_json_schema_text(), (
        "docs/manifest.schema.json is stale: run edgewise model schema -o docs/manifest.schema.json"
    )


def test_schema_check_command_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "schema.json"
    stale.write_text("{}")
    result = subprocess.run(
        [EDGEWISE, "model", "schema", "-o", str(stale), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "out of date" in result.stderr
    assert json.loads(manifest_json_schema_text())["title"] == "edgewise bundle manifest"


def test_public_names_are_exported_sorted() -> None:
    names = bundle_pkg.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    assert all(hasattr(bundle_pkg, n) for n in names)
    required = {
        "Manifest", "BundleError", "generate_keypair", "load_private_key", "load_public_key",
        "key_id", "public_key_to_b64", "public_key_from_b64", "canonical_json",
        "manifest_digest", "pack", "sign", "read_manifest", "verify", "extract", "sha256_file",
    }  # fmt: skip
    assert required <= set(names)
