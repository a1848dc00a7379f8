from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.control.rollout import canary_size, plan_phases


def fleet(n: int, hws: int = 3, sites: int = 4) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"dev-{i:04d}", {"hw": f"hw{i % hws}", "site": f"s{(i // hws) % sites}"}) for i in range(n)
    ]


def test_phases_partition_the_snapshot() -> None:
    devs = fleet(100)
    phases = plan_phases(devs, canary="5%", waves=[20, 30, 100], seed=1)
    flat = [d for p in phases for d in p]
    assert sorted(flat) == sorted(d for d, _ in devs)
    assert len(flat) == len(set(flat))
    assert [len(p) for p in phases] == [5, 20, 30, 45]


def test_last_wave_takes_the_rest_whatever_its_percent() -> None:
    phases = plan_phases(fleet(10), canary=1, waves=[10, 1], seed=0)
    assert [len(p) for p in phases] == [1, 1, 8]


def test_no_waves_means_one_wave_with_the_rest() -> None:
    assert [len(p) for p in plan_phases(fleet(10), canary=2, waves=[])] == [2, 8]


def test_waves_beyond_the_snapshot_are_empty() -> None:
    phases = plan_phases(fleet(10), canary=0, waves=[80, 80, 80])
    assert [len(p) for p in phases] == [0, 8, 2, 0]


def test_canary_covers_every_label_value_when_large_enough() -> None:
    devs = fleet(200, hws=5, sites=7)
    labels = dict(devs)
    # 5 hw values + 7 sites: 7 devices can cover them all (each brings a new site).
    phases = plan_phases(devs, canary=7, waves=[100], seed=3)
    canary = phases[0]
    assert len(canary) == 7
    assert {labels[d]["hw"] for d in canary} == {f"hw{i}" for i in range(5)}
    assert {labels[d]["site"] for d in canary} == {f"s{i}" for i in range(7)}


def test_small_canary_covers_as_many_values_as_it_can() -> None:
    devs = fleet(100, hws=4, sites=4)
    labels = dict(devs)
    canary = plan_phases(devs, canary=2, seed=5)[0]
    pairs = {(k, labels[d][k]) for d in canary for k in ("hw", "site")}
    assert len(pairs) == 4  # each canary device brings a new hw and a new site


def test_devices_without_strata_labels_are_still_planned() -> None:
    devs = [("a", {}), ("b", {"hw": "x"}), ("c", {"site": "y"})]
    phases = plan_phases(devs, canary=2, waves=[100])
    assert sorted(phases[0]) == ["b", "c"]
    assert phases[1] == ["a"]


def test_plan_is_deterministic_and_independent_of_input_order() -> None:
    devs = fleet(60)
    a = plan_phases(devs, canary="10%", waves=[50, 100], seed=9)
    b = plan_phases(list(reversed(devs)), canary="10%", waves=[50, 100], seed=9)
    assert a == b
    c = plan_phases(devs, canary="10%", waves=[50, 100], seed=10)
    assert c != a


def test_empty_snapshot_gives_empty_phases() -> None:
    assert plan_phases([], canary="5%", waves=[50, 100]) == [[], [], []]


@pytest.mark.parametrize(
    ("canary", "total", "expected"),
    [
        (3, 10, 3),
        (30, 10, 10),
        ("5%", 100, 5),
        ("5%", 10, 1),
        ("1%", 1, 1),
        ("0%", 50, 0),
        ("100%", 7, 7),
        ("12", 20, 12),
        (" 10% ", 20, 2),
    ],
)
def test_canary_size(canary: int | str, total: int, expected: int) -> None:
    assert canary_size(canary, total) == expected


@pytest.mark.parametrize("canary", [-1, "-5%", "150%", "five", "5 %x", True])
def test_invalid_canary_is_refused(canary: object) -> None:
    with pytest.raises(ValueError):
        canary_size(canary, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("waves", [[-1], [101], ["ten"]])
def test_invalid_waves_are_refused(waves: list[object]) -> None:
    with pytest.raises(ValueError):
        plan_phases(fleet(5), waves=waves)  # type: ignore[arg-type]


def test_duplicate_device_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_phases([("a", {}), ("a", {})])


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 80),
    hws=st.integers(1, 5),
    sites=st.integers(1, 6),
    canary=st.one_of(st.integers(0, 90), st.integers(0, 100).map(lambda p: f"{p}%")),
    waves=st.lists(st.floats(0, 100), max_size=4),
    seed=st.integers(0, 1000),
)
def test_phases_always_partition_and_cover_strata(n, hws, sites, canary, waves, seed) -> None:  # type: ignore[no-untyped-def]
    devs = fleet(n, hws, sites)
    phases = plan_phases(devs, canary=canary, waves=waves, seed=seed)
    flat = list(itertools.chain.from_iterable(phases))
    assert sorted(flat) == sorted(d for d, _ in devs)
    assert len(phases) == 1 + max(1, len(waves))
    assert len(phases[0]) == canary_size(canary, n)
    labels = dict(devs)
    present = {(k, v) for _, lab in devs for k, v in lab.items()}
    if len(phases[0]) >= len(present):
        assert {(k, labels[d][k]) for d in phases[0] for k in ("hw", "site")} == present
