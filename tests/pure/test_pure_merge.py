from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.control._merge import DeploymentView, matching_deployments, merge_desired
from edgewise.control._selector import SelectorError, parse_selector

PIPELINES = ["digits", "ocr", "audio"]
SELECTORS = ["", "site=a", "site=b", "hw=x", "site in (a,b)", "hw!=x", "!hw", "site=a,hw=x"]


def dep(
    id: str, selector: str, priority: int, seq: int, pipelines: dict[str, str]
) -> DeploymentView:
    return DeploymentView(
        id=id,
        name=f"name-{id}",
        selector=selector,
        priority=priority,
        created_seq=seq,
        pipelines={p: {"model": m} for p, m in pipelines.items()},
    )


def test_highest_priority_wins_per_pipeline() -> None:
    base = dep("d1", "", 0, 1, {"digits": "m@1", "ocr": "o@1"})
    lab = dep("d2", "site=lab", 10, 2, {"digits": "m@2"})
    out = merge_desired([lab, base], {"site": "lab"})
    assert out == {"digits": ("d2", {"model": "m@2"}), "ocr": ("d1", {"model": "o@1"})}


def test_ties_go_to_the_newest_deployment() -> None:
    old = dep("d1", "", 5, 1, {"digits": "m@1"})
    new = dep("d2", "", 5, 2, {"digits": "m@2"})
    assert merge_desired([new, old], {})["digits"][0] == "d2"


def test_deleting_the_winner_falls_back_to_the_next() -> None:
    base = dep("d1", "", 0, 1, {"digits": "m@1"})
    top = dep("d2", "", 9, 2, {"digits": "m@2"})
    assert merge_desired([base, top], {})["digits"][0] == "d2"
    assert merge_desired([base], {})["digits"][0] == "d1"


def test_device_matching_nothing_gets_nothing() -> None:
    assert merge_desired([dep("d1", "site=a", 0, 1, {"digits": "m@1"})], {"site": "b"}) == {}


def test_matching_deployments_strongest_first() -> None:
    a, b, c = dep("a", "", 1, 1, {}), dep("b", "", 3, 2, {}), dep("c", "x", 9, 3, {})
    assert [d.id for d in matching_deployments([a, b, c], {})] == ["b", "a"]


def test_invalid_selector_raises_selector_error() -> None:
    with pytest.raises(SelectorError):
        merge_desired([dep("d1", "a in (", 0, 1, {"digits": "m@1"})], {})


# ------------------------------------------------------------------------- properties

_labels = st.fixed_dictionaries(
    {}, optional={"site": st.sampled_from(["a", "b", "c"]), "hw": st.sampled_from(["x", "y"])}
)


@st.composite
def _deployments(draw: st.DrawFn) -> list[DeploymentView]:
    n = draw(st.integers(0, 8))
    seqs = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True))
    out = []
    for i, seq in enumerate(seqs):
        names = draw(st.lists(st.sampled_from(PIPELINES), max_size=3, unique=True))
        out.append(
            dep(
                f"d{i}",
                draw(st.sampled_from(SELECTORS)),
                draw(st.integers(-2, 3)),
                seq,
                {p: f"{p}-model@{i}" for p in names},
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(_deployments(), _labels, st.randoms(use_true_random=False))
def test_merge_is_independent_of_input_order(deps, labels, rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(deps)
    rnd.shuffle(shuffled)
    assert merge_desired(shuffled, labels) == merge_desired(deps, labels)


@settings(max_examples=300, deadline=None)
@given(_deployments(), _labels)
def test_winner_matches_and_has_the_maximum_rank(deps, labels) -> None:  # type: ignore[no-untyped-def]
    by_id = {d.id: d for d in deps}
    out = merge_desired(deps, labels)
    for name, (winner_id, spec) in out.items():
        winner = by_id[winner_id]
        assert parse_selector(winner.selector).matches(labels)
        assert spec is winner.pipelines[name]
        rivals = [
            d for d in deps if name in d.pipelines and parse_selector(d.selector).matches(labels)
        ]
        assert winner.priority == max(d.priority for d in rivals)
        assert winner.created_seq == max(
            d.created_seq for d in rivals if d.priority == winner.priority
        )


@settings(max_examples=300, deadline=None)
@given(_deployments(), _labels)
def test_every_pipeline_of_a_matching_deployment_is_served(deps, labels) -> None:  # type: ignore[no-untyped-def]
    expected = {
        name for d in deps if parse_selector(d.selector).matches(labels) for name in d.pipelines
    }
    assert set(merge_desired(deps, labels)) == expected


@settings(max_examples=300, deadline=None)
@given(_deployments(), _labels, st.data())
def test_removing_a_deployment_falls_back_to_merge_without_it(deps, labels, data) -> None:  # type: ignore[no-untyped-def]
    if not deps:
        return
    gone = data.draw(st.sampled_from(deps))
    rest = [d for d in deps if d is not gone]
    before, after = merge_desired(deps, labels), merge_desired(rest, labels)
    for name, (winner_id, _) in before.items():
        if winner_id != gone.id:
            assert after[name][0] == winner_id  # unaffected pipelines keep their winner
        elif name in after:
            assert after[name][0] != gone.id


@settings(max_examples=200, deadline=None)
@given(_deployments(), _labels)
def test_device_matching_no_deployment_gets_nothing(deps, labels) -> None:  # type: ignore[no-untyped-def]
    none_match = [d for d in deps if not parse_selector(d.selector).matches(labels)]
    assert merge_desired(none_match, labels) == {}


@settings(max_examples=200, deadline=None)
@given(_deployments(), _labels)
def test_adding_a_weaker_deployment_changes_nothing(deps, labels) -> None:  # type: ignore[no-untyped-def]
    weak = dep("weak", "", -100, -1, dict.fromkeys(PIPELINES, "weak@1"))
    before = merge_desired(deps, labels)
    after = merge_desired([*deps, weak], labels)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(after[k][0] == "weak" for k in after if k not in before)


def test_a_device_leaves_a_rollouts_target_when_it_no_longer_decides_its_pipelines() -> None:
    from edgewise.control._rollout_observe import Target, departures, leaving_target

    own = DeploymentView("d1", "base", "site in (a,b)", 0, 1, {"digits": {}, "ocr": {}})
    rivals = [
        own,
        DeploymentView("d2", "pin-a", "site=a", 10, 2, {"ocr": {}}),  # stronger: priority
        DeploymentView("d3", "tie-b", "site=b,hw=x", 0, 3, {"digits": {}}),  # stronger: newer
        DeploymentView("d0", "old-b", "site=b", 0, 0, {"digits": {}}),  # weaker: older
        DeploymentView("d4", "other", "site=a", 50, 4, {"cam": {}}),  # no target pipeline
    ]
    why = leaving_target(own, rivals, Target({"digits": ("m", "2"), "ocr": ("o", "2")}))
    assert why("active", {"site": "b"}) is None
    assert why("active", {"site": "c"}) == (
        "relabelled out of the deployment's selector during the rollout"
    )
    assert why("decommissioned", {"site": "b"}) == "decommissioned during the rollout"
    assert why("active", {"site": "a"}) == (
        "pipeline ocr comes from deployment pin-a (priority 10), which outranks this one"
    )
    assert str(why("active", {"site": "b", "hw": "x"})).startswith("pipeline digits comes from")
    changed = [("x", "active", {"site": "b"}, 1.0), ("y", "active", {"site": "a"}, 2.0)]
    (gone,) = departures(changed, why).items()
    assert gone[0] == "y" and gone[1].at == 2.0 and gone[1].status.value == "departed"
