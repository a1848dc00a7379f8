"""Distribution distances: PSI, Jensen-Shannon and the two-sample Kolmogorov-Smirnov test.

Numpy only (scipy is not a dependency), so they run on the device. Inputs are anything
array-like; counts and frequencies are normalised here, so callers may pass either.

Example::

    >>> round(psi([0.5, 0.5], [50, 50]), 6)
    0.0
    >>> jensen_shannon([1, 0], [0, 1])
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["jensen_shannon", "ks_two_sample", "normalise", "psi", "psi_rows"]

ArrayLike = npt.ArrayLike


def normalise(values: ArrayLike) -> npt.NDArray[np.float64]:
    """Counts or weights -> frequencies summing to 1 (all zeros stay all zeros).

    Raises:
        ValueError: on negative, non-finite or non-1-D input.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of counts, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("counts must be finite and non-negative")
    total = arr.sum()
    return arr / total if total > 0 else arr


def _pair(p: ArrayLike, q: ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a, b = normalise(p), normalise(q)
    if a.shape != b.shape:
        raise ValueError(f"bin counts differ: {a.shape[0]} vs {b.shape[0]}")
    return a, b


def psi(expected_freqs: ArrayLike, actual_counts: ArrayLike, eps: float = 1e-4) -> float:
    """Population stability index, sum((a - e) * ln(a / e)) over bins.

    Both sides are normalised and floored at `eps` so that an empty bin on one side
    gives a large but finite term. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate,
    > 0.25 shifted (for large samples; small windows add noise of about
    (bins - 1) / n).

    Args:
        expected_freqs: Reference frequencies (or counts) per bin.
        actual_counts: Observed counts (or frequencies) per bin, same bins.
        eps: Floor applied to both frequency vectors.

    Returns:
        The PSI (>= 0); 0.0 when either side holds no data.
    """
    e, a = _pair(expected_freqs, actual_counts)
    if e.sum() == 0 or a.sum() == 0:
        return 0.0
    e, a = np.maximum(e, eps), np.maximum(a, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_rows(
    expected: Sequence[ArrayLike], actual: Sequence[ArrayLike], eps: float = 1e-4
) -> tuple[float, ...]:
    """`psi` of each pair (expected[i], actual[i]), the same numbers as one call each.

    Pairs that all have the same number of bins (the usual case: every input feature
    on eight reference bins) are computed as one 2-D array, about a tenth of the time
    of one call per feature; anything else falls back to one call per pair.

    Raises:
        ValueError: what `psi` raises for a bad pair, or if the lengths differ.
    """
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected histograms, {len(actual)} actual")
    if not expected:
        return ()
    try:
        e = np.asarray(expected, dtype=np.float64)
        a = np.asarray(actual, dtype=np.float64)
    except ValueError:  # ragged: bins differ between pairs
        e = a = np.empty(0)
    if e.ndim != 2 or e.shape != a.shape:
        return tuple(psi(x, y, eps) for x, y in zip(expected, actual, strict=True))
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(a))) or (e < 0).any() or (a < 0).any():
        raise ValueError("counts must be finite and non-negative")
    e_tot = e.sum(axis=1, keepdims=True)
    a_tot = a.sum(axis=1, keepdims=True)
    e = np.maximum(np.divide(e, e_tot, out=np.zeros_like(e), where=e_tot > 0), eps)
    a = np.maximum(np.divide(a, a_tot, out=np.zeros_like(a), where=a_tot > 0), eps)
    rows = np.sum((a - e) * np.log(a / e), axis=1)
    empty = (e_tot[:, 0] == 0) | (a_tot[:, 0] == 0)
    return tuple(0.0 if z else float(r) for r, z in zip(rows, empty, strict=True))


def jensen_shannon(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits: 0 for equal distributions, 1 for disjoint ones.

    Returns:
        The divergence in [0, 1]; 0.0 when either side holds no data.
    """
    a, b = _pair(p, q)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    m = 0.5 * (a + b)

    def _kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(min(1.0, max(0.0, 0.5 * _kl(a) + 0.5 * _kl(b))))


def _kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution (series of Numerical Recipes' probks)."""
    if lam < 0.2:
        return 1.0  # the series converges poorly here and the answer is 1 to 1e-9
    total, sign, prev_term = 0.0, 1.0, 0.0
    for k in range(1, 101):
        term = sign * 2.0 * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) <= 1e-3 * prev_term or abs(term) <= 1e-8 * abs(total):
            return min(1.0, max(0.0, total))
        sign, prev_term = -sign, abs(term)
    return 1.0


def ks_two_sample(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (two-sided).

    The p-value uses the asymptotic Kolmogorov distribution with Stephens' small-sample
    correction, lam = (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D, ne = n m / (n + m); it is
    within a few percent of the exact value for ne >= 4, which is enough to rank drift.

    Returns:
        (D statistic, p-value); (0.0, 1.0) when either sample is empty.

    Raises:
        ValueError: if a sample holds NaN or is not 1-D.
    """
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError("ks_two_sample expects 1-D samples")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("ks_two_sample samples must not contain NaN")
    n, m = x.size, y.size
    if n == 0 or m == 0:
        return 0.0, 1.0
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / n
    cdf_y = np.searchsorted(y, grid, side="right") / m
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    ne = math.sqrt(n * m / (n + m))
    return d, _kolmogorov_sf((ne + 0.12 + 0.11 / ne) * d)
