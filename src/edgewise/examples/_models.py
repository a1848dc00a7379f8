"""Manifests for the example models: health samples, drift reference, provenance.

Everything here is derived from the models and data themselves (onnxruntime runs for
expected outputs, the training split for reference statistics), with fixed seeds and a
fixed `created_at`, so rebuilding gives the same manifests.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.drift import DEFAULT_CONFIDENCE_EDGES, saturating_edges
from edgewise.examples import _digits

__all__ = [
    "CREATED_AT",
    "CREATOR",
    "DIGITS_PREPROCESS",
    "PPOCR_CLS_FILE",
    "digits_examples",
    "ppocr_example",
    "ppocr_model_path",
]

CREATED_AT = "2025-01-01T00:00:00Z"
CREATOR = "edgewise examples build"
HEALTH_SAMPLES = 10
# Pixel intensity in [0, 1]: background sits exactly at 0 and strokes saturate at 1, so
# both ends get a bin of their own (a brightness shift moves mass through exactly those).
FEATURE_BIN_EDGES = [round(e, 9) for e in saturating_edges(0.0, 1.0, 8)]
# Top-1 confidences crowd near 1: finer bins there.
CONFIDENCE_BIN_EDGES = list(DEFAULT_CONFIDENCE_EDGES)
DIGITS_PREPROCESS: dict[str, Any] = {
    "kind": "scale",
    "scale": 1 / 16,
    "offset": 0.0,
    "source": "8x8 grayscale image, values 0..16, row-major",
    "flatten": True,
    "dtype": "float32",
}
PPOCR_CLS_FILE = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
PPOCR_SHAPE = (1, 3, 48, 192)


def _round(values: npt.NDArray[Any], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in np.asarray(values).ravel()]


def _histogram(
    values: npt.NDArray[Any], edges: list[float], name: str | None = None
) -> dict[str, Any]:
    counts, _ = np.histogram(values, bins=np.asarray(edges))
    hist: dict[str, Any] = {"bin_edges": edges, "frequencies": _round(counts / max(len(values), 1))}
    if name is not None:
        hist["name"] = name
    return hist


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _opset(model: bytes) -> int:
    import onnx

    proto = onnx.load_from_string(model)
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _memory_mb(model: bytes) -> int:
    # Weights plus the runtime's own arena, rounded up to a power of two for headroom.
    need = 24 + 4 * len(model) / 2**20
    return int(2 ** math.ceil(math.log2(need)))


def _digits_health(model: bytes, split: _digits.DigitsSplit, tolerance: float) -> dict[str, Any]:
    sess = _session(model)
    samples = []
    for row in split.x_test[:HEALTH_SAMPLES]:
        x = row.reshape(1, -1).astype(np.float32)
        label, probs = sess.run(["label", "probabilities"], {"input": x})
        samples.append(
            {
                "input": {"input": [[float(v) for v in x[0]]]},
                "expected": {
                    "label": [int(v) for v in np.asarray(label).ravel()],
                    "probabilities": [[float(v) for v in np.asarray(probs)[0]]],
                },
            }
        )
    return {"samples": samples, "tolerance": tolerance, "max_latency_ms": 50.0}


def _digits_reference(model: bytes, split: _digits.DigitsSplit) -> dict[str, Any]:
    # Confidence comes from held-out data: on its own training data a model is more
    # confident than it will ever be in the field, and that gap would read as drift.
    probs = np.asarray(_session(model).run(["probabilities"], {"input": split.x_test})[0])
    prior = np.bincount(split.y_train, minlength=10) / len(split.y_train)
    return {
        "input": "input",
        "features": [
            _histogram(split.x_train[:, i], FEATURE_BIN_EDGES, f"pixel_{i // 8}_{i % 8}")
            for i in range(_digits.N_FEATURES)
        ],
        "class_prior": _round(prior),
        "confidence": _histogram(probs.max(axis=1), CONFIDENCE_BIN_EDGES, "top1_probability"),
    }


def _digits_fields(
    name: str,
    version: str,
    model: bytes,
    split: _digits.DigitsSplit,
    description: str,
    training_code: str,
    extra_metrics: dict[str, float],
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    accuracy = _digits.onnx_accuracy(model, split.x_test, split.y_test)
    return {
        "name": name,
        "version": version,
        "format": "onnx",
        "model": "model.onnx",
        "description": description,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["N", _digits.N_FEATURES]}],
        "outputs": [
            {"name": "label", "dtype": "int64", "shape": ["N"]},
            {"name": "probabilities", "dtype": "float32", "shape": ["N", 10]},
        ],
        "labels": list(_digits.LABELS),
        "label_schema": {"id": "digits", "version": 1},
        "preprocess": dict(DIGITS_PREPROCESS),
        "requires": {
            "runtime": "onnxruntime",
            "min_opset": _opset(model),
            "memory_mb": _memory_mb(model),
            "accelerators": [],
        },
        "health": _digits_health(model, split, tolerance),
        "reference": _digits_reference(model, split),
        "provenance": {
            "dataset_sha256": split.dataset_sha256(),
            "training_code": training_code,
            "metrics": {
                "accuracy": round(accuracy, 6),
                "size_bytes": float(len(model)),
                **extra_metrics,
            },
            "created_at": CREATED_AT,
            "creator": CREATOR,
        },
    }


def digits_examples() -> Iterator[tuple[dict[str, Any], bytes]]:
    """Train the four digits examples; yield (manifest fields, ONNX bytes) for each."""
    split = _digits.load_split(seed=0)
    code = "edgewise.examples._digits"
    mlp, _ = _digits.train_mlp(split, seed=0)
    yield (
        _digits_fields(
            "digits-mlp", "1.0.0", mlp, split,
            "MLP (64 hidden units) on scikit-learn's 8x8 digits.",
            f"{code}:train_mlp(seed=0, hidden=(64,))", {},
        ),
        mlp,
    )  # fmt: skip
    int8 = _digits.quantize_int8(mlp)
    yield (
        _digits_fields(
            "digits-mlp", "1.1.0", int8, split,
            "digits-mlp 1.0.0 with int8 dynamic quantisation (onnxruntime).",
            f"{code}:quantize_int8(train_mlp(seed=0, hidden=(64,)))",
            {"size_ratio_vs_float": round(len(int8) / len(mlp), 6)},
            # Integer kernels differ between CPU generations more than float ones do.
            tolerance=1e-3,
        ),
        int8,
    )  # fmt: skip
    corrupt = 0.7
    bad, _ = _digits.train_mlp(split, seed=0, corrupt_fraction=corrupt)
    yield (
        _digits_fields(
            "digits-mlp", "2.0.0", bad, split,
            "Deliberately regressed: trained with 70% of labels corrupted. Valid and "
            "signed; rollout gates must catch it.",
            f"{code}:train_mlp(seed=0, hidden=(64,), corrupt_fraction={corrupt})",
            {"corrupt_fraction": corrupt},
        ),
        bad,
    )  # fmt: skip
    logreg, _ = _digits.train_logreg(split, seed=0)
    yield (
        _digits_fields(
            "digits-logreg", "1.0.0", logreg, split,
            "Logistic regression on the digits labels: fallback and first cascade tier.",
            f"{code}:train_logreg(seed=0)", {},
        ),
        logreg,
    )  # fmt: skip


def ppocr_model_path() -> Path | None:
    """The PP-OCR direction classifier shipped in rapidocr-onnxruntime, if installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / PPOCR_CLS_FILE
        if path.is_file():
            return path
    return None


def _ppocr_inputs() -> list[npt.NDArray[Any]]:
    # Values rounded to 2 decimals: the JSON stays short and means exactly what ran.
    n, c, h, w = PPOCR_SHAPE
    rng = np.random.default_rng(0)
    gradient = np.broadcast_to(np.linspace(-1.0, 1.0, w), PPOCR_SHAPE)
    stripes = np.broadcast_to(
        np.where((np.arange(h) // 6) % 2 == 0, 0.8, -0.8)[:, None], (n, c, h, w)
    )
    noise = rng.uniform(-1.0, 1.0, PPOCR_SHAPE)
    return [np.round(np.asarray(a, dtype=np.float64), 2) for a in (gradient, stripes, noise)]


def ppocr_example() -> tuple[dict[str, Any], bytes] | None:
    """The ppocr-cls 1.0.0 example, or None without the `ocr` extra."""
    path = ppocr_model_path()
    if path is None:
        return None
    model = path.read_bytes()
    sess = _session(model)
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name
    samples = []
    for x in _ppocr_inputs():
        (probs,) = sess.run([out_name], {in_name: x.astype(np.float32)})
        samples.append(
            {
                "input": {in_name: x.tolist()},
                "expected": {out_name: [[float(v) for v in np.asarray(probs)[0]]]},
            }
        )
    import hashlib

    fields: dict[str, Any] = {
        "name": "ppocr-cls",
        "version": "1.0.0",
        "format": "onnx",
        "model": "model.onnx",
        "description": "PP-OCR mobile v2.0 text-direction classifier (0 or 180 degrees), "
        "as shipped by rapidocr-onnxruntime.",
        "inputs": [{"name": in_name, "dtype": "float32", "shape": ["N", 3, 48, 192]}],
        "outputs": [{"name": out_name, "dtype": "float32", "shape": ["N", 2]}],
        "labels": ["0", "180"],
        "label_schema": {"id": "text-direction", "version": 1},
        "preprocess": {
            "kind": "image",
            "resize": [48, 192],
            "keep_aspect": True,
            "pad": "right",
            "channels": "BGR",
            "layout": "NCHW",
            "scale": 1 / 255,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "dtype": "float32",
        },
        "requires": {
            "runtime": "onnxruntime",
            "min_opset": _opset(model),
            "memory_mb": 64,
            "accelerators": [],
        },
        "health": {"samples": samples, "tolerance": 1e-4, "max_latency_ms": 500.0},
        "provenance": {
            "training_code": f"PaddleOCR ch_ppocr_mobile_v2.0_cls (file sha256 "
            f"{hashlib.sha256(model).hexdigest()}, from rapidocr_onnxruntime/models)",
            "metrics": {"size_bytes": float(len(model))},
            "created_at": CREATED_AT,
            "creator": CREATOR,
        },
    }
    return fields, model
