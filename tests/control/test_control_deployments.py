"""Deployments: layered merge through the API, pre-flight, revisions, diff."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.control import create_app, open_store

from .conftest import Device, Plane, make_plane

KEYS = ["site", "hw"]
VALUES = ["a", "b", "c"]
PIPES = ["p1", "p2", "p3"]


def _setup(p: Plane, examples: dict[str, Any]) -> None:
    p.trust(examples["pub"])
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-logreg@1.0.0"):
        assert p.push(examples["bundles"][ref]).status_code == 201


def _desired(dev: Device, etag: str | None = None) -> Any:
    extra = {"if-none-match": etag} if etag else {}
    return dev.get("/device/v1/desired", **extra)


requirement = st.one_of(
    st.builds(
        lambda k, v: (f"{k}={v}", lambda lab, k=k, v=v: lab.get(k) == v),
        st.sampled_from(KEYS),
        st.sampled_from(VALUES),
    ),
    st.builds(
        lambda k, v: (f"{k}!={v}", lambda lab, k=k, v=v: lab.get(k) != v),
        st.sampled_from(KEYS),
        st.sampled_from(VALUES),
    ),
    st.builds(
        lambda k, vs: (f"{k} in ({','.join(vs)})", lambda lab, k=k, vs=vs: lab.get(k) in vs),
        st.sampled_from(KEYS),
        st.lists(st.sampled_from(VALUES), min_size=1, max_size=2),
    ),
    st.builds(lambda k: (f"!{k}", lambda lab, k=k: k not in lab), st.sampled_from(KEYS)),
    st.builds(lambda k: (k, lambda lab, k=k: k in lab), st.sampled_from(KEYS)),
)
deployment = st.tuples(
    st.lists(requirement, max_size=2),
    st.integers(min_value=0, max_value=3),
    st.lists(st.sampled_from(PIPES), min_size=1, max_size=3, unique=True),
)
labels = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(deps=st.lists(deployment, min_size=1, max_size=4), device_labels=labels)
def test_layered_merge_picks_highest_priority_then_newest(
    sqlite_plane: Plane, examples: dict[str, Any], deps: list[Any], device_labels: dict[str, str]
) -> None:
    p = sqlite_plane
    if not p.api("GET", "/api/v1/models").json():
        _setup(p, examples)
    for d in p.api("GET", "/api/v1/deployments").json():
        p.api("DELETE", f"/api/v1/deployments/{d['id']}")
    dev = p.enroll(labels=device_labels)
    created = []
    for i, (reqs, prio, pipes) in enumerate(deps):
        selector = ",".join(text for text, _ in reqs)
        r = p.api(
            "POST",
            "/api/v1/deployments",
            json={
                "name": f"d{i}",
                "selector": selector,
                "priority": prio,
                "pipelines": {name: {"model": "digits-mlp@1.0.0"} for name in pipes},
            },
        )
        assert r.status_code == 201, r.text
        created.append((r.json()["id"], [m for _, m in reqs], prio, pipes))
    expected: dict[str, str] = {}
    for seq, (dep_id, matchers, prio, pipes) in enumerate(created):
        if all(m(device_labels) for m in matchers):
            for name in pipes:
                best = expected.get(name)
                if best is None or (prio, seq) >= best[1]:
                    expected[name] = (dep_id, (prio, seq))  # type: ignore[assignment]
    doc = _desired(dev).json()["document"]
    got = {name: pl["deployment"] for name, pl in doc["pipelines"].items()}
    assert got == {name: v[0] for name, v in expected.items()}  # type: ignore[index]
    p.api("POST", f"/api/v1/devices/{dev.id}/decommission")


def test_deleting_a_deployment_falls_back_to_the_next_layer(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    _setup(p, examples)
    dev = p.enroll(labels={"site": "a"})
    base = p.api(
        "POST",
        "/api/v1/deployments",
        json={"name": "base", "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}},
    ).json()
    pilot = p.api(
        "POST",
        "/api/v1/deployments",
        json={
            "name": "pilot",
            "selector": "site=a",
            "priority": 10,
            "pipelines": {"digits": {"model": "digits-mlp@1.1.0"}},
        },
    ).json()
    doc = _desired(dev).json()["document"]
    assert doc["pipelines"]["digits"]["deployment"] == pilot["id"]
    assert doc["pipelines"]["digits"]["model"]["version"] == "1.1.0"
    assert p.api("DELETE", "/api/v1/deployments/pilot").status_code == 200
    doc2 = _desired(dev).json()["document"]
    assert doc2["pipelines"]["digits"]["deployment"] == base["id"]
    assert doc2["revision"] == doc["revision"] + 1


def test_revision_moves_only_when_content_changes(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    _setup(p, examples)
    dev = p.enroll(labels={"site": "a"})
    body = {"name": "base", "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}}
    assert p.api("POST", "/api/v1/deployments", json=body).status_code == 201
    rev = _desired(dev).json()["document"]["revision"]
    assert p.api("POST", "/api/v1/deployments", json=body).status_code == 200  # identical
    p.api("POST", "/api/v1/deployments", json={**body, "name": "elsewhere", "selector": "site=z"})
    p.api("POST", f"/api/v1/devices/{dev.id}/labels", json={"set": {"unrelated": "x"}})
    assert _desired(dev, f'"{rev}"').status_code == 304
    p.api("POST", f"/api/v1/devices/{dev.id}/labels", json={"set": {"site": "z"}})
    doc = _desired(dev, f'"{rev}"').json()["document"]
    assert doc["revision"] == rev + 1


def test_preflight_reports_matching_incompatible_and_conflicts(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    _setup(p, examples)
    ok = p.enroll(
        labels={"site": "a"}, caps={"memory_mb": 4096, "runtimes": {"onnxruntime": "1.20.0"}}
    )
    tiny = p.enroll(
        labels={"site": "a"}, caps={"memory_mb": 1, "runtimes": {"onnxruntime": "1.20.0"}}
    )
    p.enroll(labels={"site": "b"})
    body = {
        "name": "x",
        "selector": "site=a",
        "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
    }
    r = p.api("POST", "/api/v1/deployments/dry-run", json=body).json()
    assert sorted(r["matching"]) == sorted([ok.id, tiny.id]) and r["ok"] is True
    missing = {**body, "pipelines": {"digits": {"model": "nope@1.0.0"}}}
    r = p.api("POST", "/api/v1/deployments/dry-run", json=missing).json()
    assert r["ok"] is False and "nope@1.0.0" in r["conflicts"][0]
    r = p.api("POST", "/api/v1/deployments", json=missing)
    assert r.status_code == 409 and "not in the registry" in r.json()["error"]["message"]
    assert p.api("GET", "/api/v1/deployments").json() == []


def test_bad_deployments_are_refused_with_4xx(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    _setup(p, examples)
    cases = [
        {"name": "x", "selector": "site in (", "pipelines": {"d": {"model": "digits-mlp@1.0.0"}}},
        {"name": "x", "pipelines": {"d": {"model": "digits-mlp"}}},
        {"name": "x", "pipelines": {}},
        {"name": "Bad Name", "pipelines": {"d": {"model": "digits-mlp@1.0.0"}}},
        {"name": "x", "pipelines": {"d": {"model": "digits-mlp@1.0.0", "priority": "urgent"}}},
        {
            "name": "x",
            "pipelines": {"d": {"model": "digits-mlp@1.0.0", "fallback": "digits-mlp@1.0.0"}},
        },
    ]
    for body in cases:
        r = p.api("POST", "/api/v1/deployments", json=body)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    # A misspelt parameter of a built-in stage is caught before any device sees it.
    typo = {"type": "threshold", "params": {"min_conf": 0.9}}
    body = {"name": "x", "pipelines": {"d": {"model": "digits-mlp@1.0.0", "postprocess": [typo]}}}
    r = p.api("POST", "/api/v1/deployments", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_pipeline"
    assert "unknown parameter 'min_conf'" in r.json()["error"]["message"]
    # So is a value the stage cannot use, such as a percentage for a confidence.
    percent = {"type": "threshold", "params": {"min_confidence": 90}}
    body = {
        "name": "x",
        "pipelines": {"d": {"model": "digits-mlp@1.0.0", "postprocess": [percent]}},
    }
    r = p.api("POST", "/api/v1/deployments", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_pipeline"
    assert r.json()["error"]["message"] == (
        "pipeline 'd': postprocess stage 'threshold': min_confidence: must be <= 1.0 (got 90)"
    )
    assert p.api("GET", "/api/v1/deployments").json() == []


def test_diff_shows_per_device_changes(sqlite_plane: Plane, examples: dict[str, Any]) -> None:
    p = sqlite_plane
    _setup(p, examples)
    a = p.enroll(labels={"site": "a"})
    p.enroll(labels={"site": "b"})
    p.api(
        "POST",
        "/api/v1/deployments",
        json={"name": "base", "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}}},
    )
    r = p.api(
        "POST",
        "/api/v1/deployments/diff",
        json={
            "name": "pilot",
            "selector": "site=a",
            "priority": 5,
            "pipelines": {"digits": {"model": "digits-mlp@1.1.0"}},
        },
    ).json()
    assert r["devices_changed"] == 1
    change = r["changes"][a.id]["digits"]
    assert change["from"].startswith("digits-mlp@1.0.0") and change["to"].startswith(
        "digits-mlp@1.1.0"
    )


def test_devices_get_specs_as_set_so_agents_older_than_a_field_still_run_them(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    # Specs are strict: an agent refuses a field it does not know. Were defaults sent,
    # every field added since an agent was built would break every deployment for it.
    from edgewise.protocol import BatchingSpec, PipelineSpec

    p = sqlite_plane
    _setup(p, examples)
    dev = p.enroll(labels={"site": "a"})
    queue = {"overflow": "drop_oldest", "max_queue_ms": 200.0}
    body = {
        "name": "base",
        "pipelines": {
            "plain": {"model": "digits-mlp@1.0.0", "slo": {"p95_ms": 50}},
            "camera": {"model": "digits-mlp@1.0.0", "batching": queue},
        },
    }
    assert p.api("POST", "/api/v1/deployments", json=body).status_code == 201
    pipes = _desired(dev).json()["document"]["pipelines"]
    plain, camera = pipes["plain"]["spec"], pipes["camera"]["spec"]
    assert set(plain) == {"name", "model", "slo"}
    assert plain["slo"] == {"p95_ms": 50.0}
    assert plain["model"]["version"] == "1.0.0" and len(plain["model"]["sha256"]) == 64
    assert PipelineSpec.model_validate(plain).batching == BatchingSpec()  # defaults on device
    assert camera["batching"] == queue  # what a deployment does set, it sends


def test_preflight_names_the_devices_whose_agents_do_not_know_a_spec_term(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    # What each agent reported it understands decides; one that reported nothing is not
    # held to anything (as with any capability it did not report).
    from edgewise.protocol import spec_vocabulary, vocabulary_digest

    p = sqlite_plane
    _setup(p, examples)
    new_terms = spec_vocabulary()
    old_terms = [t for t in new_terms if not t.startswith("batching.overflow")]
    old, new, silent = (p.enroll(labels={"site": "a"}) for _ in range(3))

    def report(dev: Device, terms: list[str] | None, digest: str) -> None:
        agent = {"version": "x", "spec_digest": digest, "spec_vocabulary": terms}
        r = dev.post("/device/v1/report", {"revision": 0, "agent": agent})
        assert r.status_code == 200, r.text

    report(old, old_terms, vocabulary_digest(old_terms))
    report(new, new_terms, vocabulary_digest(new_terms))
    report(silent, None, "")
    camera = {"model": "digits-mlp@1.0.0", "batching": {"overflow": "drop_oldest"}}
    body = {"name": "q", "selector": "site=a", "pipelines": {"camera": camera}}

    def incompatible() -> dict[str, list[str]]:
        r = p.api("POST", "/api/v1/deployments/dry-run", json=body)
        assert r.status_code == 200, r.text
        assert sorted(r.json()["matching"]) == sorted([old.id, new.id, silent.id])
        return dict(r.json()["incompatible"])

    assert incompatible() == {
        old.id: [
            "pipeline 'camera': the agent does not know batching.overflow, "
            "batching.overflow=drop_oldest (upgrade the agent)"
        ]
    }
    # Later reports carry only the digest: what the agent said it knows still holds.
    report(old, None, vocabulary_digest(old_terms))
    assert list(incompatible()) == [old.id]
    # A plain pipeline uses nothing the old agent lacks.
    body["pipelines"] = {"camera": {"model": "digits-mlp@1.0.0", "batching": {"max_batch": 4}}}
    assert incompatible() == {}
    # After an upgrade, the new agent's terms replace the old ones.
    body["pipelines"] = {"camera": camera}
    report(old, new_terms, vocabulary_digest(new_terms))
    assert incompatible() == {}


def test_a_report_with_a_bad_vocabulary_or_capabilities_is_a_422_and_stores_nothing(
    sqlite_plane: Plane,
) -> None:
    p = sqlite_plane
    dev = p.enroll(labels={"site": "a"}, caps={"memory_mb": 2048})
    for bad in (
        {"agent": {"spec_digest": "d", "spec_vocabulary": ["t"] * 10_001}},  # too many
        {"agent": {"spec_digest": "d", "spec_vocabulary": [1, 2]}},  # not terms
        {"agent": {"spec_digest": "d" * 65}},  # not a digest
        {"capabilities": ["not", "a", "document"]},
    ):
        r = dev.post("/device/v1/report", {"revision": 0, **bad})
        assert r.status_code == 422 and r.json()["error"]["message"], (bad, r.text)
    body = json.dumps({"revision": 0, "capabilities": {"memory_mb": float("nan")}})
    r = dev.post("/device/v1/report", body.encode())
    assert r.status_code in (400, 422) and "error" in r.json(), r.text
    view = p.api("GET", f"/api/v1/devices/{dev.id}").json()
    assert view["capabilities"] == {"memory_mb": 2048} and view["reported_revision"] is None


def test_devices_a_killed_control_plane_left_behind_are_brought_up_at_the_next_start(
    tmp_path: Path, examples: dict[str, Any]
) -> None:
    # A deployment change commits before the devices are recomputed: a control plane
    # killed in between left them on the old document until something else moved them.
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        app, clock, settings = make_plane(store, tmp_path / "data")
        admin = app.state.plane.bootstrap_admin()
        with TestClient(app, raise_server_exceptions=False) as client:
            p = Plane(client, admin, clock, settings)
            p.deploy_digits(examples, "base", "site=a")
            dev = p.enroll(labels={"site": "a"})
            before = _desired(dev).json()["document"]
            assert list(before["pipelines"]) == ["digits"]
            base = p.api("GET", "/api/v1/deployments/base").json()
            # `deploy delete` as far as its commit; the process dies there.
            app.state.plane.store.delete_deployment(base["id"])
            assert _desired(dev).json()["document"]["revision"] == before["revision"]
        restarted = create_app(settings, store, clock=clock)  # its background loops run
        with TestClient(restarted, raise_server_exceptions=False) as client:
            dev.client = client

            def caught_up() -> bool:
                doc = _desired(dev).json()["document"]
                return bool(doc["revision"] > before["revision"] and doc["pipelines"] == {})

            deadline = time.monotonic() + 30
            while not caught_up():
                assert time.monotonic() < deadline, "the restart did not bring the device up"
                time.sleep(0.05)
    finally:
        store.close()


def test_a_reconcile_pass_writes_nothing_for_devices_that_are_up_to_date(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    from edgewise.control._recompute import reconcile_all

    p = sqlite_plane
    p.deploy_digits(examples, "base", "site=a")
    devs = [p.enroll(labels={"site": site}) for site in ("a", "a", "b")]
    revisions = [_desired(d).json()["document"]["revision"] for d in devs]
    plane = p.client.app.state.plane  # type: ignore[attr-defined]
    assert reconcile_all(plane) == 0
    assert [_desired(d).json()["document"]["revision"] for d in devs] == revisions
