"""The console over plain HTTP: sign-in, cookies, CSRF, scope, bad input, assets."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import httpx
import pytest

from edgewise.web._mount import STATIC_DIR
from edgewise.web._render import TEMPLATES

from .conftest import SIM_DEPLOYMENT, Console


@pytest.fixture
def anon(console: Console) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=console.url, timeout=30, follow_redirects=False) as client:
        yield client


@contextlib.contextmanager
def _signed_in(console: Console, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=console.url, timeout=30, follow_redirects=False) as client:
        r = client.post(
            "/login", data={"token": token, "next": "/"}, headers={"origin": console.url}
        )
        assert r.status_code == 303, r.text
        yield client


def test_anonymous_browser_is_sent_to_sign_in(anon: httpx.Client) -> None:
    r = anon.get("/devices?selector=site%3Dlab")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fdevices%3Fselector%3Dsite%253Dlab"
    assert anon.get("/login").status_code == 200


def test_anonymous_htmx_poll_gets_a_client_redirect(anon: httpx.Client) -> None:
    r = anon.get("/rollouts/x/progress", headers={"hx-request": "true"})
    assert r.status_code == 401
    assert r.headers["hx-redirect"] == "/login"


def test_sign_in_sets_an_httponly_strict_cookie(console: Console, anon: httpx.Client) -> None:
    r = anon.post(
        "/login", data={"token": console.viewer, "next": "/models"}, headers={"origin": console.url}
    )
    assert r.status_code == 303 and r.headers["location"] == "/models"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie


def test_bad_token_is_refused_without_a_cookie(console: Console, anon: httpx.Client) -> None:
    r = anon.post("/login", data={"token": "ewo_nope"}, headers={"origin": console.url})
    assert r.status_code == 401
    assert "Sign-in refused" in r.text
    assert "set-cookie" not in r.headers
    empty = anon.post("/login", data={"token": ""}, headers={"origin": console.url})
    assert empty.status_code == 401


def test_sign_in_from_another_origin_is_refused(console: Console, anon: httpx.Client) -> None:
    r = anon.post("/login", data={"token": console.admin}, headers={"origin": "http://evil.test"})
    assert r.status_code == 403
    assert "set-cookie" not in r.headers
    assert anon.post("/login", data={"token": console.admin}).status_code == 403


def test_next_cannot_redirect_off_site(console: Console, anon: httpx.Client) -> None:
    for target in ("//evil.test/x", "https://evil.test/", "/\\evil.test"):
        r = anon.post(
            "/login",
            data={"token": console.viewer, "next": target},
            headers={"origin": console.url},
        )
        assert r.headers["location"] == "/", target


def test_oversized_or_garbage_form_is_refused(console: Console, anon: httpx.Client) -> None:
    big = anon.post(
        "/login",
        content=b"token=" + b"x" * 50_000,
        headers={"origin": console.url, "content-type": "application/x-www-form-urlencoded"},
    )
    assert big.status_code == 401
    junk = anon.post("/login", content=b"\xff\xfe\x00", headers={"origin": console.url})
    assert junk.status_code == 401


def test_revoked_token_signs_the_browser_out(console: Console) -> None:
    r = console.api("POST", "/api/v1/tokens", json={"name": "short", "role": "viewer"})
    token, token_id = r.json()["token"], r.json()["id"]
    with _signed_in(console, token) as client:
        assert client.get("/").status_code == 200
        assert console.api("DELETE", f"/api/v1/tokens/{token_id}").status_code == 200
        assert client.get("/").status_code == 303


def test_sign_out_forgets_the_cookie(console: Console) -> None:
    with _signed_in(console, console.viewer) as client:
        r = client.post("/logout", headers={"origin": console.url})
        assert r.status_code == 303
        assert (
            'edgewise_console=""' in r.headers["set-cookie"]
            or "max-age=0" in r.headers["set-cookie"].lower()
        )


def test_pages_carry_a_same_origin_content_security_policy(console: Console) -> None:
    with _signed_in(console, console.viewer) as client:
        r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp


def test_bad_selector_is_a_400_page_not_a_500(console: Console) -> None:
    with _signed_in(console, console.viewer) as client:
        r = client.get("/devices", params={"selector": "site in (a"})
        assert r.status_code == 400
        assert "No device matches" in r.text
        assert client.get("/devices", params={"selector": "x" * 5000}).status_code in (200, 400)


def test_unknown_objects_are_404_pages(console: Console) -> None:
    with _signed_in(console, console.viewer) as client:
        for path in (
            "/devices/dev-nope",
            "/models/nope/1.0.0",
            "/deployments/nope",
            "/drift/nope/1.0.0",
            "/rollouts/ro-nope",
        ):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.headers["content-type"].startswith("text/html"), path


def test_scoped_token_sees_only_its_devices(console: Console) -> None:
    r = console.api(
        "POST", "/api/v1/tokens", json={"name": "lab", "role": "viewer", "scope": "site=lab"}
    )
    with _signed_in(console, r.json()["token"]) as client:
        page = client.get("/devices").text
        assert "4 devices" in page
        outside = [d for d in console.devices if d not in page]
        assert len(outside) == 8
        assert client.get(f"/devices/{outside[0]}").status_code == 404
        # Another site's deployment is not shown either (the API answers 404 too); the
        # fleet-wide layer, which shapes the lab's devices, is.
        listed = client.get("/deployments").text
        assert SIM_DEPLOYMENT not in listed and "/deployments/digits" in listed
        assert client.get(f"/deployments/{SIM_DEPLOYMENT}").status_code == 404


def test_rollout_command_needs_a_same_origin_form(console: Console) -> None:
    with _signed_in(console, console.operator) as client:
        r = client.post("/rollouts/ro-1/pause", headers={"origin": "http://evil.test"})
        assert r.status_code == 403
        assert (
            client.post("/rollouts/ro-1/explode", headers={"origin": console.url}).status_code
            == 404
        )


def test_vendored_assets_are_served_with_their_licences() -> None:
    for name in ("htmx.min.js", "uPlot.iife.min.js", "uPlot.min.css", "console.js", "console.css"):
        assert (STATIC_DIR / name).stat().st_size > 0
    assert "MIT" in (STATIC_DIR / "uPlot.LICENSE.txt").read_text()
    assert (
        "Zero-Clause BSD" in (STATIC_DIR / "htmx.LICENSE.txt").read_text()
        or "BSD" in (STATIC_DIR / "htmx.LICENSE.txt").read_text()
    )


def test_static_files_are_served(console: Console, anon: httpx.Client) -> None:
    r = anon.get("/static/htmx.min.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert anon.get("/static/../_pages.py").status_code == 404


def test_templates_and_own_assets_reference_no_other_host() -> None:
    external = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.I)
    files = [*TEMPLATES.glob("*.html"), STATIC_DIR / "console.js", STATIC_DIR / "console.css"]
    for path in files:
        assert not external.search(path.read_text()), path


def test_overview_lists_firing_alerts_and_hides_resolved_ones(console: Console) -> None:
    tables = pytest.importorskip("edgewise.control.telemetry._tables")
    engine = console.app.state.plane.store.engine
    tables.metadata.create_all(engine, tables=[tables.alerts], checkfirst=True)
    now = 1_700_000_000.0
    row = {
        "kind": "drift",
        "value": 0.4,
        "devices": [console.devices[0]],
        "opened_at": now,
        "updated_at": now,
        "notified": False,
    }
    with engine.begin() as c:
        c.execute(
            tables.alerts.insert(),
            [
                {
                    **row,
                    "rule": "drift-high",
                    "scope": "model=digits-mlp@1.0.0",
                    "state": "firing",
                    "message": "drift 0.40 above 0.25 for 3 windows",
                },
                {
                    **row,
                    "rule": "stale",
                    "scope": "site=lab",
                    "state": "resolved",
                    "message": "telemetry older than 600 s",
                },
            ],
        )
    with _signed_in(console, console.viewer) as client:
        page = client.get("/").text
    assert "drift 0.40 above 0.25 for 3 windows" in page
    assert "telemetry older than 600 s" not in page


@pytest.mark.parametrize("selector", [None, "site=lab", "hw in (cpu-large)", "site notin (lab)"])
def test_console_device_listing_agrees_with_the_control_plane(
    console: Console, selector: str | None
) -> None:
    from edgewise.control import _fleet as fleet
    from edgewise.web._sources import device_rows

    plane = console.app.state.plane
    who = plane.authenticate(f"Bearer {console.viewer}")
    keys = ("id", "labels", "status", "online", "desired_revision", "agent_version")
    versions = set()
    for online in (None, True, False):  # (not last_seen: it moves)
        theirs = [{k: d[k] for k in keys} for d in fleet.list_devices(plane, who, selector, online)]
        ours = [{k: d[k] for k in keys} for d in device_rows(plane, who, selector, online)]
        assert ours == theirs
        versions |= {d["agent_version"] for d in ours}
    if selector is None:  # the simulated devices report one
        assert any(v and v.startswith("sim-") for v in versions), versions


def test_deployment_page_shows_preflight_and_revisions(console: Console) -> None:
    total = len(console.devices) + len(console.sim_devices)
    with _signed_in(console, console.viewer) as client:
        page = client.get("/deployments/digits").text
    assert f"{total} matching devices" in page
    assert 'data-testid="revisions"' in page and "stable" in page
    assert "digits: digits-mlp@1.0.0" in page
