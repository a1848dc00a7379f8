"""Rollouts met the way an operator of a large fleet meets them at 3 a.m.: odd states,
stale facts, a second try after an abort (in process, the driver stepped by hand)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.control._rollout_observe import LOOK_BACK_S
from edgewise.control._rollout_store import rollout_document
from edgewise.control._store import RawJSON
from edgewise.control.rollout import Observations, Rollout, RolloutSpec, create_rollout, step

from .inproc import Dev, World


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_world(
    request: pytest.FixtureRequest, tmp_path: Path, examples: dict[str, Any]
) -> Iterator[World]:
    from .inproc import make_world

    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    yield from make_world(tmp_path, examples, url)


def _fleet(w: World, n: int) -> list[Dev]:
    w.ok("POST", "/api/v1/deployments", json={
        "name": "base", "selector": "site in (a,b)",
        "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}})  # fmt: skip
    return [w.enroll(site="ab"[i % 2], hw="small") for i in range(n)]


def _revise(w: World, version: str) -> int:
    body = {"pipelines": {"digits": {"model": f"digits-mlp@{version}"}}}
    return int(w.ok("POST", "/api/v1/deployments/base/revisions", json=body)["revision"])


def _start(w: World, to: int, **spec: Any) -> dict[str, Any]:
    body = {"deployment": "base", "to_revision": to,
            "spec": {"canary": 1, "waves": [100], "soak_s": 0, **spec}}  # fmt: skip
    r = w.api("POST", "/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    view: dict[str, Any] = r.json()
    return view


def _state(w: World, rollout_id: str, device_id: str) -> str:
    why = w.ok("GET", f"/api/v1/rollouts/{rollout_id}/devices/{device_id}")
    return str(why["state"])


def test_a_report_from_an_earlier_rollout_does_not_count_for_the_next_one(world: World) -> None:
    # A rollout of revision 2 is aborted while its canary is off for the night; the next
    # rollout of revision 2 took their last words (active on 1.1.0, said to the first
    # one) as successes and passed its canary with no device having installed anything.
    devs = _fleet(world, 2)
    to = _revise(world, "1.1.0")
    first = _start(world, to, canary=2, require_approval=[True])
    world.tick()
    for d in devs:
        d.report("1.1.0", "active")
    world.tick()
    assert world.rollout(first["id"])["state"] == "awaiting_approval"
    world.ok("POST", f"/api/v1/rollouts/{first['id']}/abort")
    world.clock.now += 5
    second = _start(world, to, canary=2, require_approval=[True])
    for _ in range(3):
        world.tick()
        world.clock.now += 2
    assert world.rollout(second["id"])["state"] == "running"
    assert {_state(world, second["id"], d.id) for d in devs} == {"notified"}
    for d in devs:  # back on: what they say now is about this rollout
        d.report("1.1.0", "active")
    world.tick()
    assert world.rollout(second["id"])["state"] == "awaiting_approval"


def test_a_report_that_lands_after_a_newer_one_was_read_still_counts(any_world: World) -> None:
    # A report is stamped when it arrives and lands when its batch commits: another
    # replica's batch (or this one's, across a clock step back) can land after the driver
    # read a newer row. The driver's cursor had passed it, and the device waited out its
    # timeout, seen and "stuck": a failure of a healthy device.
    world = any_world
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=2)
    world.tick()
    first, second = (d for d in devs if d.version() == "1.1.0")
    world.clock.now += 10
    first.report("1.1.0", "active")
    world.tick()
    assert _state(world, ro["id"], first.id) == "succeeded"
    world.clock.now -= 1  # stamped a second before the row the driver has read
    second.report("1.1.0", "active")
    world.clock.now += 1 + LOOK_BACK_S / 2  # the driver reads rows again this often
    world.tick()
    assert _state(world, ro["id"], second.id) == "succeeded"
    assert world.rollout(ro["id"])["phase_index"] == 1


def test_dark_devices_do_not_make_up_the_quorum_until_they_are_retired(world: World) -> None:
    # A canary device switched off once notified counted as having reported: a quorum
    # of two passed on the one device that said anything.
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=2, device_timeout_s=60,
                gates={"min_reporting": 2, "error_pct": 10})  # fmt: skip
    world.tick()
    listed = world.rollout(ro["id"], devices="all")["device_list"]
    canary = {d["id"] for d in listed if d["phase"] == 0}
    on, off = (d for d in devs if d.id in canary)  # `off` never asks for its revision
    on.report("1.1.0", "active")
    world.clock.now += 61
    world.tick()
    assert _state(world, ro["id"], off.id) == "held_back"
    view = world.rollout(ro["id"])
    assert view["phase_index"] == 0
    assert {g["name"]: g["outcome"] for g in view["gates"]}["reporting"] == "insufficient"
    world.ok("POST", f"/api/v1/devices/{off.id}/decommission")  # gone for good
    world.clock.now += 2
    world.tick()
    assert world.rollout(ro["id"])["phase_index"] == 1
    why = world.ok("GET", f"/api/v1/rollouts/{ro['id']}/devices/{off.id}")["why"]
    assert "decommissioned during the rollout" in why


def test_a_rollout_with_devices_not_yet_notified_is_stored_the_fast_way() -> None:
    # Devices waiting for a later wave have no times yet (None): the finiteness check
    # choked on them and sent every rollout's document through the slow encoder until
    # its last wave had been notified.
    devices = [(f"d{i}", {"site": "a"}) for i in range(10)]
    spec = RolloutSpec(canary=1, waves=(100.0,))
    rollout, _ = step(create_rollout("r", "dep", 1, 2, devices, spec, now=5.0), Observations(), 6.0)
    assert any(s.updated_at is None for s in rollout.devices.values())
    document = rollout_document(rollout)
    assert isinstance(document, RawJSON)
    assert Rollout.from_dict(json.loads(document)) == rollout


def test_an_abort_whose_document_write_fails_answers_what_it_did(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The abort committed (state, audit record, webhook) and then writing the devices'
    # documents lost a PostgreSQL deadlock: the operator got a 500 for an abort that had
    # happened, and a retry answered 409 "aborted -> aborted".
    from sqlalchemy.exc import OperationalError

    import edgewise.control._rollouts as rollouts_module

    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=2)
    world.tick()
    assert sum(d.version() == "1.1.0" for d in devs) == 2

    def deadlock(plane: Any, ids: Any) -> int:
        raise OperationalError("UPDATE devices", {}, Exception("deadlock detected"))

    monkeypatch.setattr(rollouts_module, "recompute_devices", deadlock)
    r = world.api("POST", f"/api/v1/rollouts/{ro['id']}/abort")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "aborted"
    world.tick()  # the driver writes what the command could not
    assert {d.version() for d in devs} == {"1.0.0"}
    assert [a["action"] for a in world.audit("rollout.aborted")] == ["rollout.aborted"]


def test_a_model_yanked_before_the_first_step_reaches_no_device(world: World) -> None:
    # The driver paused running rollouts only: one yanked between its start and its first
    # step (the yank answer even named it) moved its canary to the yanked model first.
    devs = _fleet(world, 4)
    ro = _start(world, _revise(world, "1.1.0"), canary=1)
    assert world.ok("POST", "/api/v1/models/digits-mlp/1.1.0/yank")["rollouts"] == [ro["id"]]
    world.tick()
    view = world.rollout(ro["id"])
    assert view["state"] == "paused" and "digits-mlp@1.1.0 was yanked" in view["reason"]
    assert {d.version() for d in devs} == {"1.0.0"}
    world.ok("POST", "/api/v1/models/digits-mlp/1.1.0/unyank")
    assert world.ok("POST", f"/api/v1/rollouts/{ro['id']}/resume")["state"] == "running"
    world.tick()
    assert sum(d.version() == "1.1.0" for d in devs) == 1
