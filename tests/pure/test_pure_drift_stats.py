from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgewise.drift as drift
from edgewise.drift import (
    DriftReference,
    FeatureDriftMonitor,
    Histogram,
    WindowCounts,
    drift_report,
    jensen_shannon,
    ks_two_sample,
    psi,
    psi_rows,
    saturating_edges,
)

# ------------------------------------------------------------------------- psi / js

_counts = st.lists(st.floats(min_value=0, max_value=1e6), min_size=8, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_counts, _counts), max_size=6))
def test_psi_rows_gives_exactly_what_psi_gives_pair_by_pair(pairs: list[tuple[Any, Any]]) -> None:
    pairs = [*pairs, ([0.0] * 8, [1.0] * 8), ([1.0] * 8, [0.0] * 8)]  # empty sides score 0
    expected, actual = [p[0] for p in pairs], [p[1] for p in pairs]
    assert psi_rows(expected, actual) == tuple(psi(e, a) for e, a in pairs)


def test_psi_rows_with_ragged_bins_or_bad_counts() -> None:
    ragged = psi_rows([[0.5, 0.5], [0.2, 0.3, 0.5]], [[1, 3], [2, 2, 2]])
    assert ragged == (psi([0.5, 0.5], [1, 3]), psi([0.2, 0.3, 0.5], [2, 2, 2]))
    assert psi_rows([], []) == ()
    with pytest.raises(ValueError, match="non-negative"):
        psi_rows([[0.5, 0.5]], [[-1, 3]])
    with pytest.raises(ValueError, match="non-negative"):
        psi_rows([[0.5, 0.5]], [[float("nan"), 3]])
    with pytest.raises(ValueError, match="bin counts differ"):
        psi_rows([[0.5, 0.5], [0.5, 0.5]], [[1, 3], [1, 2, 3]])
    with pytest.raises(ValueError, match="2 expected"):
        psi_rows([[0.5, 0.5], [0.5, 0.5]], [[1, 3]])


def test_psi_of_identical_distributions_is_zero() -> None:
    assert psi([0.2, 0.3, 0.5], [20, 30, 50]) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_the_textbook_formula() -> None:
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    expected = float(np.sum((a - e) * np.log(a / e)))
    assert psi(e, [80, 20]) == pytest.approx(expected)


def test_psi_floors_empty_bins_at_eps() -> None:
    value = psi([0.5, 0.5, 0.0], [0, 50, 50], eps=1e-4)
    assert math.isfinite(value)
    assert value > 1.0


def test_psi_with_no_data_is_zero() -> None:
    assert psi([0.5, 0.5], [0, 0]) == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        ([0.5, 0.5], [1, 2, 3]),
        ([0.5, -0.5], [1, 1]),
        ([0.5, float("nan")], [1, 1]),
        ([[0.5, 0.5]], [[1, 1]]),
    ],
)
def test_psi_refuses_invalid_input(bad: tuple[list[float], list[float]]) -> None:
    with pytest.raises(ValueError):
        psi(*bad)


def test_jensen_shannon_bounds() -> None:
    assert jensen_shannon([1, 0], [0, 1]) == 1.0
    assert jensen_shannon([3, 1], [6, 2]) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon([0, 0], [1, 1]) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 100), min_size=2, max_size=8).flatmap(
        lambda p: st.tuples(
            st.just(p), st.lists(st.integers(0, 100), min_size=len(p), max_size=len(p))
        )
    )
)
def test_jensen_shannon_is_symmetric_and_in_unit_interval(pq: tuple[list[int], list[int]]) -> None:
    p, q = pq
    value = jensen_shannon(p, q)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(jensen_shannon(q, p), abs=1e-12)


# ------------------------------------------------------------------------- ks


def test_ks_identical_samples() -> None:
    assert ks_two_sample([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)


def test_ks_disjoint_samples_have_statistic_one_and_small_pvalue() -> None:
    d, p = ks_two_sample(np.arange(50), np.arange(100, 150))
    assert d == 1.0
    assert p < 1e-10


def test_ks_matches_scipy() -> None:
    # scipy is not a dependency of edgewise, but scikit-learn brings it: a free oracle.
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(11)
    for n, m, shift in [(50, 50, 0.0), (30, 80, 0.4), (200, 150, 0.2), (12, 9, 1.0)]:
        a, b = rng.normal(size=n), rng.normal(shift, size=m)
        ours = ks_two_sample(a, b)
        ref = stats.ks_2samp(a, b, method="asymp")
        assert ours[0] == pytest.approx(ref.statistic)
        assert ours[1] == pytest.approx(ref.pvalue, rel=0.15, abs=0.005)


def test_ks_same_distribution_is_not_rejected_and_shift_is() -> None:
    rng = np.random.default_rng(3)
    _, p_same = ks_two_sample(rng.normal(size=300), rng.normal(size=300))
    _, p_shift = ks_two_sample(rng.normal(size=300), rng.normal(0.5, size=300))
    assert p_same > 0.05
    assert p_shift < 1e-6


def test_ks_empty_and_nan() -> None:
    assert ks_two_sample([], [1.0]) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ks_two_sample([float("nan")], [1.0])


# ------------------------------------------------------------------------- histogram


def test_histogram_clips_out_of_range_values_into_end_bins() -> None:
    h = Histogram([0.0, 0.5, 1.0])
    h.add([-3.0, 0.0, 0.49, 0.5, 1.0, 7.0, float("nan")])
    assert h.counts.tolist() == [3, 3]
    assert h.nan_count == 1
    assert h.total == 6


def test_histogram_merge_adds_counts_and_refuses_other_edges() -> None:
    a, b = Histogram([0, 1, 2]), Histogram([0, 1, 2])
    a.add([0.5, 1.5])
    b.add([1.5])
    assert a.merge(b).counts.tolist() == [1, 2]
    with pytest.raises(ValueError):
        a.merge(Histogram([0, 1, 3]))


def test_histogram_roundtrips_through_dict() -> None:
    h = Histogram([0, 1, 2, 3])
    h.add([0.1, 2.5, 2.7])
    assert Histogram.from_dict(h.to_dict()) == h


@pytest.mark.parametrize("edges", [[1.0], [0, 0, 1], [1, 0], [0, float("inf")], [[0, 1]]])
def test_histogram_refuses_invalid_edges(edges: list[float]) -> None:
    with pytest.raises(ValueError):
        Histogram(edges)


def test_saturating_edges_give_exact_end_bins() -> None:
    h = Histogram(saturating_edges(0.0, 1.0, 8))
    h.add([0.0, 1.0, 0.5, 1 / 16])
    assert h.bins == 10
    assert h.counts[0] == 1 and h.counts[-1] == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), max_size=50), st.lists(st.floats(-5, 5), max_size=50))
def test_histogram_of_concatenation_is_merge_of_histograms(a: list[float], b: list[float]) -> None:
    edges = [-1.0, 0.0, 0.5, 2.0]
    ha, hb, hab = Histogram(edges), Histogram(edges), Histogram(edges)
    ha.add(a)
    hb.add(b)
    hab.add(a + b)
    assert ha.merge(hb) == hab
    assert hab.total == len(a) + len(b)


# ------------------------------------------------------------------------- reference / monitor


def _reference() -> DriftReference:
    rng = np.random.default_rng(0)
    x = rng.random((400, 3))
    conf = rng.uniform(0.5, 1.0, 400)
    pred = rng.integers(0, 4, 400)
    return DriftReference.from_samples(x, conf, pred, n_classes=4)


def test_reference_roundtrips_through_dict() -> None:
    ref = _reference()
    again = DriftReference.from_dict(ref.to_dict())
    assert again.to_dict() == ref.to_dict()
    assert again.n_features == 3 and again.n_classes == 4 and again.samples == 400


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("features"),
        lambda d: d["features"][0].update(freqs=[1.0]),
        lambda d: d.update(class_prior=[0, 0]),
        lambda d: d["confidence"].update(edges=[1, 0]),
        lambda d: d.update(samples=0),
    ],
)
def test_malformed_reference_is_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    data = _reference().to_dict()
    mutate(data)
    with pytest.raises(ValueError):
        DriftReference.from_dict(data)


def test_reference_accepts_per_feature_edges_of_different_lengths() -> None:
    x = np.array([[0.1, 5.0], [0.9, 7.0]])
    ref = DriftReference.from_samples(x, [0.9, 0.8], [0, 1], 2, feature_edges=[[0, 1], [0, 5, 10]])
    assert [f.size for f in ref.feature_freqs] == [1, 2]


def test_monitor_counts_match_histograms_and_window_resets() -> None:
    ref = _reference()
    monitor = FeatureDriftMonitor(ref)
    rng = np.random.default_rng(1)
    x = rng.random((50, 3))
    monitor.observe(x[:20], np.full(20, 0.9), np.zeros(20, dtype=int))
    monitor.observe(x[20:], np.full(30, 0.9), np.ones(30, dtype=int))
    counts = monitor.counts()
    for f in range(3):
        h = Histogram(ref.feature_edges[f])
        h.add(x[:, f])
        assert counts.features[f].tolist() == h.counts.tolist()
    assert counts.classes.tolist() == [20, 30, 0, 0]
    report = monitor.close_window()
    assert report.samples == 50
    assert not report.sufficient and not report.drifted  # under min_samples
    assert monitor.counts().samples == 0


def test_monitor_with_per_feature_edges_matches_shared_path() -> None:
    ref = _reference()
    data = ref.to_dict()
    data["features"][1]["edges"] = [0.0, 0.5, 1.0]
    data["features"][1]["freqs"] = [0.5, 0.5]
    ragged = DriftReference.from_dict(data)
    x = np.random.default_rng(2).random((30, 3))
    m = FeatureDriftMonitor(ragged)
    m.observe(x, np.full(30, 0.7), np.zeros(30, dtype=int))
    assert m.counts().features[1].sum() == 30


@pytest.mark.parametrize(
    ("shape", "conf", "pred"),
    [((5, 2), 5, 5), ((5, 3), 4, 5), ((5, 3), 5, 4)],
)
def test_monitor_refuses_shapes_that_do_not_fit(shape, conf, pred) -> None:  # type: ignore[no-untyped-def]
    monitor = FeatureDriftMonitor(_reference())
    with pytest.raises(ValueError):
        monitor.observe(np.zeros(shape), np.zeros(conf), np.zeros(pred, dtype=int))


def test_monitor_refuses_class_out_of_range() -> None:
    monitor = FeatureDriftMonitor(_reference())
    with pytest.raises(ValueError):
        monitor.observe(np.zeros((1, 3)), [0.5], [4])


def test_drift_report_from_merged_device_counts_equals_one_big_window() -> None:
    ref = _reference()
    rng = np.random.default_rng(4)
    xs = [rng.random((80, 3)) for _ in range(3)]
    devices = []
    for x in xs:
        m = FeatureDriftMonitor(ref)
        m.observe(x, np.full(80, 0.8), np.zeros(80, dtype=int))
        devices.append(m.counts())
    merged: WindowCounts = devices[0].merge(devices[1]).merge(devices[2])
    one = FeatureDriftMonitor(ref)
    one.observe(np.vstack(xs), np.full(240, 0.8), np.zeros(240, dtype=int))
    assert drift_report(ref, merged) == one.close_window()


def test_empty_window_scores_zero() -> None:
    report = FeatureDriftMonitor(_reference()).close_window()
    assert report.samples == 0 and report.score == 0.0 and not report.drifted
    assert report.to_dict()["drifted"] is False


def test_public_names_are_exported_once() -> None:
    # Order is ruff's RUF022 (isort-style), checked by `make lint`.
    assert len(set(drift.__all__)) == len(drift.__all__)
    for name in drift.__all__:
        assert hasattr(drift, name)


def test_drift_imports_nothing_else_of_edgewise() -> None:
    import ast
    from pathlib import Path

    for path in Path(drift.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("edgewise.") or node.module.startswith(
                    "edgewise.drift"
                ), (path.name, node.module)
