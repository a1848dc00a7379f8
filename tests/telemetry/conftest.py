"""Fixtures for telemetry tests: the digits example model with its manifest (once)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgewise.examples import DigitsSplit, load_split


@dataclass(frozen=True)
class Digits:
    manifest: dict[str, Any]
    model: bytes
    split: DigitsSplit
    predict: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]]


@pytest.fixture(scope="session")
def digits() -> Digits:
    """digits-mlp 1.0.0 as the examples build it: manifest fields (with reference) and ONNX."""
    import onnxruntime as ort

    from edgewise.examples._models import digits_examples

    manifest, model = next(digits_examples())
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def predict(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        out = sess.run(["probabilities"], {"input": np.asarray(x, dtype=np.float32)})[0]
        return np.asarray(out)

    return Digits(manifest, model, load_split(), predict)


class FakeClock:
    """A settable clock for windows in virtual time."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
