"""How a model version behaves on a simulated device, and the telemetry windows it yields.

The simulator does not run the models (10,000 onnxruntime sessions would measure the
machine, not the rollout); it draws from per-version distributions instead:

- install time: lognormal around `install_s`;
- inference latency: lognormal around `latency_ms`;
- inference errors: each inference fails with probability `error_rate`;
- top-1 confidence: Beta(`confidence_a`, `confidence_b`);
- input drift: the device-side drift score, around `input_drift` (inputs do not depend
  on the model, so this is the same for every version unless configured).

A *regressed* version draws from worse distributions. A version is regressed when it is
named in `BehaviourBook.regressed` (default `digits-mlp@2.0.0`) or when the bundle's
provenance states an accuracy below `BehaviourBook.accuracy_floor`.

A window becomes one telemetry record (`cls="metric"`, `kind="window"`) in the shape the
real agent's `WindowAggregator` produces, so the control plane reads both alike::

    {"pipeline", "model", "version", "deployment", "start", "end",
     "counts": {"ok", "failed", "shed", "rejected", "expired", "superseded", "bad_input",
                "escalated", "fallback", "nonfinite"},
     "latency": {"bounds": [...], "stages": {"total": {"counts": [...], "sum"}}},
     "confidence": {"edges": [...], "counts": [...]},
     "drift": {"score", "threshold", "samples", "sufficient", "drifted"}}
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgewise.drift import DEFAULT_CONFIDENCE_EDGES

__all__ = [
    "CONFIDENCE_EDGES",
    "LATENCY_BOUNDS_MS",
    "REGRESSED",
    "BehaviourBook",
    "ModelBehaviour",
    "synth_window",
]

# The runtime's latency buckets (upper bounds, ms; one overflow bucket after the last),
# so simulated and real windows merge into one cohort histogram.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
    2000.0, 5000.0,
)  # fmt: skip
CONFIDENCE_EDGES: tuple[float, ...] = tuple(DEFAULT_CONFIDENCE_EDGES)


@dataclass(frozen=True)
class ModelBehaviour:
    """Distributions of one model version on a device.

    Attributes:
        install_s: median install time (download excluded), simulated seconds.
        install_sigma: lognormal spread of the install time.
        install_fail_rate: probability that the on-device health check fails.
        latency_ms: median inference latency.
        latency_sigma: lognormal spread of the latency.
        error_rate: probability that one inference fails.
        confidence_a: Beta a of the top-1 confidence.
        confidence_b: Beta b of the top-1 confidence.
        input_drift: mean device-side input-drift score.
    """

    install_s: float = 4.0
    install_sigma: float = 0.35
    install_fail_rate: float = 0.0
    latency_ms: float = 3.0
    latency_sigma: float = 0.3
    error_rate: float = 0.002
    confidence_a: float = 9.0
    confidence_b: float = 1.0
    input_drift: float = 0.03

    def __post_init__(self) -> None:
        if not 0 <= self.error_rate <= 1 or not 0 <= self.install_fail_rate <= 1:
            raise ValueError("error_rate and install_fail_rate must be within 0-1")
        if min(self.install_s, self.latency_ms, self.confidence_a, self.confidence_b) <= 0:
            raise ValueError("install_s, latency_ms and the Beta parameters must be > 0")

    def install_time(self, rng: random.Random) -> float:
        """One install duration in simulated seconds."""
        return self.install_s * math.exp(rng.gauss(0.0, self.install_sigma))


#: A model that still installs and passes its health check, but answers worse.
REGRESSED = ModelBehaviour(latency_ms=3.6, error_rate=0.04, confidence_a=2.2, confidence_b=2.0)


@dataclass(frozen=True)
class BehaviourBook:
    """Which behaviour each model version gets.

    Attributes:
        default: behaviour of a healthy version.
        regressed_behaviour: behaviour of a regressed version.
        regressed: refs (`name@version`) that are regressed.
        accuracy_floor: a bundle whose provenance accuracy is below this is regressed
            (None: ignore provenance).
        overrides: per-ref behaviour, winning over everything else.
    """

    default: ModelBehaviour = field(default_factory=ModelBehaviour)
    regressed_behaviour: ModelBehaviour = REGRESSED
    regressed: frozenset[str] = frozenset({"digits-mlp@2.0.0"})
    accuracy_floor: float | None = 0.8
    overrides: Mapping[str, ModelBehaviour] = field(default_factory=dict)

    def is_regressed(self, ref: str, accuracy: float | None = None) -> bool:
        """Whether `ref` (with its provenance accuracy, if known) is regressed."""
        if ref in self.regressed:
            return True
        return (
            self.accuracy_floor is not None
            and accuracy is not None
            and accuracy < self.accuracy_floor
        )

    def behaviour(self, ref: str, accuracy: float | None = None) -> ModelBehaviour:
        """The behaviour of `ref`."""
        if ref in self.overrides:
            return self.overrides[ref]
        return self.regressed_behaviour if self.is_regressed(ref, accuracy) else self.default

    def with_regressed(self, *refs: str) -> BehaviourBook:
        """A copy with `refs` regressed instead of the default set."""
        return replace(self, regressed=frozenset(refs))


def _bucketed(values: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    # Buckets (b[i-1], b[i]] and one overflow bucket: Prometheus' `le` buckets.
    index = np.searchsorted(np.asarray(bounds), values, side="left")
    return [int(c) for c in np.bincount(index, minlength=len(bounds) + 1)]


def _binned(values: np.ndarray, edges: tuple[float, ...]) -> list[int]:
    # Bins [e_i, e_i+1), the last one closed: the drift package's fixed-bin histogram.
    bins = len(edges) - 1
    index = np.clip(np.searchsorted(np.asarray(edges), values, side="right") - 1, 0, bins - 1)
    return [int(c) for c in np.bincount(index, minlength=bins)]


def synth_window(
    behaviour: ModelBehaviour,
    rng: random.Random,
    *,
    pipeline: str,
    model: str,
    version: str,
    start: float,
    end: float,
    inferences: int,
    deployment: str = "",
    drift_threshold: float = 0.2,
) -> dict[str, Any]:
    """One telemetry window of a device running `behaviour` (pure given `rng`).

    The per-inference draws are numpy's, from a generator seeded by `rng`: the same
    window for the same `rng` state, at about 1/50 of the cost of drawing each of the
    window's inferences in Python (the simulator closes ~170 windows/s at 10,000 devices).
    """
    draws = np.random.Generator(np.random.PCG64(rng.getrandbits(64)))
    latencies = behaviour.latency_ms * np.exp(
        draws.normal(0.0, behaviour.latency_sigma, size=inferences)
    )
    failed = int(draws.binomial(inferences, behaviour.error_rate)) if inferences else 0
    confidences = draws.beta(behaviour.confidence_a, behaviour.confidence_b, inferences - failed)
    drift = abs(behaviour.input_drift * (1.0 + 0.25 * rng.gauss(0.0, 1.0)))
    data: dict[str, Any] = {
        "pipeline": pipeline,
        "model": model,
        "version": version,
        "start": round(start, 3),
        "end": round(end, 3),
        "counts": {
            "ok": inferences - failed,
            "failed": failed,
            "shed": 0,
            "rejected": 0,
            "expired": 0,
            "superseded": 0,
            "bad_input": 0,
            "escalated": 0,
            "fallback": 0,
            "nonfinite": 0,
        },
        "latency": {
            "bounds": list(LATENCY_BOUNDS_MS),
            "stages": {
                "total": {
                    "counts": _bucketed(latencies, LATENCY_BOUNDS_MS),
                    "sum": round(float(latencies.sum()), 4),
                }
            },
        },
        "confidence": {
            "edges": list(CONFIDENCE_EDGES),
            "counts": _binned(confidences, CONFIDENCE_EDGES),
        },
        "drift": {
            "score": round(drift, 6),
            "threshold": drift_threshold,
            "samples": inferences,
            "sufficient": inferences > 0,
            "drifted": drift > drift_threshold,
        },
    }
    if deployment:
        data["deployment"] = deployment
    return data
