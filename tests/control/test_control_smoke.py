from __future__ import annotations

from typing import Any

from .conftest import Plane


def test_end_to_end_deploy_reaches_device(sqlite_plane: Plane, examples: dict[str, Any]) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    r = p.push(examples["bundles"]["digits-mlp@1.0.0"])
    assert r.status_code == 201, r.text
    dev = p.enroll(labels={"site": "a"})
    r = dev.get("/device/v1/desired")
    assert r.status_code == 200, r.text
    assert r.json()["document"]["revision"] == 1
    r = p.api(
        "POST",
        "/api/v1/deployments",
        json={
            "name": "base",
            "selector": "site=a",
            "pipelines": {"digits": {"model": "digits-mlp@1.0.0"}},
        },
    )
    assert r.status_code == 201, r.text
    r = dev.get("/device/v1/desired", **{"if-none-match": '"1"'})
    assert r.status_code == 200, r.text
    doc = r.json()["document"]
    assert doc["revision"] == 2
    assert doc["pipelines"]["digits"]["model"]["name"] == "digits-mlp"
    r = dev.get("/device/v1/desired", **{"if-none-match": '"2"'})
    assert r.status_code == 304
