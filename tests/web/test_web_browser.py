"""The console in a real headless Chromium against a real control plane on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .conftest import Console

pytestmark = pytest.mark.timeout(180)


def _context(browser: Any, console: Console) -> tuple[Any, list[str]]:
    """A fresh browser context that logs every request it makes."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    requested: list[str] = []
    ctx.on("request", lambda req: requested.append(req.url))
    return ctx, requested


def _sign_in(page: Any, console: Console, token: str) -> None:
    page.goto(console.url + "/")
    assert urlsplit(page.url).path == "/login"
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(console.url + "/")


def _only_control_plane(console: Console, requested: list[str]) -> None:
    host = urlsplit(console.url).netloc
    others = sorted(
        {u for u in requested if urlsplit(u).netloc != host and not u.startswith("data:")}
    )
    assert requested, "the browser made no request at all"
    assert others == [], f"requests to other hosts: {others}"


def test_operator_signs_in_and_every_page_renders(
    browser: Any, console: Console, artifacts: Path
) -> None:
    ctx, requested = _context(browser, console)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    _sign_in(page, console, console.operator)
    device = console.devices[0]
    total = len(console.devices) + len(console.sim_devices)
    pages = {
        "fleet": ("/", "Versions in the field"),
        "devices": ("/devices", f"{total} devices"),
        "devices-filtered": ("/devices?selector=site%3Dlab", "4 devices"),
        "device": (f"/devices/{device}", "State timeline"),
        "device-simulated": (f"/devices/{console.sim_devices[0]}", "digits-mlp@1.0.0"),
        "models": ("/models", "digits-mlp@1.1.0"),
        "model": ("/models/digits-mlp/1.0.0", "Provenance"),
        "deployments": ("/deployments", "digits"),
        "deployment": ("/deployments/digits", "Pre-flight"),
        "rollouts": ("/rollouts", "Rollouts"),
        "drift-index": ("/drift", "digits-mlp@1.0.0"),
        "drift": ("/drift/digits-mlp/1.0.0", "Histograms against the bundle"),
    }
    for name, (path, text) in pages.items():
        response = page.goto(console.url + path)
        assert response is not None and response.status == 200, (name, response)
        assert text in page.content(), name
        page.screenshot(path=str(artifacts / f"page-{name}.png"), full_page=True)
    # The charts were drawn by the vendored uPlot (canvas inside each figure).
    page.goto(console.url + "/drift/digits-mlp/1.0.0")
    page.wait_for_selector("figure[data-chart='hist'] canvas")
    assert page.locator("figure[data-chart='line'] canvas").count() >= 5
    assert page.locator("figure[data-chart='hist'] canvas").count() >= 3
    charts = page.inner_text("main")
    assert "success rate" in charts and "p95 latency ms" in charts
    assert "top-1 confidence" in charts and "input pixel_2_4" in charts
    page.goto(console.url + f"/devices/{device}")
    page.wait_for_selector("figure[data-chart='line'] canvas")
    assert page.locator("[data-testid=timeline] tr").count() >= 5
    assert errors == []
    _only_control_plane(console, requested)
    ctx.close()


def test_fleet_overview_counts_devices_and_versions(browser: Any, console: Console) -> None:
    ctx, _ = _context(browser, console)
    page = ctx.new_page()
    _sign_in(page, console, console.viewer)
    total = len(console.devices) + len(console.sim_devices)
    assert page.inner_text("[data-testid=online]") == str(total)
    assert page.inner_text("[data-testid=offline]") == "0"
    # Every device runs 1.0.0 but one scripted device, which failed its health check.
    row = page.locator("tr", has_text="digits-mlp@1.0.0").inner_text()
    assert row.split("\t")[1].strip() == str(total - 1)
    ctx.close()


def _start_rollout(console: Console) -> str:
    """Start a rollout of the simulated devices' deployment to digits-mlp 1.1.0."""
    r = console.api(
        "POST",
        f"/api/v1/deployments/{console.deployment}/revisions",
        token=console.operator,
        json={"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}, "note": "console test"},
    )
    assert r.status_code in (200, 201), r.text
    # Small phases with a soak between them: slow enough to watch, and to pause.
    spec = {
        "canary": 1,
        "waves": [25, 50, 100],
        "soak_s": 4.0,
        "gates": {"success_pct": 80.0, "error_pct": 20.0},
    }
    body = {"deployment": console.deployment, "to_revision": r.json()["revision"], "spec": spec}
    r = console.api("POST", "/api/v1/rollouts", token=console.operator, json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_rollout_progresses_without_reload_and_operator_pauses(
    browser: Any, console: Console, artifacts: Path
) -> None:
    rollout_id = _start_rollout(console)
    ctx, requested = _context(browser, console)
    page = ctx.new_page()
    _sign_in(page, console, console.operator)
    page.goto(f"{console.url}/rollouts/{rollout_id}")
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    first = int(page.inner_text("[data-testid=rollout-done]"))
    page.screenshot(path=str(artifacts / "rollout-start.png"), full_page=True)
    done = "document.querySelector('[data-testid=rollout-done]').textContent"
    page.wait_for_function(f"() => parseInt({done}) > {first}", timeout=60_000)
    assert navigations == [], "progress must update without reloading the page"
    page.screenshot(path=str(artifacts / "rollout-progress.png"), full_page=True)
    page.click("button[data-action=pause]")
    page.wait_for_selector("[data-testid=rollout-progress][data-state=paused]")
    assert page.locator("button[data-action=resume]").count() == 1
    page.screenshot(path=str(artifacts / "rollout-paused.png"), full_page=True)
    state = console.api("GET", f"/api/v1/rollouts/{rollout_id}").json()["state"]
    assert state == "paused"
    page.click("button[data-action=resume]")
    page.wait_for_selector("[data-testid=rollout-progress][data-state=running]")
    page.click("button[data-action=abort]")
    page.wait_for_selector("[data-testid=rollout-progress][data-state=aborted]")
    _only_control_plane(console, requested)
    ctx.close()


def test_viewer_sees_no_action_buttons_and_cannot_act(
    browser: Any, console: Console, artifacts: Path
) -> None:
    rollout_id = _start_rollout(console)
    ctx, requested = _context(browser, console)
    page = ctx.new_page()
    _sign_in(page, console, console.viewer)
    page.goto(f"{console.url}/rollouts/{rollout_id}")
    page.wait_for_selector("[data-testid=rollout-progress]")
    assert page.locator("[data-testid=rollout-actions]").count() == 0
    assert page.locator("button[data-action]").count() == 0
    page.screenshot(path=str(artifacts / "rollout-viewer.png"), full_page=True)
    # A forged form post from the viewer's session is refused by the API's RBAC.
    forged = page.request.post(
        f"{console.url}/rollouts/{rollout_id}/pause",
        headers={"origin": console.url, "hx-request": "true"},
    )
    assert "pause refused" in forged.text()
    api = console.api("POST", f"/api/v1/rollouts/{rollout_id}/pause", token=console.viewer)
    assert api.status_code == 403
    assert api.json()["error"]["code"] == "forbidden"
    assert console.api("GET", f"/api/v1/rollouts/{rollout_id}").json()["state"] != "paused"
    _only_control_plane(console, requested)
    ctx.close()
