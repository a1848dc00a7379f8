"""Pure view models: fleet arithmetic, chart series, histograms, rollout cards."""

from __future__ import annotations

import pytest

from edgewise.control.rollout import Observations, RolloutSpec, create_rollout, pause, step
from edgewise.web._rollouts import allowed_actions, rollout_card
from edgewise.web._sources import ApiAnswer
from edgewise.web._views import (
    bucketed_series,
    compare_histograms,
    flatten_numbers,
    fleet_summary,
    model_placements,
    version_key,
    window_histograms,
)


def _pipe(model: str, version: str, status: str = "active") -> dict[str, str]:
    return {"model": model, "version": version, "status": status}


def test_fleet_summary_counts_connectivity_and_active_versions() -> None:
    devices = [
        {"id": "a", "status": "active", "online": True},
        {"id": "b", "status": "active", "online": False},
        {"id": "c", "status": "decommissioned", "online": False},
    ]
    pipelines = {
        "a": [_pipe("m", "1.0.0"), _pipe("n", "2.0.0", "failed")],
        "b": [_pipe("m", "1.0.0")],
        "c": [_pipe("m", "0.9.0")],
    }
    summary = fleet_summary(devices, pipelines)
    assert (summary.total, summary.online, summary.offline, summary.decommissioned) == (3, 1, 1, 1)
    assert summary.versions == [("m@1.0.0", 2)]  # failed and retired devices do not count
    assert summary.failing == 1


def test_model_placements_group_by_status() -> None:
    rows = [_pipe("m", "1"), _pipe("m", "1", "installing"), _pipe("m", "1"), {"model": ""}]
    assert model_placements(rows) == {"m@1": {"active": 2, "installing": 1}}


def test_flatten_numbers_skips_bools_and_lists() -> None:
    data = {"a": 1, "b": {"c": 2.5, "d": True, "e": [1, 2]}, "f": "x"}
    assert flatten_numbers(data) == {"a": 1.0, "b.c": 2.5}


def test_bucketed_series_leaves_gaps_where_a_field_is_missing() -> None:
    records = [
        {"cls": "metric", "ts": 10.0, "data": {"p95": 5}},
        {"cls": "metric", "ts": 0.0, "data": {"p95": 4, "ok": 10}},
        {"cls": "event", "ts": 3.0, "data": {"p95": 99}},
    ]
    series = {s.name: s.ys for s in bucketed_series(records, buckets=2)}
    assert series == {"ok": [10.0, None], "p95": [4.0, 5.0]}


def test_bucketed_series_sums_counters_and_averages_the_rest() -> None:
    records = [
        {"ts": 0.0, "data": {"counts": {"ok": 10}, "p95": 2.0}},
        {"ts": 0.1, "data": {"counts": {"ok": 5}, "p95": 4.0}},
        {"ts": 10.0, "data": {"counts": {"ok": 1}, "p95": 8.0}},
    ]
    series = {s.name: s.ys for s in bucketed_series(records, buckets=2)}
    assert series == {"counts.ok": [15.0, 1.0], "p95": [3.0, 8.0]}


def test_window_histograms_sum_counts_and_ignore_edges_and_odd_shapes() -> None:
    records = [
        {"data": {"confidence": {"edges": [0, 0.5, 1], "counts": [1, 3]}, "prior": [1, 1, 2]}},
        {"data": {"confidence": {"edges": [0, 0.5, 1], "counts": [2, 2]}, "prior": [1, 1]}},
    ]
    assert window_histograms(records) == {"confidence": [3.0, 5.0], "prior": [1.0, 1.0, 2.0]}


def test_compare_histograms_reports_psi_on_matching_bins() -> None:
    ref = {"bin_edges": [0.0, 0.5, 1.0], "frequencies": [0.5, 0.5]}
    same = compare_histograms("c", [10, 10], ref)
    shifted = compare_histograms("c", [1, 19], ref)
    assert same.reference == [0.5, 0.5]
    assert same.freqs == [0.5, 0.5]
    assert same.extra["psi"] == pytest.approx(0.0, abs=1e-6)
    assert shifted.extra["psi"] > 0.25


def test_compare_histograms_without_matching_reference_shows_observed_only() -> None:
    ref = {"bin_edges": [0.0, 1.0], "frequencies": [1.0]}
    hist = compare_histograms("c", [1, 3], ref)
    assert hist.reference is None
    assert hist.freqs == [0.25, 0.75]
    assert compare_histograms("c", [0, 0], None).freqs == [0.0, 0.0]


def test_compare_histograms_refuses_different_edges() -> None:
    ref = {"bin_edges": [0.0, 0.9, 1.0], "frequencies": [0.5, 0.5]}
    hist = compare_histograms("c", [1, 1], ref, edges=[0.0, 0.5, 1.0])
    assert hist.reference is None and hist.edges == [0.0, 0.5, 1.0]
    assert compare_histograms("c", [1, 1], ref, edges=[0.0, 0.9, 1.0]).reference == [0.5, 0.5]


def test_version_key_orders_numerically() -> None:
    versions = ["1.10.0", "1.2.0", "1.2.0-rc1", "0.9"]
    assert sorted(versions, key=version_key) == ["0.9", "1.2.0", "1.2.0-rc1", "1.10.0"]
    # Digits int() refuses (another script's, thousands of them) sort as text, not raise.
    odd = ["1.0.²", "1.0." + "9" * 5000, "1.0.3"]
    assert sorted(odd, key=version_key)[0] == "1.0.3"


def _engine_rollout() -> object:
    devices = [(f"d{i}", {"site": "a"}) for i in range(10)]
    return create_rollout("r1", "dep", 1, 2, devices, RolloutSpec(canary=2), 100.0)


def test_rollout_card_reads_the_engine_document() -> None:
    rollout = _engine_rollout()
    card = rollout_card(rollout.to_dict())  # type: ignore[attr-defined]
    assert (card.id, card.deployment, card.state) == ("r1", "dep", "pending")
    assert card.phases[0].name == "canary"
    assert card.phases[0].size == 2
    assert sum(p.size for p in card.phases) == 10
    assert card.counts == {"pending": 10}
    assert card.total == 10 and card.done == 0 and card.progress_pct == 0


def test_rollout_card_reads_a_status_view() -> None:
    doc = {
        "rollout": {"id": "r2", "deployment": "dep", "state": "running", "phase_index": 1},
        "phases": [
            {"name": "canary", "state": "passed", "size": 1, "counts": {"succeeded": 1}},
            {"state": "running", "devices": ["x", "y"], "counts": {"notified": 2}},
        ],
        "gates": [{"name": "success", "value": 50.0, "threshold": 90.0, "outcome": "insufficient"}],
    }
    card = rollout_card(doc)
    assert card.id == "r2" and card.phase_index == 1
    assert [(p.name, p.size) for p in card.phases] == [("canary", 1), ("wave 1", 2)]
    assert card.counts == {"succeeded": 1, "notified": 2}
    assert card.gates[0].threshold == 90.0
    assert card.progress_pct == 33
    assert card.phase_name == "wave 1"
    assert rollout_card({"id": "r3", "phase_index": 2, "phase_name": "wave 2"}).phase_name == (
        "wave 2"
    )


def test_rollout_card_lists_why_devices_are_held_back() -> None:
    why = "digits: incompatible: this agent does not know batching.overflow"
    doc = {"id": "r4", "counts": {"held_back": 3}, "held_back_reasons": [
        {"reason": why, "devices": 3}, "not a mapping"]}  # fmt: skip
    card = rollout_card(doc)
    assert card.held_back == [(3, why)]
    assert card.done == 3  # an outcome: they are not waited for


def test_viewer_gets_no_actions_and_operator_only_applicable_ones() -> None:
    pending = rollout_card(_engine_rollout().to_dict())  # type: ignore[attr-defined]
    rollout, _ = step(_engine_rollout(), Observations(), 101.0)  # type: ignore[arg-type]
    running = rollout_card(rollout.to_dict())
    paused, _ = pause(rollout, 102.0, "op")
    paused_card = rollout_card(paused.to_dict())
    assert allowed_actions(running, can_act=False) == []
    assert allowed_actions(paused_card, can_act=False) == []
    assert "pause" in allowed_actions(running, can_act=True)
    assert allowed_actions(paused_card, can_act=True) == ["resume", "abort"]
    assert allowed_actions(pending, can_act=True) == ["abort"]  # the engine cannot pause it


def test_api_answer_tells_a_missing_route_from_a_missing_object() -> None:
    route = ApiAnswer(404, {"error": {"code": "not_found", "message": "Not Found"}})
    thing = ApiAnswer(404, {"error": {"code": "not_found", "message": "no rollout r9"}})
    assert route.missing and not thing.missing
    assert thing.message == "no rollout r9"
