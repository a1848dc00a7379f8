"""Races between control-plane replicas on one PostgreSQL database.

Two in-process replicas (each its own app, store connection pool and clock) share one
database, as `edgewise server` replicas do; threads lined up by a barrier fire requests
at both at once. Each race is repeated a bounded number of times: a lost update or a
double action shows in the final state, whatever the interleaving.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from edgewise.control import open_store

from .conftest import Plane, make_plane

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[Plane, Plane]]:
    """Two replicas on one PostgreSQL database and one data directory."""
    stores = [open_store(pg_url), open_store(pg_url)]
    data = tmp_path / "data"
    apps = [make_plane(s, data) for s in stores]
    admin = apps[0][0].state.plane.bootstrap_admin()
    assert admin is not None
    try:
        with (
            TestClient(apps[0][0], raise_server_exceptions=False) as ca,
            TestClient(apps[1][0], raise_server_exceptions=False) as cb,
        ):
            yield (
                Plane(ca, admin, apps[0][1], apps[0][2]),
                Plane(cb, admin, apps[1][1], apps[1][2]),
            )
    finally:
        for s in stores:
            s.close()


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together by a barrier; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _label(plane: Plane, device_id: str, **labels: str) -> Any:
    return plane.api("POST", f"/api/v1/devices/{device_id}/labels", json={"set": labels})


def test_label_changes_on_two_replicas_both_take_effect(replicas: tuple[Plane, Plane]) -> None:
    a, b = replicas
    for i in range(20):
        dev = a.enroll(labels={"site": "y"})

        ra, rb = at_once(
            partial(_label, a, dev.id, k1=str(i)), partial(_label, b, dev.id, k2=str(i))
        )

        assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
        labels = a.api("GET", f"/api/v1/devices/{dev.id}").json()["labels"]
        assert labels == {"site": "y", "k1": str(i), "k2": str(i)}


def test_desired_state_follows_the_final_labels_when_changes_race(
    replicas: tuple[Plane, Plane], examples: dict[str, Any]
) -> None:
    a, b = replicas
    a.deploy_digits(examples, "x", "site=x")
    for _ in range(40):
        dev = a.enroll(labels={"site": "y"})

        ra, rb = at_once(partial(_label, a, dev.id, site="x"), partial(_label, b, dev.id, site="y"))

        assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
        view = a.api("GET", f"/api/v1/devices/{dev.id}").json()
        deployed = bool(view["desired"]["pipelines"])
        assert deployed == (view["labels"]["site"] == "x"), view["labels"]


def test_promote_racing_rollout_start_lets_one_of_them_through(
    replicas: tuple[Plane, Plane], examples: dict[str, Any]
) -> None:
    a, b = replicas
    a.trust(examples["pub"])
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-mlp@2.0.0"):
        assert a.push(examples["bundles"][ref]).status_code == 201
    for _ in range(3):
        a.enroll(labels={"site": "x"})
    for i in range(30):
        name = f"d{i}"
        body = {
            "name": name,
            "selector": "site=x",
            "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
        }
        assert a.api("POST", "/api/v1/deployments", json=body).status_code == 201
        revise = {"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}}
        assert (
            a.api("POST", f"/api/v1/deployments/{name}/revisions", json=revise).status_code == 201
        )
        promote = {"pipelines": {"digits": {"model": "digits-mlp@2.0.0"}}, "promote": True}

        started, promoted = at_once(
            partial(a.api, "POST", "/api/v1/rollouts", json={"deployment": name, "to_revision": 2}),
            partial(b.api, "POST", f"/api/v1/deployments/{name}/revisions", json=promote),
        )

        # A promote while a rollout is active would be undone when it completes; a
        # rollout started from the revision a promote just replaced reverts to the wrong
        # one: exactly one of the two goes through.
        codes = (started.status_code, promoted.status_code)
        assert codes in ((201, 409), (409, 201)), (started.text, promoted.text)
        stable = a.api("GET", f"/api/v1/deployments/{name}/revisions").json()["stable_revision"]
        assert stable == (1 if started.status_code == 201 else 3)
