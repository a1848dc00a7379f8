"""The example bundles: built once per session, verified, unpacked and health-checked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.bundle import Manifest, extract, key_id, load_public_key, read_manifest, verify
from edgewise.examples import build_examples, ppocr_model_path

from .conftest import EDGEWISE, Examples, KeyPair

EXPECTED = {"digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-mlp@2.0.0", "digits-logreg@1.0.0"}


def _health_worst_diff(model_dir: Path, manifest: Manifest) -> float:
    session = ort.InferenceSession(
        str(model_dir / manifest.model), providers=["CPUExecutionProvider"]
    )
    dtypes = {t.name: t.dtype.value for t in manifest.inputs}
    worst = 0.0
    for sample in manifest.health.samples:
        feeds = {k: np.asarray(v, dtype=dtypes[k]) for k, v in sample.input.items()}
        names = list(sample.expected)
        for name, got in zip(names, session.run(names, feeds), strict=True):
            want = np.asarray(sample.expected[name], dtype=np.float64)
            assert np.asarray(got).shape == want.shape
            worst = max(worst, float(np.abs(np.asarray(got, np.float64) - want).max()))
    return worst


def test_all_example_bundles_are_built(examples: Examples) -> None:
    assert set(examples.bundles) >= EXPECTED
    if ppocr_model_path() is not None:
        assert "ppocr-cls@1.0.0" in examples.bundles


def test_every_example_bundle_verifies_against_the_examples_key(examples: Examples) -> None:
    trust = [load_public_key(examples.pub)]
    for path in examples.bundles.values():
        assert verify(path, trust).signers == (key_id(trust[0]),)


def test_onnxruntime_reproduces_every_health_sample_from_an_unpacked_bundle(
    examples: Examples, tmp_path: Path
) -> None:
    trust = [load_public_key(examples.pub)]
    for ref, path in examples.bundles.items():
        dest = tmp_path / ref
        manifest = extract(path, dest, trust, fsync=False)
        assert manifest.health.samples, ref
        assert manifest.health.max_latency_ms is not None
        assert _health_worst_diff(dest, manifest) <= manifest.health.tolerance, ref


def test_digits_manifests_carry_labels_reference_and_provenance(examples: Examples) -> None:
    for ref in EXPECTED:
        m = read_manifest(examples.bundles[ref])
        assert m.labels == [str(i) for i in range(10)]
        assert m.label_schema is not None and (m.label_schema.id, m.label_schema.version) == (
            "digits",
            1,
        )
        assert m.inputs[0].shape == ["N", 64]
        assert {o.name for o in m.outputs} == {"label", "probabilities"}
        assert m.requires.runtime == "onnxruntime" and m.requires.min_opset == 17
        assert m.requires.memory_mb and m.requires.accelerators == []
        assert m.preprocess["scale"] == 1 / 16
        assert len(m.health.samples) == 10
        assert m.reference is not None and len(m.reference.features) == 64
        assert all(f.bin_edges[0] == 0 and f.bin_edges[-1] == 1 for f in m.reference.features)
        assert sum(m.reference.class_prior) == pytest.approx(1, abs=1e-4)
        assert m.reference.confidence is not None
        assert sum(m.reference.confidence.frequencies) == pytest.approx(1, abs=1e-4)
        p = m.provenance
        assert p.dataset_sha256 and p.training_code and p.creator and p.created_at
        assert 0 < p.metrics["accuracy"] <= 1 and p.metrics["size_bytes"] > 0


def test_the_int8_variant_is_smaller_and_as_accurate_and_the_regressed_one_is_worse(
    examples: Examples,
) -> None:
    metrics = {ref: read_manifest(p).provenance.metrics for ref, p in examples.bundles.items()}
    base, int8, bad = (metrics[f"digits-mlp@{v}"] for v in ("1.0.0", "1.1.0", "2.0.0"))
    assert base["accuracy"] > 0.95
    assert int8["size_bytes"] < base["size_bytes"] / 2
    assert int8["accuracy"] >= base["accuracy"] - 0.02
    assert bad["accuracy"] < base["accuracy"] - 0.2
    assert metrics["digits-logreg@1.0.0"]["accuracy"] > 0.9


def test_ppocr_cls_wraps_the_shipped_classifier(examples: Examples) -> None:
    if ppocr_model_path() is None:
        pytest.skip("rapidocr-onnxruntime (the ocr extra) is not installed")
    m = read_manifest(examples.bundles["ppocr-cls@1.0.0"])
    assert m.inputs[0].shape == ["N", 3, 48, 192] and m.inputs[0].dtype == "float32"
    assert m.labels == ["0", "180"] and m.health.tolerance == 1e-4
    assert len(m.health.samples) >= 3


def test_rebuilding_gives_the_same_manifests(examples: Examples, tmp_path: Path) -> None:
    again = build_examples(tmp_path / "again")
    for ref, path in again.items():
        assert read_manifest(path) == read_manifest(examples.bundles[ref])


def test_examples_build_cli_signs_with_a_given_key(alice: KeyPair, tmp_path: Path) -> None:
    out = tmp_path / "ex"
    result = subprocess.run(
        [EDGEWISE, "examples", "build", "--out", str(out), "--key", str(alice.key), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["key_id"] == key_id(alice.public)
    refs = {b["ref"] for b in report["bundles"]}
    assert refs >= EXPECTED
    for row in report["bundles"]:
        assert verify(Path(row["path"]), [alice.public]).manifest.ref == row["ref"]
    assert not (out / "examples.key").exists()
