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


def add_device(
    store: Any, device_id: str, key: str = "", labels: dict[str, str] | None = None
) -> None:
    """An active device in `store` (its key defaults to its id)."""
    store.insert_device(
        {
            "id": device_id,
            "public_key": key or device_id,
            "labels": labels or {},
            "capabilities": {},
            "status": "active",
            "enrolled_at": 1.0,
        }
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A migrated control-plane store (SQLite file or PostgreSQL) with two devices."""
    from edgewise.control import open_store

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cp.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = open_store(url)  # the migrations create the telemetry tables too
    for i, site in ((1, "a"), (2, "b")):
        add_device(s, f"dev-{i}", f"k{i}", {"site": site})
    yield s
    s.engine.dispose()
