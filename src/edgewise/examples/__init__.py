"""Example models, trained reproducibly from data that ships with the packages.

Example:
    >>> from pathlib import Path
    >>> from edgewise.bundle import load_public_key, verify
    >>> from edgewise.examples import build_examples
    >>> bundles = build_examples(Path("examples-out"))  # signs with examples-out/examples.key
    >>> trust = [load_public_key(Path("examples-out/examples.pub"))]
    >>> verify(bundles["digits-mlp@1.0.0"], trust).manifest.provenance.metrics["accuracy"] > 0.9
    True
"""

from __future__ import annotations

from edgewise.examples._build import EXAMPLE_KEY_NAME, build_examples, example_manifests
from edgewise.examples._digits import (
    LABELS,
    N_FEATURES,
    DigitsSplit,
    load_split,
    onnx_accuracy,
    quantize_int8,
    train_logreg,
    train_mlp,
)
from edgewise.examples._models import ppocr_model_path

__all__ = [
    "EXAMPLE_KEY_NAME",
    "LABELS",
    "N_FEATURES",
    "DigitsSplit",
    "build_examples",
    "example_manifests",
    "load_split",
    "onnx_accuracy",
    "ppocr_model_path",
    "quantize_int8",
    "train_logreg",
    "train_mlp",
]
