"""Histograms on fixed bin edges: what a device counts and the control plane merges.

`k + 1` ascending edges make `k` bins `[e_i, e_{i+1})`; values below the first edge
count in the first bin and values at or above the last edge in the last one, so every
finite value is counted and histograms from many devices add up bin by bin. (A bin for
exactly the top value, such as a saturated pixel at 1.0, is an edge just below it:
`[..., 0.875, 0.999, 1.0]`.) NaN values are counted apart, in `nan_count`.

Example::

    >>> h = Histogram([0.0, 0.5, 1.0])
    >>> h.add([0.1, 0.7, 1.0, 3.0, -1.0])
    >>> h.counts.tolist()
    [2, 3]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Histogram", "bin_indices", "check_edges"]


def check_edges(edges: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Validate bin edges: 1-D, finite, strictly ascending, at least two.

    Raises:
        ValueError: naming the problem.
    """
    arr = np.asarray(edges, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError("bin edges must be a 1-D list of at least two numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError("bin edges must be finite")
    if not np.all(np.diff(arr) > 0):
        raise ValueError("bin edges must be strictly ascending")
    return arr


def bin_indices(edges: npt.NDArray[np.float64], values: npt.ArrayLike) -> npt.NDArray[np.intp]:
    """Bin index of each value under the clipping rule of this module (NaN -> -1)."""
    vals = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(edges, vals, side="right") - 1
    idx = np.clip(idx, 0, edges.size - 2)
    return np.where(np.isnan(vals), -1, idx)


class Histogram:
    """Counts of values on fixed bin edges."""

    def __init__(self, edges: npt.ArrayLike, counts: npt.ArrayLike | None = None) -> None:
        """Create an empty histogram, or one holding `counts`.

        Raises:
            ValueError: on invalid edges or counts of the wrong length or sign.
        """
        self.edges = check_edges(edges)
        self.counts: npt.NDArray[np.int64] = np.zeros(self.edges.size - 1, dtype=np.int64)
        self.nan_count = 0
        if counts is not None:
            arr = np.asarray(counts)
            if arr.shape != self.counts.shape:
                raise ValueError(f"expected {self.counts.size} counts, got shape {arr.shape}")
            if np.any(arr < 0):
                raise ValueError("counts must be non-negative")
            self.counts += arr.astype(np.int64)

    @property
    def bins(self) -> int:
        """Number of bins."""
        return int(self.counts.size)

    @property
    def total(self) -> int:
        """Number of (non-NaN) values counted."""
        return int(self.counts.sum())

    def add(self, values: npt.ArrayLike) -> None:
        """Count values (any shape; flattened)."""
        idx = bin_indices(self.edges, np.ravel(np.asarray(values, dtype=np.float64)))
        ok = idx >= 0
        self.nan_count += int(idx.size - ok.sum())
        self.counts += np.bincount(idx[ok], minlength=self.bins).astype(np.int64)

    def freqs(self) -> npt.NDArray[np.float64]:
        """Counts as frequencies (all zeros when empty)."""
        total = self.total
        return self.counts / total if total else np.zeros(self.bins)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding both sets of counts.

        Raises:
            ValueError: if the bin edges differ.
        """
        if other.edges.shape != self.edges.shape or not np.array_equal(other.edges, self.edges):
            raise ValueError("cannot merge histograms with different bin edges")
        out = Histogram(self.edges, self.counts + other.counts)
        out.nan_count = self.nan_count + other.nan_count
        return out

    def reset(self) -> None:
        """Forget every count (the edges stay)."""
        self.counts[:] = 0
        self.nan_count = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"edges": [...], "counts": [...]}."""
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> Histogram:
        """Inverse of `to_dict`.

        Raises:
            ValueError: if the mapping lacks edges or holds invalid ones.
        """
        if not isinstance(data, Mapping) or "edges" not in data:
            raise ValueError("histogram must be an object with 'edges' and 'counts'")
        return cls(data["edges"], data.get("counts"))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Histogram)
            and np.array_equal(self.edges, other.edges)
            and np.array_equal(self.counts, other.counts)
            and self.nan_count == other.nan_count
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram(edges={self.edges.tolist()}, counts={self.counts.tolist()})"
