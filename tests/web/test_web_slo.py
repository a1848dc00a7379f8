"""SLO series and reference histograms of a model version's windows (pure)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from edgewise.web._slo import TOP_FEATURES, reference_histograms, slo_series

from .conftest import window

REFERENCE: dict[str, Any] = {
    "confidence": {"bin_edges": [i / 10 for i in range(11)], "frequencies": [0.0] * 9 + [1.0]},
    "class_prior": [0.1] * 10,
    "features": [
        {"name": f"px{i}", "bin_edges": [0.0, 0.5, 1.0], "frequencies": [0.9, 0.1]}
        for i in range(30)
    ],
}


def _records(n: int = 6) -> list[dict[str, Any]]:
    rng = random.Random(3)
    return [
        {
            "device_id": f"d{i % 2}",
            "cls": "metric",
            "ts": 0.0,
            "data": window("m", "1", 1000.0 + 60 * i, rng, REFERENCE),
        }
        for i in range(n)
    ]


def test_slo_series_gives_success_rate_and_latency_quantiles() -> None:
    series = {s.name: s.ys for s in slo_series(_records(), buckets=3)}
    assert set(series) == {
        "requests",
        "success rate",
        "p95 latency ms",
        "p99 latency ms",
        "drift score",
    }
    assert len(series["requests"]) == 3
    assert all(y is not None and 0.9 < y <= 1.0 for y in series["success rate"])
    p95 = [y for y in series["p95 latency ms"] if y is not None]
    assert p95 and all(2.0 <= y <= 20.0 for y in p95)


def test_slo_series_leaves_out_figures_nobody_sent() -> None:
    records = [{"cls": "metric", "ts": 5.0, "data": {"counts": {"ok": 9, "failed": 1}}}]
    series = {s.name: s.ys for s in slo_series(records)}
    assert series == {"requests": [10.0], "success rate": [0.9]}


def test_reference_histograms_show_the_moved_feature_first() -> None:
    hists = reference_histograms(_records(), REFERENCE)
    names = [h.name for h in hists]
    assert names[0] == "top-1 confidence" and names[1] == "predicted class vs prior"
    features = [h for h in hists if h.name.startswith("input ")]
    assert len(features) == TOP_FEATURES
    assert features[0].name == "input px20"  # the shifted one
    assert features[0].extra["psi"] > 1.0
    assert hists[0].reference == pytest.approx(REFERENCE["confidence"]["frequencies"])
    assert names[-1] == "end-to-end latency ms"
    assert sum(hists[-1].freqs) == pytest.approx(1.0)


def test_reference_histograms_without_windows_are_empty() -> None:
    assert reference_histograms([], REFERENCE) == []
