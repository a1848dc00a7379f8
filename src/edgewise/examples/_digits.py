"""Digits models trained reproducibly from scikit-learn's bundled data set.

Nothing is downloaded: `sklearn.datasets.load_digits` ships with scikit-learn.
Inputs are 64 float32 features (8x8 pixels scaled to [0, 1]); outputs are the ONNX
`label` (int64) and `probabilities` (float32, shape [N, 10]) tensors, no zipmap.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

N_FEATURES = 64
LABELS = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed train/test split every example model uses."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]

    def dataset_sha256(self) -> str:
        """Digest of the whole data set, for provenance."""
        h = hashlib.sha256()
        for part in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()


def load_split(seed: int = 0, test_size: float = 0.25) -> DigitsSplit:
    """Load the digits data set and split it with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def _export(model: object) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    return bytes(onx.SerializeToString())


def train_mlp(
    split: DigitsSplit,
    seed: int = 0,
    hidden: tuple[int, ...] = (64,),
    corrupt_fraction: float = 0.0,
    max_iter: int = 300,
) -> tuple[bytes, object]:
    """Train an MLP; `corrupt_fraction` of the training labels are replaced at random.

    Returns the ONNX model bytes and the fitted estimator.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    y = split.y_train.copy()
    if corrupt_fraction > 0:
        rng = np.random.default_rng(seed + 1000)
        idx = rng.random(len(y)) < corrupt_fraction
        y[idx] = rng.integers(0, 10, int(idx.sum()))
    model = MLPClassifier(hidden_layer_sizes=hidden, random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(split.x_train, y)
    return _export(model), model


def train_logreg(split: DigitsSplit, seed: int = 0) -> tuple[bytes, object]:
    """Train a small logistic regression (the fallback / first cascade tier)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=200, C=0.05, random_state=seed)
    model.fit(split.x_train, split.y_train)
    return _export(model), model


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """Dynamic int8 quantisation with onnxruntime."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def onnx_accuracy(onnx_bytes: bytes, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Top-1 accuracy of an ONNX digits model, via onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    probs = sess.run(["probabilities"], {"input": x})[0]
    return float((np.asarray(probs).argmax(axis=1) == y).mean())
