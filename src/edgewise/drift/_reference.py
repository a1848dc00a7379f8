"""The drift baseline a model bundle carries: reference bins and frequencies.

A `DriftReference` holds, for the reference (training) data: per-feature bin edges and
frequencies, the top-1 confidence histogram, the predicted-class prior, and the number
of reference samples. It travels in the bundle manifest as `to_dict()` (plain JSON).

Build the confidence histogram and class prior from *held-out* predictions (e.g.
out-of-fold `cross_val_predict` on the training split): on its own training data a
model is more confident than it will ever be in the field, and that gap would read as
drift on every window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.drift._histogram import bin_indices, check_edges

__all__ = [
    "DEFAULT_CONFIDENCE_EDGES",
    "DEFAULT_REFERENCE_SAMPLES",
    "DriftReference",
    "saturating_edges",
]

# A manifest does not say how many samples its frequencies came from; this many keeps
# the reference's share of the noise correction small but not zero.
DEFAULT_REFERENCE_SAMPLES = 1000

# Top-1 confidences crowd near 1, so the bins are finer there.
DEFAULT_CONFIDENCE_EDGES: tuple[float, ...] = (
    0.0,
    0.3,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    1.0,
)


def saturating_edges(lo: float = 0.0, hi: float = 1.0, bins: int = 8) -> list[float]:
    """Edges for a feature clipped to [lo, hi]: exactly `lo`, `bins` equal bins, exactly `hi`.

    Pixels are the typical case: background sits at `lo`, saturated strokes at `hi`, and
    a brightness change moves mass in and out of exactly those two bins.
    """
    if not hi > lo or bins < 1:
        raise ValueError("saturating_edges needs hi > lo and bins >= 1")
    tiny = (hi - lo) * 1e-6
    inner = np.linspace(lo, hi, bins + 1)[1:-1].tolist()
    return [lo, lo + tiny, *inner, hi - tiny, hi]


def _freqs(counts: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{what}: frequencies must be a non-empty list of numbers >= 0")
    total = arr.sum()
    if total <= 0:
        raise ValueError(f"{what}: frequencies sum to zero")
    out: npt.NDArray[np.float64] = arr / total
    return out


def _per_feature_edges(edges: Any, n_features: int) -> list[npt.NDArray[np.float64]]:
    """One shared edge list, or one per feature (ragged allowed), as arrays."""
    try:
        arr = np.asarray(edges, dtype=np.float64)
    except ValueError:  # ragged: one list per feature, of different lengths
        return [check_edges(e) for e in edges]
    if arr.ndim == 1:
        return [check_edges(arr)] * n_features
    return [check_edges(row) for row in arr]


@dataclass(frozen=True, eq=False)
class DriftReference:
    """Reference distributions for one model (immutable; arrays are not to be mutated).

    Attributes:
        feature_edges: Per feature, its bin edges (k + 1 ascending numbers).
        feature_freqs: Per feature, reference frequency per bin (sums to 1).
        confidence_edges: Bin edges of the top-1 confidence histogram.
        confidence_freqs: Reference frequency per confidence bin.
        class_prior: Reference frequency of each predicted class.
        samples: How many reference samples the frequencies come from (their noise).
    """

    feature_edges: tuple[npt.NDArray[np.float64], ...]
    feature_freqs: tuple[npt.NDArray[np.float64], ...]
    confidence_edges: npt.NDArray[np.float64]
    confidence_freqs: npt.NDArray[np.float64]
    class_prior: npt.NDArray[np.float64]
    samples: int

    def __post_init__(self) -> None:
        if len(self.feature_edges) != len(self.feature_freqs):
            raise ValueError("feature_edges and feature_freqs differ in length")
        for i, (edges, freqs) in enumerate(
            zip(self.feature_edges, self.feature_freqs, strict=True)
        ):
            if edges.size != freqs.size + 1:
                raise ValueError(f"feature {i}: {edges.size} edges for {freqs.size} bins")
        if self.confidence_edges.size != self.confidence_freqs.size + 1:
            raise ValueError("confidence edges and frequencies do not fit")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return len(self.feature_edges)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(self.class_prior.size)

    @classmethod
    def build(
        cls,
        feature_edges: Sequence[npt.ArrayLike],
        feature_freqs: Sequence[npt.ArrayLike],
        confidence_edges: npt.ArrayLike,
        confidence_freqs: npt.ArrayLike,
        class_prior: npt.ArrayLike,
        samples: int,
    ) -> DriftReference:
        """Validate and normalise plain lists into a reference.

        Raises:
            ValueError: naming the first inconsistent part.
        """
        return cls(
            feature_edges=tuple(check_edges(e) for e in feature_edges),
            feature_freqs=tuple(_freqs(f, f"feature {i}") for i, f in enumerate(feature_freqs)),
            confidence_edges=check_edges(confidence_edges),
            confidence_freqs=_freqs(confidence_freqs, "confidence"),
            class_prior=_freqs(class_prior, "class prior"),
            samples=int(samples),
        )

    @classmethod
    def from_manifest(
        cls, reference: Mapping[str, Any], samples: int | None = None
    ) -> DriftReference | None:
        """The drift baseline of a bundle manifest's `reference` (None when it has no bins).

        Accepts the manifest shape (`features[i].bin_edges/frequencies`, `confidence`,
        `class_prior`) and `to_dict()`'s shape (`edges`/`freqs`) alike. The agent and the
        control plane both read references through this.

        Args:
            reference: the manifest's `reference` object.
            samples: how many samples the frequencies came from; default: the
                reference's own `samples`, else `DEFAULT_REFERENCE_SAMPLES`.

        Raises:
            ValueError: the reference is malformed.
        """
        features = reference.get("features") or []
        confidence = reference.get("confidence")
        prior = reference.get("class_prior") or []
        if not features or not confidence or not prior:
            return None
        try:
            return cls.build(
                [f.get("bin_edges", f.get("edges")) for f in features],
                [f.get("frequencies", f.get("freqs")) for f in features],
                confidence.get("bin_edges", confidence.get("edges")),
                confidence.get("frequencies", confidence.get("freqs")),
                prior,
                int(samples or reference.get("samples") or DEFAULT_REFERENCE_SAMPLES),
            )
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"malformed reference: {exc!r}") from None

    @classmethod
    def from_samples(
        cls,
        inputs: npt.ArrayLike,
        confidence: npt.ArrayLike,
        predicted: npt.ArrayLike,
        n_classes: int,
        feature_edges: Sequence[npt.ArrayLike] | npt.ArrayLike | None = None,
        confidence_edges: npt.ArrayLike = DEFAULT_CONFIDENCE_EDGES,
    ) -> DriftReference:
        """Count a reference from samples (at bundle build time, not on the device).

        Args:
            inputs: Reference inputs [N, F] (higher ranks are flattened per sample).
            confidence: Held-out top-1 confidence per sample [N].
            predicted: Held-out predicted class per sample [N].
            n_classes: Number of classes.
            feature_edges: One edge list shared by every feature, or one per feature;
                default `saturating_edges()` (features in [0, 1]).
            confidence_edges: Confidence bin edges.

        Raises:
            ValueError: on inconsistent shapes or empty input.
        """
        x = np.asarray(inputs, dtype=np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
        if x.shape[0] == 0:
            raise ValueError("reference needs at least one sample")
        per_feature = _per_feature_edges(
            saturating_edges() if feature_edges is None else feature_edges, x.shape[1]
        )
        if len(per_feature) != x.shape[1]:
            raise ValueError(f"{len(per_feature)} edge lists for {x.shape[1]} features")
        freqs = [
            np.bincount(bin_indices(e, x[:, i]).clip(0), minlength=e.size - 1)
            for i, e in enumerate(per_feature)
        ]
        c_edges = check_edges(confidence_edges)
        conf = np.bincount(
            bin_indices(c_edges, np.asarray(confidence)).clip(0), minlength=c_edges.size - 1
        )
        prior = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=n_classes)
        if prior.size != n_classes:
            raise ValueError(f"predicted classes exceed n_classes={n_classes}")
        return cls.build(per_feature, freqs, c_edges, conf, prior, x.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a bundle manifest's `reference`."""
        return {
            "samples": self.samples,
            "features": [
                {"edges": e.tolist(), "freqs": f.tolist()}
                for e, f in zip(self.feature_edges, self.feature_freqs, strict=True)
            ],
            "confidence": {
                "edges": self.confidence_edges.tolist(),
                "freqs": self.confidence_freqs.tolist(),
            },
            "class_prior": self.class_prior.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        """Inverse of `to_dict`; validates everything.

        Raises:
            ValueError: on a missing or malformed part.
        """
        try:
            features = data["features"]
            return cls.build(
                [f["edges"] for f in features],
                [f["freqs"] for f in features],
                data["confidence"]["edges"],
                data["confidence"]["freqs"],
                data["class_prior"],
                int(data["samples"]),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed drift reference: {exc!r}") from None
