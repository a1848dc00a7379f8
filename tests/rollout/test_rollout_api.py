"""Rollouts through the operator API, in process, with the driver stepped by hand."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import edgewise.control._rollout_driver as driver_module
from edgewise.control._recompute import recompute_devices
from edgewise.control._rollout_store import RolloutStore, rollout_document
from edgewise.control._rollout_views import rollout_view
from edgewise.control._store import RawJSON
from edgewise.control.rollout import Rollout

from .inproc import Dev, World

SITES = ["a", "b"]
HW = ["small", "large"]


def _fleet(w: World, n: int = 8) -> list[Dev]:
    w.ok("POST", "/api/v1/deployments", json={
        "name": "base", "selector": "site in (a,b)",
        "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}})  # fmt: skip
    return [w.enroll(site=SITES[i % 2], hw=HW[(i // 2) % 2]) for i in range(n)]


def _revise(w: World, version: str) -> int:
    body = {"pipelines": {"digits": {"model": f"digits-mlp@{version}"}}}
    return int(w.ok("POST", "/api/v1/deployments/base/revisions", json=body)["revision"])


def _start(w: World, to: int, **spec: Any) -> dict[str, Any]:
    body = {"deployment": "base", "to_revision": to,
            "spec": {"canary": 2, "waves": [100], "soak_s": 0, **spec}}  # fmt: skip
    r = w.api("POST", "/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    view: dict[str, Any] = r.json()
    return view


def _phase_devices(w: World, rollout_id: str, phase: int, devs: list[Dev]) -> list[Dev]:
    listed = w.rollout(rollout_id, devices="all")["device_list"]
    ids = {d["id"] for d in listed if d["phase"] == phase}
    return [d for d in devs if d.id in ids]


def test_deploy_update_adds_a_revision_and_moves_no_device(world: World) -> None:
    devs = _fleet(world, 2)
    before = devs[0].desired()["revision"]
    assert _revise(world, "1.1.0") == 2
    r = world.api("POST", "/api/v1/deployments/base/revisions",
                  json={"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}})  # fmt: skip
    assert r.status_code == 200 and r.json()["created"] is False
    history = world.ok("GET", "/api/v1/deployments/base/revisions")
    assert history["stable_revision"] == 1
    assert [(h["revision"], h["stable"]) for h in history["revisions"]] == [(1, True), (2, False)]
    assert devs[0].desired()["revision"] == before
    assert devs[0].version() == "1.0.0"


def test_a_rollout_moves_the_canary_first_then_the_wave_then_completes(world: World) -> None:
    devs = _fleet(world)
    ro = _start(world, _revise(world, "1.1.0"))
    assert [p["size"] for p in ro["phases"]] == [2, 6]
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    others = [d for d in devs if d not in canary]
    assert {d.version() for d in canary} == {"1.1.0"}
    assert {d.version() for d in others} == {"1.0.0"}
    for d in canary:
        d.report("1.1.0", "active")
    world.tick()
    assert world.rollout(ro["id"])["phase_index"] == 1
    assert {d.version() for d in others} == {"1.1.0"}
    for d in others:
        d.report("1.1.0", "active")
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "completed"
    assert world.ok("GET", "/api/v1/deployments/base/revisions")["stable_revision"] == 2
    log = RolloutStore(world.plane).notifications(ro["id"])
    assert Counter((n["device_id"], n["kind"]) for n in log) == {(d.id, "notify"): 1 for d in devs}
    started = [a for a in world.audit("phase.") if a["object"] == f"rollout:{ro['id']}"]
    assert Counter(a["action"] for a in started) == {"phase.started": 2, "phase.passed": 2}


def test_a_failed_canary_rolls_back_every_moved_device(world: World) -> None:
    devs = _fleet(world)
    ro = _start(world, _revise(world, "2.0.0"), gates={"error_pct": 10})
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    revisions = {d.id: d.desired()["revision"] for d in canary}
    canary[0].report("2.0.0", "failed", "health check failed")
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "rolled_back"
    assert "error" in view["reason"]
    for d in canary:
        doc = d.desired()
        assert doc["pipelines"]["digits"]["model"]["version"] == "1.0.0"
        assert doc["revision"] == revisions[d.id] + 1
    assert {d.version() for d in devs} == {"1.0.0"}


class _FailOnce:
    """`recompute_devices` whose first write fails as a PostgreSQL deadlock victim does."""

    def __init__(self) -> None:
        self.failures = 0

    def __call__(self, plane: Any, ids: Any) -> int:
        if ids and not self.failures:  # the first write of any document
            self.failures += 1
            raise OperationalError("UPDATE devices", {}, Exception("deadlock detected"))
        return recompute_devices(plane, ids)


def test_documents_a_failed_write_left_behind_are_written_on_the_next_tick(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1)
    flaky = _FailOnce()
    monkeypatch.setattr(driver_module, "recompute_devices", flaky)
    world.tick()  # the canary is committed, its document write fails
    (canary,) = _phase_devices(world, ro["id"], 0, devs)
    assert flaky.failures == 1 and world.driver.owed == 1
    assert canary.version() == "1.0.0"
    world.tick()  # owed, so written now
    assert world.driver.owed == 0 and canary.version() == "1.1.0"
    log = RolloutStore(world.plane).notifications(ro["id"])
    assert [(n["device_id"], n["kind"]) for n in log] == [(canary.id, "notify")]


def test_a_rollback_whose_revert_write_fails_still_returns_every_device(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "2.0.0"), canary=1, gates={"error_pct": 10})
    world.tick()
    (canary,) = _phase_devices(world, ro["id"], 0, devs)
    assert canary.version() == "2.0.0"
    flaky = _FailOnce()
    monkeypatch.setattr(driver_module, "recompute_devices", flaky)
    canary.report("2.0.0", "failed", "health check failed")
    world.tick()  # rolled back (terminal, never stepped again); the revert write fails
    assert world.rollout(ro["id"])["state"] == "rolled_back"
    assert flaky.failures == 1 and canary.version() == "2.0.0"
    world.tick()
    assert world.driver.owed == 0
    assert {d.version() for d in devs} == {"1.0.0"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_world(
    request: pytest.FixtureRequest, tmp_path: Path, examples: dict[str, Any]
) -> Iterator[World]:
    from .inproc import make_world

    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    yield from make_world(tmp_path, examples, url)


def test_a_rollback_a_dead_driver_left_unwritten_is_written_by_the_next_one(
    any_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import select

    from edgewise.control._schema import rollouts

    world = any_world
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "2.0.0"), canary=1, gates={"error_pct": 10})
    world.tick()
    (canary,) = _phase_devices(world, ro["id"], 0, devs)
    monkeypatch.setattr(driver_module, "recompute_devices", _FailOnce())
    canary.report("2.0.0", "failed", "health check failed")
    world.tick()  # rolled back; the revert write fails, and then this driver dies
    assert world.rollout(ro["id"])["state"] == "rolled_back"
    assert canary.version() == "2.0.0"

    def lease() -> tuple[str | None, float | None]:
        r = rollouts
        with world.plane.store.engine.connect() as c:
            row = c.execute(select(r.c.lease_owner, r.c.lease_expires).where(r.c.id == ro["id"]))
            owner, expires = row.one()
            return owner, expires

    world.driver = driver_module.RolloutDriver(world.plane, owner="after-restart")
    world.tick()  # the dead driver's lease has not run out: left alone
    assert lease()[0] == "test-driver" and canary.version() == "2.0.0"
    world.clock.now += world.driver.lease_s + 1
    world.tick()
    assert {d.version() for d in devs} == {"1.0.0"}
    assert lease() == (None, None)  # settled, and let go
    log = RolloutStore(world.plane).notifications(ro["id"])
    assert [n["kind"] for n in log].count("revert") == 1  # logged once, by the dead driver


def _canary_passed(w: World) -> dict[str, Any]:
    """A rollout of 8 devices whose 2-device canary succeeded: the driver wrote the wave."""
    devs = _fleet(w, 8)
    ro = _start(w, _revise(w, "1.1.0"), canary=2)
    w.tick()
    for d in _phase_devices(w, ro["id"], 0, devs):
        d.report("1.1.0", "active")
    w.tick()
    return ro


def test_the_status_view_serves_what_the_driver_wrote_without_parsing_it_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = _canary_passed(world)
    parses: list[str] = []
    parse = Rollout.from_dict

    def counted(data: Any) -> Rollout:
        parses.append(str(data["id"]))
        return parse(data)

    monkeypatch.setattr(Rollout, "from_dict", counted)
    view = world.rollout(ro["id"])
    assert parses == []  # the value the driver wrote, handed over
    store = RolloutStore(world.plane)
    row, head = store.get(ro["id"]), store.head(ro["id"])
    assert row is not None and head is not None
    assert view == rollout_view(head, parse(row["document"]))
    assert view["phase_index"] == 1
    # A write by another writer (an operator's command) is read and parsed again.
    assert world.api("POST", f"/api/v1/rollouts/{ro['id']}/pause").status_code == 200
    assert world.rollout(ro["id"])["state"] == "paused"
    assert parses == [ro["id"]]


def test_the_stored_document_is_the_rollout_and_non_finite_numbers_are_still_refused(
    world: World,
) -> None:
    ro = _canary_passed(world)
    store = RolloutStore(world.plane)
    row = store.get(ro["id"])
    assert row is not None
    rollout = Rollout.from_dict(row["document"])
    fast = rollout_document(rollout)
    assert isinstance(fast, RawJSON)  # every number finite: serialised by orjson
    assert json.loads(fast) == json.loads(json.dumps(rollout.to_dict()))
    assert Rollout.from_dict(json.loads(fast)) == rollout
    some = next(iter(rollout.devices))
    for bad in (
        dataclasses.replace(rollout, created_at=math.nan),
        dataclasses.replace(
            rollout,
            devices={
                **rollout.devices,
                some: dataclasses.replace(rollout.devices[some], updated_at=math.inf),
            },
        ),
    ):
        careful = rollout_document(bad)
        assert not isinstance(careful, str)  # the careful encoder's way, which refuses
        with pytest.raises(ValueError):
            json.dumps(careful, allow_nan=False)


def _stored_states(w: World, rollout_id: str) -> dict[str, str]:
    """Device -> state in the stored rollout (not the driver's memory)."""
    row = RolloutStore(w.plane).get(rollout_id)
    assert row is not None
    return {d: str(s[0]) for d, s in row["document"]["devices"].items()}


def _one_canary_success_held(w: World) -> tuple[dict[str, Any], list[Dev], Dev, Dev]:
    """A 2-device canary; the first reports success just after a write: held in memory."""
    devs = _fleet(w, 8)
    ro = _start(w, _revise(w, "1.1.0"), canary=2)
    w.tick()
    first, second = _phase_devices(w, ro["id"], 0, devs)
    first.report("1.1.0", "active")
    w.tick()
    assert _stored_states(w, ro["id"])[first.id] == "notified"
    return ro, devs, first, second


def test_held_device_progress_is_stored_a_second_on_even_when_nothing_else_changes(
    world: World,
) -> None:
    ro, _devs, first, _second = _one_canary_success_held(world)
    world.clock.now += 1.5
    world.tick()  # no new report, no other change: the held progress is written
    assert _stored_states(world, ro["id"])[first.id] == "succeeded"
    assert world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{first.id}")["state"] == (
        "succeeded"
    )
    assert world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{first.id}")["state"] == (
        "succeeded"
    )


def test_device_progress_held_between_writes_survives_an_operators_command(
    world: World,
) -> None:
    ro, devs, first, second = _one_canary_success_held(world)
    world.clock.now += 0.5  # a later report elsewhere moves the report cursor past it
    next(d for d in devs if d not in (first, second)).report("1.0.0", "active")
    world.tick()
    # An operator's command moves the stored row on: the driver reloads it and re-reads
    # the reports its held progress came from, so the first success is not lost.
    assert world.api("POST", f"/api/v1/rollouts/{ro['id']}/pause").status_code == 200
    assert world.api("POST", f"/api/v1/rollouts/{ro['id']}/resume").status_code == 200
    second.report("1.1.0", "active")
    world.tick()
    assert world.rollout(ro["id"])["phase_index"] == 1  # both canary devices counted
    world.clock.now += 2  # past progress_every_s: progress alone is stored again
    wave = _phase_devices(world, ro["id"], 1, devs)
    wave[0].report("1.1.0", "active")
    world.tick()
    assert list(_stored_states(world, ro["id"]).values()).count("succeeded") == 3


def test_devices_enrolled_after_the_start_stay_on_the_stable_revision(world: World) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1)
    world.tick()
    late = world.enroll(site="a", hw="small")
    assert late.version() == "1.0.0"
    r = world.api("GET", f"/api/v1/rollouts/{ro['id']}/devices/{late.id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_in_rollout"
    for _ in range(3):
        for d in devs:
            if d.version() == "1.1.0":
                d.report("1.1.0", "active")
        world.tick()
    assert world.rollout(ro["id"])["state"] == "completed"
    assert late.version() == "1.1.0"  # the new stable revision reaches it after completion
    assert world.rollout(ro["id"])["devices"] == 4


def test_a_device_past_its_timeout_is_timed_out_and_a_late_success_does_not_save_it(
    world: World,
) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1, device_timeout_s=60,
                gates={"error_pct": 50})  # fmt: skip
    world.tick()
    (canary,) = _phase_devices(world, ro["id"], 0, devs)
    world.clock.now += 30
    canary.desired()  # it fetched the new revision, then never said how it went: stuck
    world.clock.now += 31
    world.tick()
    canary.report("1.1.0", "active")
    world.tick()
    why = world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{canary.id}")
    assert why["state"] == "timed_out"
    assert "later reports are ignored" in why["why"]
    assert world.rollout(ro["id"])["state"] == "rolled_back"


def test_a_device_offline_since_it_was_notified_is_held_back_and_counts_once_back(
    world: World,
) -> None:
    # A camera switched off for the night timed out like a stuck install, counted as a
    # failure and rolled the revision back for everyone.
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=2, device_timeout_s=60,
                gates={"error_pct": 10})  # fmt: skip
    world.tick()
    on, off = _phase_devices(world, ro["id"], 0, devs)
    on.report("1.1.0", "active")
    world.clock.now += 61
    world.tick()
    assert world.rollout(ro["id"], devices="all")["phase_index"] == 1
    why = world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{off.id}")
    assert why["state"] == "held_back"
    assert why["why"].startswith("held back: offline: not seen since it was notified")
    assert [a["action"] for a in world.audit("devices.")] == ["devices.offline"]
    off.report("1.1.0", "active")  # back: it installs, and counts
    world.clock.now += 2  # past the driver's hold on progress-only writes
    world.tick()
    assert world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{off.id}")["state"] == "succeeded"


def test_pause_resume_and_abort_are_audited_under_the_operator(world: World) -> None:
    devs = _fleet(world, 4)
    operator = world.token("operator")
    ro = _start(world, _revise(world, "1.1.0"), canary=1)
    world.tick()
    r = world.api("POST", f"/api/v1/rollouts/{ro['id']}/pause", token=operator)
    assert r.status_code == 200 and r.json()["state"] == "paused"
    for d in devs:
        if d.version() == "1.1.0":
            d.report("1.1.0", "active")
    world.tick()
    assert world.rollout(ro["id"])["phase_index"] == 0  # paused: nothing advances
    r = world.api("POST", f"/api/v1/rollouts/{ro['id']}/approve", token=operator)
    assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_state"
    assert world.api("POST", f"/api/v1/rollouts/{ro['id']}/resume", token=operator).json()[
        "state"] == "running"  # fmt: skip
    r = world.api("POST", f"/api/v1/rollouts/{ro['id']}/abort", token=operator)
    assert r.json()["state"] == "aborted"
    assert {d.version() for d in devs} == {"1.0.0"}
    actions = [(a["action"], a["actor"]) for a in world.audit("rollout.")]
    assert ("rollout.paused", "token:operator") in [(x, y.split("(")[0]) for x, y in actions]
    assert {"rollout.start", "rollout.paused", "rollout.resumed", "rollout.aborted"} <= {
        a for a, _ in actions
    }


def test_approval_holds_the_next_phase_until_an_operator_approves(world: World) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1, require_approval=[True])
    world.tick()
    for d in devs:
        if d.version() == "1.1.0":
            d.report("1.1.0", "active")
    world.tick()
    assert world.rollout(ro["id"])["state"] == "awaiting_approval"
    assert sum(d.version() == "1.1.0" for d in devs) == 1
    world.ok("POST", f"/api/v1/rollouts/{ro['id']}/approve")
    world.tick()
    assert {d.version() for d in devs} == {"1.1.0"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"deployment": "nope", "to_revision": 2}, 404, "not_found"),
        ({"deployment": "base", "to_revision": 1}, 409, "already_stable"),
        ({"deployment": "base", "to_revision": 9}, 404, "not_found"),
        ({"deployment": "base", "to_revision": 2, "spec": {"canary": "lots"}}, 422,
         "invalid_spec"),
        ({"deployment": "base", "to_revision": 2, "spec": {"bogus": 1}}, 422, "invalid_spec"),
        ({"deployment": "base", "to_revision": 2, "spec": {"waves": [150]}}, 422,
         "invalid_spec"),
        ({"deployment": "base", "to_revision": 2, "spec": {"strata_keys": [["hw"]]}}, 422,
         "invalid_spec"),
        ({"deployment": "base", "to_revision": 2, "spec": {"strata_keys": [{}]}}, 422,
         "invalid_spec"),
        ({"deployment": "base", "to_revision": 0}, 422, "invalid_request"),
        ({"deployment": "base", "to_revision": 2, "extra": True}, 422, "invalid_request"),
        ({"deployment": "base", "to_revision": "two"}, 422, "invalid_request"),
    ],
)  # fmt: skip
def test_bad_rollout_requests_are_refused_with_4xx(
    world: World, body: dict[str, Any], status: int, code: str
) -> None:
    _fleet(world, 2)
    _revise(world, "1.1.0")
    r = world.api("POST", "/api/v1/rollouts", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


HUGE = 10**400  # a YAML or JSON spec may hold it; as a float it overflows


@pytest.mark.parametrize(
    "spec",
    [
        {"soak_s": HUGE},
        {"device_timeout_s": HUGE},
        {"gate_timeout_s": HUGE},
        {"rate_per_min": HUGE},
        {"rate_ramp": HUGE},
        {"rate_ramp": 1e6},  # finite, but its 64th power is not
        {"canary": HUGE},
        {"canary": "9" * 400},
        {"soak_s": math.nan},
        {"device_timeout_s": math.inf},
        {"gate_timeout_s": math.inf},
        {"gates": {"min_reporting": HUGE}},
        {"gates": {"min_inferences": HUGE}},
        {"gates": {"min_reporting": math.nan}},
        {"gates": {"max_latency_ratio": HUGE}},
        {"gates": {"max_error_rate_delta": math.nan}},
        {"gates": {"max_confidence_shift": math.inf}},
        {"gates": {"max_input_drift": "high"}},
    ],
)
def test_spec_numbers_out_of_bounds_or_not_finite_are_refused_at_start(
    world: World, spec: dict[str, Any]
) -> None:
    _fleet(world, 2)
    body = {"deployment": "base", "to_revision": _revise(world, "1.1.0"), "spec": spec}
    raw = json.dumps(body)  # NaN and Infinity as Python's parser takes them
    r = world.api(
        "POST", "/api/v1/rollouts", content=raw, headers={"content-type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_spec"), r.text
    assert world.api("GET", "/api/v1/rollouts").json() == []


def test_a_duration_over_a_year_is_refused_naming_the_bound(world: World) -> None:
    _fleet(world, 2)
    body = {"deployment": "base", "to_revision": _revise(world, "1.1.0"),
            "spec": {"soak_s": 366 * 86400}}  # fmt: skip
    r = world.api("POST", "/api/v1/rollouts", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "soak_s must be a finite number within 0-31536000 s (365 days)"
    )
    body["spec"] = {"soak_s": 365 * 86400}
    assert world.api("POST", "/api/v1/rollouts", json=body).status_code == 201


def test_a_rollout_some_targeted_agents_cannot_run_is_refused_unless_forced(
    world: World,
) -> None:
    # Their devices would refuse it and stay behind (held back): the operator decides.
    from edgewise.protocol import spec_vocabulary, vocabulary_digest

    devs = _fleet(world, 4)
    new_terms = spec_vocabulary()
    old_terms = [t for t in new_terms if not t.startswith("batching.overflow")]
    for dev, terms in ((devs[0], old_terms), (devs[1], new_terms)):
        agent = {"spec_digest": vocabulary_digest(terms), "spec_vocabulary": terms}
        dev.report("1.0.0", "active", agent=agent)
    plain = _revise(world, "1.1.0")
    body = {"pipelines": {"digits": {"model": "digits-mlp@1.1.0",
                                     "batching": {"overflow": "drop_oldest"}}}}  # fmt: skip
    newer = int(world.ok("POST", "/api/v1/deployments/base/revisions", json=body)["revision"])
    start = {"deployment": "base", "to_revision": newer}
    r = world.api("POST", "/api/v1/rollouts", json=start)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "agents_too_old"), r.text
    message = r.json()["error"]["message"]
    assert message.startswith(
        f"1 of 4 targeted devices run agents that cannot run revision {newer}"
    )
    assert f"{devs[0].id}: pipeline 'digits': the agent does not know batching.overflow" in message
    assert world.ok("GET", "/api/v1/rollouts") == []
    ro = _start(world, plain)  # nothing in it the old agent lacks
    world.ok("POST", f"/api/v1/rollouts/{ro['id']}/abort")
    r = world.api("POST", "/api/v1/rollouts", json={**start, "force": True})
    assert r.status_code == 201, r.text
    assert r.json()["devices"] == 4


def test_a_rollout_some_targeted_devices_lack_the_means_for_is_refused_unless_forced(
    world: World,
) -> None:
    # What the models' manifests require (here, the runtime) counts like the vocabulary.
    devs = _fleet(world, 3)
    no_ort = world.enroll(capabilities={"runtimes": {"tflite": "2.16"}}, site="a", hw="small")
    rev = _revise(world, "1.1.0")
    start = {"deployment": "base", "to_revision": rev}
    r = world.api("POST", "/api/v1/rollouts", json=start)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "devices_cannot_run"), r.text
    message = r.json()["error"]["message"]
    assert message.startswith(
        f"1 of 4 targeted devices cannot run revision {rev}: {no_ort.id}: runtime onnxruntime"
    ), message
    assert message.endswith("rollout start --force): they would be held back"), message
    assert world.ok("GET", "/api/v1/rollouts") == []
    # An old agent as well: still one count, and no longer only a matter of agents.
    from edgewise.protocol import spec_vocabulary, vocabulary_digest

    old = [t for t in spec_vocabulary() if not t.startswith("batching.overflow")]
    devs[0].report("1.0.0", "active", agent={
        "spec_digest": vocabulary_digest(old), "spec_vocabulary": old})  # fmt: skip
    body = {"pipelines": {"digits": {"model": "digits-mlp@1.1.0",
                                     "batching": {"overflow": "drop_oldest"}}}}  # fmt: skip
    newer = int(world.ok("POST", "/api/v1/deployments/base/revisions", json=body)["revision"])
    r = world.api("POST", "/api/v1/rollouts", json={**start, "to_revision": newer})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "devices_cannot_run"), r.text
    assert r.json()["error"]["message"].startswith("2 of 4 targeted devices cannot run")
    r = world.api("POST", "/api/v1/rollouts", json={**start, "force": True})
    assert r.status_code == 201, r.text
    assert r.json()["devices"] == 4
    audit = world.audit("rollout.start")
    assert len(audit) == 1 and audit[0]["result"].endswith("devices=4"), audit


def test_devices_that_cannot_run_a_forced_rollout_are_held_back_not_counted_as_failed(
    world: World,
) -> None:
    devs = _fleet(world, 8)
    ro = _start(world, _revise(world, "1.1.0"), gates={"error_pct": 10, "success_pct": 100})
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    too_old = "incompatible: this agent does not know batching.spill (the spec needs a newer agent)"
    canary[0].report("1.1.0", "failed", too_old)
    canary[1].report("1.1.0", "active")
    world.tick()
    view = world.rollout(ro["id"], devices="held_back")
    assert view["state"] == "running" and view["phase_index"] == 1, view["reason"]
    assert [d["id"] for d in view["device_list"]] == [canary[0].id]
    assert view["device_list"][0]["reason"] == f"digits: {too_old}"
    # It was asked, and is left on what it serves: asked again once its agent is upgraded.
    assert canary[0].desired()["pipelines"]["digits"]["model"]["version"] == "1.1.0"
    wave = _phase_devices(world, ro["id"], 1, devs)
    for d in wave:
        d.report("1.1.0", "active")
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "completed"
    assert (view["succeeded"], view["failed"], view["held_back"]) == (7, 0, 1)
    from rich.console import Console

    from edgewise.cli._rollout import _render

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(_render(view))  # `rollout status`, as an operator reads it
    shown = console.export_text()
    assert "1 held back: they cannot run this revision" in shown
    assert f"     1  digits: {too_old}" in shown
    assert view["held_back_reasons"] == [{"reason": f"digits: {too_old}", "devices": 1}]
    # The console's rollout page says the same.
    base = str(world.client.base_url)
    r = world.client.post(
        "/login", data={"token": world.admin, "next": "/"}, headers={"origin": base}
    )
    assert r.status_code in (200, 303), r.text
    page = world.client.get(f"/rollouts/{ro['id']}").text
    assert 'data-testid="held-back"' in page and f"digits: {too_old}" in page
    listed = world.ok("GET", "/api/v1/rollouts")
    assert listed[0]["held_back"] == 1
    completed = world.audit("rollout.completed")
    assert [a["result"] for a in completed] == ["ok revision=2 held_back=1"]


def test_a_model_that_does_not_load_is_a_failure_not_a_device_held_back(world: World) -> None:
    devs = _fleet(world, 8)
    ro = _start(world, _revise(world, "1.1.0"), gates={"error_pct": 10})
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    canary[0].report("1.1.0", "failed", "incompatible: model does not load: opset 99")
    world.tick()
    assert world.rollout(ro["id"])["state"] == "rolled_back"


def test_the_retention_job_forgets_vocabularies_no_device_reports(world: World) -> None:
    from edgewise.protocol import vocabulary_digest

    devs = _fleet(world, 2)
    for terms in (["made.up.1"], ["made.up.2"], ["model", "name"]):
        agent = {"spec_digest": vocabulary_digest(terms), "spec_vocabulary": terms}
        devs[0].report("1.0.0", "active", agent=agent)
    done = world.ok("POST", "/api/v1/telemetry/retention")
    assert done["vocabularies_deleted"] == 0  # sent just now
    world.clock.now += 2 * 86_400
    assert world.ok("POST", "/api/v1/telemetry/retention")["vocabularies_deleted"] == 2
    kept = world.plane.store.vocabularies([vocabulary_digest(["model", "name"])])
    assert list(kept) == [vocabulary_digest(["model", "name"])]


def test_one_active_rollout_per_deployment(world: World) -> None:
    _fleet(world, 2)
    rev = _revise(world, "1.1.0")
    _start(world, rev)
    r = world.api("POST", "/api/v1/rollouts",
                  json={"deployment": "base", "to_revision": rev})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_a_promote_is_refused_while_a_rollout_would_undo_it(world: World) -> None:
    # An operator promoting a revision (say, back to 1.0.0 at 3 a.m.) during a rollout
    # got 201 "stable", then the rollout went on and, on completing, made its own
    # revision stable and moved every device to it: the promote was silently undone.
    devs = _fleet(world)
    ro = _start(world, _revise(world, "1.1.0"))
    world.tick()
    path = "/api/v1/deployments/base/revisions"
    back = {"pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}, "note": "back"}
    r = world.api("POST", path, json=back | {"promote": True})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "rollout_active"
    assert ro["id"] in error["message"] and "rollout abort" in error["message"]
    history = world.ok("GET", path)
    assert (history["stable_revision"], len(history["revisions"])) == (1, 2)  # nothing added
    world.ok("POST", f"/api/v1/rollouts/{ro['id']}/abort", json={"reason": "bad model"})
    world.tick()
    r = world.api("POST", path, json=back | {"promote": True})
    assert r.status_code == 201 and r.json()["stable"] is True, r.text
    assert world.ok("GET", path)["stable_revision"] == 3
    assert {d.version() for d in devs} == {"1.0.0"}


def test_a_yanked_model_is_rolled_out_no_further(world: World) -> None:
    # Yanking a model at 3 a.m. meant only that no new deployment could pin it: a
    # rollout to it could still be started, and one running kept moving devices to it.
    devs = _fleet(world)
    rev = _revise(world, "1.1.0")
    yank = "/api/v1/models/digits-mlp/1.1.0/yank"
    assert world.ok("POST", yank)["rollouts"] == []
    r = world.api("POST", "/api/v1/rollouts", json={"deployment": "base", "to_revision": rev})
    assert r.status_code == 409 and r.json()["error"]["code"] == "yanked", r.text
    assert "model unyank digits-mlp@1.1.0" in r.json()["error"]["message"]
    world.ok("POST", "/api/v1/models/digits-mlp/1.1.0/unyank")
    ro = _start(world, rev)
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    others = [d for d in devs if d not in canary]
    assert world.ok("POST", yank)["rollouts"] == [ro["id"]]
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "paused" and "digits-mlp@1.1.0 was yanked" in view["reason"]
    for d in canary:
        d.report("1.1.0", "active")
    world.tick(3)
    assert world.rollout(ro["id"])["state"] == "paused"
    assert {d.version() for d in canary} == {"1.1.0"}  # what runs it keeps it
    assert {d.version() for d in others} == {"1.0.0"}  # nobody else gets it
    r = world.api("POST", f"/api/v1/rollouts/{ro['id']}/resume")
    assert r.status_code == 409 and r.json()["error"]["code"] == "yanked", r.text
    assert world.rollout(ro["id"])["state"] == "paused"
    world.ok("POST", "/api/v1/models/digits-mlp/1.1.0/unyank")
    assert world.ok("POST", f"/api/v1/rollouts/{ro['id']}/resume")["state"] == "running"
    world.tick()
    assert {d.version() for d in others} == {"1.1.0"}
    actions = [a["action"] for a in world.audit("model.")]
    assert actions.count("model.yank") == 2 and actions.count("model.unyank") == 2


@pytest.mark.parametrize("notified", [True, False])
def test_devices_that_leave_the_target_during_a_rollout_are_neither_waited_for_nor_counted(
    world: World, notified: bool
) -> None:
    # A canary device retired or relabelled elsewhere mid-rollout timed out, counted as
    # a failure, and rolled back the rollout of a good model for the whole fleet.
    devs = _fleet(world)
    ro = _start(world, _revise(world, "1.1.0"), gates={"error_pct": 10}, device_timeout_s=60)
    world.tick()
    canary = _phase_devices(world, ro["id"], 0, devs)
    wave = [d for d in devs if d not in canary]
    # Decommissioned, and relabelled out of the selector: canary devices (already moved)
    # or wave devices (not yet moved).
    retired, moved_away = (canary[1], wave[0]) if notified else (wave[0], wave[1])
    world.ok("POST", f"/api/v1/devices/{retired.id}/decommission")
    world.ok("POST", f"/api/v1/devices/{moved_away.id}/labels", json={"set": {"site": "c"}})
    gone = {retired.id: "decommissioned", moved_away.id: "relabelled out"}
    for d in canary:
        if d.id not in gone:
            d.report("1.1.0", "active")
    world.tick()
    view = world.rollout(ro["id"])
    assert (view["state"], view["phase_index"]) == ("running", 1), view
    for d in wave:
        if d.id not in gone:
            d.report("1.1.0", "active")
    world.clock.now += 120  # past every device timeout
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "completed", view["reason"]
    assert (view["succeeded"], view["failed"], view["held_back"]) == (6, 0, 2)
    listed = {d["id"]: d for d in world.rollout(ro["id"], devices="all")["device_list"]}
    for device_id, why in gone.items():
        assert listed[device_id]["state"] == "held_back"
        assert (
            why in listed[device_id]["reason"]
            and "during the rollout" in listed[device_id]["reason"]
        )
    assert world.ok("GET", "/api/v1/deployments/base/revisions")["stable_revision"] == 2
    assert moved_away.desired()["pipelines"] == {}  # it follows its new labels


def test_devices_a_stronger_deployment_serves_are_held_back_not_waited_for(world: World) -> None:
    # Site a pins its own digits model in a stronger deployment: rolling out the base
    # deployment cannot move those devices, which timed out and rolled the rollout back.
    devs = _fleet(world)
    world.ok("POST", "/api/v1/deployments", json={
        "name": "pin-a", "selector": "site=a", "priority": 10,
        "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}})  # fmt: skip
    ro = _start(world, _revise(world, "1.1.0"), gates={"error_pct": 10}, device_timeout_s=60)
    world.tick()
    pinned = {d.id for d in devs if d.labels["site"] == "a"}
    for d in devs:
        if d.id not in pinned and d.version() == "1.1.0":
            d.report("1.1.0", "active")
    world.tick(2)
    for d in devs:
        if d.id not in pinned:
            d.report("1.1.0", "active")
    world.clock.now += 120  # past every device timeout
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "completed", view["reason"]
    assert (view["succeeded"], view["failed"], view["held_back"]) == (4, 0, 4)
    (why,) = view["held_back_reasons"]
    assert why["devices"] == 4
    assert why["reason"].startswith("pipeline digits comes from deployment pin-a (priority 10)")
    assert {d.version() for d in devs if d.id in pinned} == {"1.0.0"}


def test_viewers_read_and_operators_act(world: World) -> None:
    _fleet(world, 2)
    rev = _revise(world, "1.1.0")
    viewer, operator = world.token("viewer"), world.token("operator")
    body = {"deployment": "base", "to_revision": rev}
    assert world.api("POST", "/api/v1/rollouts", token=viewer, json=body).status_code == 403
    ro = world.api("POST", "/api/v1/rollouts", token=operator, json=body).json()
    assert world.api("GET", f"/api/v1/rollouts/{ro['id']}", token=viewer).status_code == 200
    assert world.api("GET", "/api/v1/rollouts", token=viewer).status_code == 200
    assert world.api("POST", f"/api/v1/rollouts/{ro['id']}/pause",
                     token=viewer).status_code == 403  # fmt: skip
    revise = {"pipelines": {"digits": {"model": "digits-mlp@2.0.0"}}}
    assert world.api("POST", "/api/v1/deployments/base/revisions", token=viewer,
                     json=revise).status_code == 403  # fmt: skip
    outsider = world.token("operator", scope="site=zzz")
    assert world.api("GET", f"/api/v1/rollouts/{ro['id']}", token=outsider).status_code == 404
    # A deployment out of its sight answers as an unknown name does: no existence leaks.
    refused = world.api("POST", "/api/v1/rollouts", token=outsider, json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "not_found")


def test_status_shows_phases_gates_counts_and_why(world: World) -> None:
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1)
    world.tick()
    view = world.rollout(ro["id"], devices="all")
    assert [p["name"] for p in view["phases"]] == ["canary", "wave 1"]
    assert view["counts"] == {"notified": 1, "pending": 3}
    assert {g["name"] for g in view["gates"]} >= {"success", "error", "reporting"}
    waiting = next(d for d in view["device_list"] if d["state"] == "pending")
    why = world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{waiting['id']}")
    assert "canary passes" in why["why"]
    assert len(world.ok("GET", "/api/v1/rollouts")) == 1
    assert len(devs) == 4


def test_a_rollout_stored_in_a_newer_form_is_named_and_left_to_replicas_that_can_read_it(
    any_world: World,
) -> None:
    # A newer replica (rolling upgrade) stored a device state this build does not know.
    from sqlalchemy import select, update

    from edgewise.control._schema import rollouts

    world = any_world
    devs = _fleet(world, 4)
    old = _start(world, _revise(world, "1.1.0"))
    world.ok("POST", f"/api/v1/rollouts/{old['id']}/abort")
    ro = _start(world, _revise(world, "2.0.0"))
    world.tick()
    r = rollouts
    engine = world.plane.store.engine

    def row() -> dict[str, Any]:
        with engine.connect() as c:
            return dict(c.execute(select(r).where(r.c.id == ro["id"])).one()._mapping)

    def store(document: Any, version: int) -> None:
        with engine.begin() as c:
            c.execute(
                update(r).where(r.c.id == ro["id"]).values(document=document, version=version)
            )

    stored = row()
    readable = stored["document"]
    newer = json.loads(json.dumps(readable))
    newer["devices"][devs[0].id][0] = "quarantined"
    store(newer, stored["version"] + 1)

    got = world.api("GET", f"/api/v1/rollouts/{ro['id']}")
    assert (got.status_code, got.json()["error"]["code"]) == (503, "rollout_unreadable")
    message = got.json()["error"]["message"]
    assert message.startswith(f"rollout {ro['id']} is stored in a form this control plane")
    assert "'quarantined' is not a valid DeviceRolloutState" in message
    assert message.endswith("upgrade this one, or ask one that is"), message
    for method, path in (
        ("GET", f"/api/v1/rollouts/{ro['id']}/devices/{devs[0].id}"),
        ("POST", f"/api/v1/rollouts/{ro['id']}/pause"),
    ):
        got = world.api(method, path)
        assert (got.status_code, got.json()["error"]["code"]) == (503, "rollout_unreadable")
    # The list still answers, the unreadable one from its row's own columns.
    listed = {x["id"]: x for x in world.ok("GET", "/api/v1/rollouts")}
    assert listed[old["id"]]["state"] == "aborted" and "unreadable" not in listed[old["id"]]
    line = listed[ro["id"]]
    assert (line["state"], line["to_revision"], line["devices"]) == ("running", 3, None)
    assert line["unreadable"] == message
    # The driver gives the lease back (for a replica that can read it) and leaves it be.
    assert row()["lease_owner"] == "test-driver"
    world.tick()
    after = row()
    assert (after["lease_owner"], after["version"]) == (None, stored["version"] + 1)
    world.tick()
    assert row()["lease_owner"] is None
    # The console's pages say so rather than fail.
    base = str(world.client.base_url)
    world.client.post("/login", data={"token": world.admin, "next": "/"}, headers={"origin": base})
    assert world.client.get("/").status_code == 200
    page = world.client.get("/rollouts")
    assert page.status_code == 200 and 'data-testid="unreadable"' in page.text
    assert "quarantined" in page.text
    page = world.client.get(f"/rollouts/{ro['id']}")
    assert page.status_code == 503 and "cannot read" in page.text
    # Once the row holds a form it reads again, it is driven again.
    store(readable, stored["version"] + 2)
    world.tick()
    assert row()["lease_owner"] == "test-driver"
    assert world.rollout(ro["id"])["state"] == "running"
