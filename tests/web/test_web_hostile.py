"""The console against hostile input: compromised devices, careless operators, forged forms.

Everything a device reports (pipeline and model names, reasons, errors, capabilities,
telemetry field names and numbers) reaches some page; a compromised device sends what
it likes, within what the device API accepts. These tests send it through the real
device protocol to a control plane of their own (so the fleet of the other web tests
never sees it) and read the pages over HTTP as a browser would: parsed, not grepped.
Two other sources: telemetry rows as earlier builds stored them (NaN included), written
to the store; and the page arithmetic (`_drift_figures`, `_series`) fed single windows.
"""

from __future__ import annotations

import base64
import contextlib
import html
import http.server
import json
import math
import re
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.agent import DeviceClient
from edgewise.control import Settings, create_app, open_store
from edgewise.protocol import sign_request
from edgewise.web._pages import _drift_figures, _series
from edgewise.web._render import _env

from .conftest import _free_socket

XSS = '<script>alert(1)</script>"><img src=x onerror=alert(2)></textarea>{{7*7}}'
SHORT_XSS = '"><svg onload=alert(3)>'  # fits a version (64 characters at most)
BREAKOUT = "</script><script>alert(4)</script>"


@dataclass
class Plane:
    """A control plane on loopback, and its admin token."""

    url: str
    app: Any
    admin: str

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.admin}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)


@contextlib.contextmanager
def _serve(settings: Settings) -> Iterator[Plane]:
    store = open_store(settings.database_url)
    app = create_app(settings, store)
    admin = app.state.plane.bootstrap_admin()
    sock = _free_socket()
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "control plane did not start"
    try:
        yield Plane(f"http://127.0.0.1:{sock.getsockname()[1]}", app, admin)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """A SQLite control plane with the example models pushed and no fleet yet."""
    from edgewise.bundle import load_public_key, public_key_to_b64
    from edgewise.examples import build_examples

    root = tmp_path_factory.mktemp("hostile")
    bundles = build_examples(root / "examples")
    (root / "data").mkdir()
    with _serve(Settings(data_dir=root / "data", watch_interval_s=0.2)) as p:
        pub = public_key_to_b64(load_public_key(root / "examples" / "examples.pub"))
        assert p.api("POST", "/api/v1/publisher-keys", json={"public_key": pub}).status_code == 201
        for path in bundles.values():
            r = p.api(
                "POST",
                "/api/v1/models",
                content=path.read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code in (200, 201), r.text
        yield p


class Device:
    """An enrolled device that sends raw JSON (a compromised agent is not bound by pydantic)."""

    def __init__(self, plane: Plane, capabilities: dict[str, Any] | None = None) -> None:
        r = plane.api("POST", "/api/v1/enroll-tokens", json={"labels": {"site": "lab"}})
        assert r.status_code == 201, r.text
        self.key = Ed25519PrivateKey.generate()
        pub = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.url = plane.url
        with httpx.Client(base_url=plane.url, timeout=30) as http:
            answer = DeviceClient(http).enroll(
                r.json()["token"], base64.b64encode(pub).decode(), {}, capabilities or {}
            )
        self.id = str(answer["device_id"])
        self.seq = 0

    def post(self, path: str, body: bytes) -> httpx.Response:
        headers = sign_request(self.key, self.id, "POST", path, body, time.time())
        headers["content-type"] = "application/json"
        return httpx.post(self.url + path, content=body, headers=headers, timeout=30)

    def report(self, pipelines: dict[str, Any], **extra: Any) -> None:
        body = json.dumps({"revision": 1, "pipelines": pipelines, **extra}).encode()
        r = self.post("/device/v1/report", body)
        assert r.status_code == 200, r.text

    def windows(self, *datas: dict[str, Any]) -> None:
        """Metric windows a minute apart, the last one now."""
        records = []
        now = time.time()
        for i, data in enumerate(datas):
            self.seq += 1
            at = now - 60 * (len(datas) - 1 - i)
            records.append(
                {"seq": self.seq, "cls": "metric", "ts": at, "kind": "window", "data": data}
            )
        r = self.post("/device/v1/telemetry", json.dumps({"records": records}).encode())
        assert r.status_code == 200, r.text


def _running(model: str, version: str, **pipeline: Any) -> dict[str, Any]:
    return {"digits": {"model": model, "version": version, "status": "active", **pipeline}}


@contextlib.contextmanager
def _browser(plane: Plane, token: str | None = None) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=plane.url, timeout=30, follow_redirects=False) as client:
        r = client.post(
            "/login",
            data={"token": token or plane.admin, "next": "/"},
            headers={"origin": plane.url},
        )
        assert r.status_code == 303, r.text
        yield client


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each JSON data block."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data_blocks: list[str] = []
        self._in_data = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_data = tag == "script" and dict(attrs).get("type") == "application/json"
        if self._in_data:
            self.data_blocks.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_blocks[-1] += data


# The scripts the console's own templates load: no other script may appear.
_OWN_SCRIPTS = {"/static/htmx.min.js", "/static/uPlot.iife.min.js", "/static/console.js"}
_NEVER_WRITTEN = {"img", "svg", "iframe", "object", "embed", "textarea", "base", "style"}


def _injected(text: str) -> list[str]:
    """Elements and attributes on the page that the console's templates never write."""
    found = []
    for tag, attrs in _Tags(text).tags:
        if tag in _NEVER_WRITTEN:
            found.append(f"<{tag}>")
        if tag == "script" and not (
            attrs.get("src") in _OWN_SCRIPTS or attrs.get("type") == "application/json"
        ):
            found.append(f"<script {attrs}>")
        for name, value in attrs.items():
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                found.append(f"<{tag} {name}={value!r}>")
    return found


def _chart_data(text: str) -> list[Any]:
    """Each chart's JSON block, read as `JSON.parse` reads it (NaN and Infinity refused)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(block, parse_constant=refuse) for block in _Tags(text).data_blocks]


def _links(text: str) -> list[str]:
    return [str(a["href"]) for tag, a in _Tags(text).tags if tag == "a" and a.get("href")]


# ------------------------------------------------------------------ stored XSS (held up)


def test_device_and_operator_strings_render_as_text_on_every_page(plane: Plane) -> None:
    device = Device(plane, capabilities={"arch": XSS, "accelerators": [XSS], XSS[:60]: {XSS: 1}})
    timeline = [{"state": XSS, "reason": XSS, "at": time.time(), "progress": 0.5}]
    device.report(
        {
            XSS: {"model": XSS, "version": SHORT_XSS, "status": "failed", "reason": XSS},
            "digits": {"model": "digits-mlp", "version": "1.0.0", "status": "active"},
            "p2": {"model": "m", "version": "1", "status": "failed", "timeline": timeline},
        },
        errors=[XSS],
        agent={"version": XSS[:60]},
    )
    fields = {"model": "digits-mlp", "version": "1.0.0", "counts": {"ok": 3}}
    device.windows({**fields, XSS: 1.0, BREAKOUT: 2.0}, {**fields, XSS: 3.0, BREAKOUT: 4.0})
    deployment = {"digits": {"model": "digits-mlp@1.0.0"}}
    r = plane.api(
        "POST",
        "/api/v1/deployments",
        json={"name": "hostile", "selector": "site=lab", "pipelines": deployment},
    )
    assert r.status_code in (200, 201), r.text
    revision = {"note": XSS, "pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}}
    r = plane.api("POST", "/api/v1/deployments/hostile/revisions", json=revision)
    assert r.status_code == 201, r.text
    r = plane.api("POST", "/api/v1/tokens", json={"name": XSS, "role": "viewer"})
    assert r.status_code == 201, r.text
    pages = [
        "/",
        "/devices",
        f"/devices/{device.id}",
        "/models",
        "/models/digits-mlp/1.0.0",
        "/drift",
        "/drift/digits-mlp/1.0.0",
        "/deployments",
        "/deployments/hostile",
        "/rollouts",
        f"/devices?selector={XSS}",
        f"/rollouts/{SHORT_XSS}",
        f"/models/{SHORT_XSS}/1",
    ]
    with _browser(plane, r.json()["token"]) as browser:
        for path in pages:
            page = browser.get(path)
            assert page.status_code < 500, path
            assert _injected(page.text) == [], path
            _chart_data(page.text)  # every block parses: `</script>` did not break out
        device_page = browser.get(f"/devices/{device.id}").text
    # Shown, as text: the operator sees what the device sent.
    assert html.unescape(device_page).count(XSS) >= 4
    assert BREAKOUT in {c["name"] for c in _chart_data(device_page)}


# ------------------------------------------------------------ numbers devices send


def test_a_timestamp_past_year_9999_shows_as_a_number_not_a_500(plane: Plane) -> None:
    """A device whose clock speaks milliseconds: 1.7e12 s is some 55,000 years away."""
    device = Device(plane)
    at = time.time() * 1000
    timeline = [{"state": "active", "reason": "ms clock", "at": at}]
    device.report(_running("digits-mlp", "1.0.0", timeline=timeline))
    with _browser(plane) as browser:
        page = browser.get(f"/devices/{device.id}")
    assert page.status_code == 200
    assert "(not a time)" in page.text


def _stored_by_an_older_build(plane: Plane, device: Device, *datas: dict[str, Any]) -> None:
    """Windows as control planes before this one stored them: NaN and Infinity included.

    Today's ingest and store write a non-finite number as null or not at all; a database
    keeps what earlier builds wrote (SQLite's JSON text holding `NaN` as sent), and the
    console reads it. Written as that text, past today's JSON serializer.
    """
    from sqlalchemy import text

    now = time.time()
    insert = text(
        "INSERT INTO telemetry (device_id, seq, cls, ts, kind, data, received_at)"
        " VALUES (:device_id, :seq, 'metric', :ts, 'window', :data, :ts)"
    )
    with plane.app.state.plane.store.engine.begin() as c:
        for i, data in enumerate(datas):
            device.seq += 1
            at = now - 60 * (len(datas) - 1 - i)
            row = {"device_id": device.id, "seq": device.seq, "ts": at, "data": json.dumps(data)}
            c.execute(insert, row)


def test_a_window_ending_at_infinity_does_not_fail_the_device_page(plane: Plane) -> None:
    device = Device(plane)
    device.report(_running("digits-mlp", "1.0.0"))
    fields = {"model": "digits-mlp", "version": "1.0.0", "counts": {"ok": 5}}
    _stored_by_an_older_build(plane, device, {**fields, "end": math.inf}, fields)
    with _browser(plane) as browser:
        page = browser.get(f"/devices/{device.id}")
    assert page.status_code == 200
    assert _chart_data(page.text), "the finite window is still drawn"


def test_chart_data_stays_json_when_a_device_sent_nan(plane: Plane) -> None:
    """`NaN` in a data block makes `JSON.parse` throw, and no chart of the page is drawn."""
    device = Device(plane)
    device.report(_running("digits-mlp", "1.0.0"))
    fields = {"model": "digits-mlp", "version": "1.0.0", "counts": {"ok": 5}}
    _stored_by_an_older_build(
        plane, device, {**fields, "temp_c": math.nan}, {**fields, "temp_c": 41.5}
    )
    with _browser(plane) as browser:
        page = browser.get(f"/devices/{device.id}")
    assert page.status_code == 200
    charts = {c["name"]: c for c in _chart_data(page.text)}
    assert charts["temp_c"]["y"] == [None, 41.5]


_CONFIDENCE = "top-1 confidence"


@pytest.mark.parametrize(
    ("window", "left_out"),
    [
        pytest.param(
            {"confidence": {"edges": [{}, 0.5, 1], "counts": [1, 2]}}, _CONFIDENCE, id="dict-edge"
        ),
        pytest.param(
            {"confidence": {"edges": [0, "x", 1], "counts": [1, 2]}}, _CONFIDENCE, id="string-edge"
        ),
        pytest.param(
            {"confidence": {"edges": [0, 0.5, 1], "counts": [-1, 5]}}, _CONFIDENCE, id="negative"
        ),
        pytest.param(
            {"features": {"classes": [-1, 2, 3]}}, "predicted class vs prior", id="negative-classes"
        ),
        pytest.param({"queue": {"counts": []}}, "queue", id="empty-histogram"),
        pytest.param({"queue": [3, 10**400]}, "queue", id="huge-count"),
        pytest.param({"temp_c": 10**400}, "temp_c", id="huge-number"),
    ],
)
def test_window_parts_no_figure_can_hold_are_left_out(
    window: dict[str, Any], left_out: str
) -> None:
    """What the drift and device pages compute, fed one window part a device made up."""
    now = time.time()
    good = {"counts": {"ok": 4}, "end": now - 60}
    records = [
        {"cls": "metric", "ts": now - 60, "device_id": "d", "data": good},
        {"cls": "metric", "ts": now, "device_id": "d", "data": window},
    ]
    reference = {
        "confidence": {"bin_edges": [0, 0.5, 1], "frequencies": [0.5, 0.5]},
        "class_prior": [0.2, 0.3, 0.5],
    }
    series, histograms = _drift_figures(records, reference)
    names = {s.name for s in series} | {h.name.split(".")[0] for h in histograms}
    assert "requests" in names and left_out not in names
    page = _env.get_template("drift_model.html").render(
        session=None,
        ref="m@1",
        devices=1,
        sampled=1,
        records=2,
        series=series,
        histograms=histograms,
    )
    assert len(_chart_data(page)) == len(series) + len(histograms)


def test_timestamps_ages_apart_still_draw_in_buckets() -> None:
    """Two windows 5e-324 s apart (a zero bucket width) or 1e300 s apart (an infinite one)."""
    for stamps in ((0.0, 5e-324), (-1e300, 1e300)):
        records = [
            {"cls": "metric", "ts": ts, "data": {"counts": {"ok": 1}, "temp_c": 40.0}}
            for ts in stamps
        ]
        assert {s.name for s in _series(records)} >= {"requests", "temp_c"}


def test_a_device_drift_page_with_only_garbage_windows_answers(plane: Plane) -> None:
    """One device, a version no other device runs, windows that are not windows."""
    device = Device(plane)
    device.report(_running("digits-logreg", "1.0.0"))
    fields = {"model": "digits-logreg", "version": "1.0.0"}
    device.windows(
        {**fields, "confidence": {"edges": [{}, 0.5, 1], "counts": [1, 2]}},
        {**fields, "queue": {"counts": []}, "latency": "fast", "counts": {"ok": "many"}},
    )
    with _browser(plane) as browser:
        page = browser.get("/drift/digits-logreg/1.0.0")
    assert page.status_code == 200
    assert "1 device in your scope" in page.text
    _chart_data(page.text)


# ------------------------------------------------------------------ paths and queries


@pytest.mark.parametrize("rollout_id", ["%00", "a%00b", "%0d%0aSet-Cookie:x=1"])
def test_a_rollout_id_that_is_no_url_segment_is_a_404_page(plane: Plane, rollout_id: str) -> None:
    with _browser(plane) as browser:
        page = browser.get(f"/rollouts/{rollout_id}")
        progress = browser.get(f"/rollouts/{rollout_id}/progress", headers={"hx-request": "1"})
        command = browser.post(
            f"/rollouts/{rollout_id}/pause", headers={"origin": plane.url, "hx-request": "1"}
        )
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert progress.status_code == 286  # htmx: stop polling
    assert command.status_code == 200 and "no rollout" in command.text


def test_a_rollout_id_of_dots_does_not_reach_another_api_route(plane: Plane) -> None:
    """`/rollouts/..` had asked the API for `/api/v1/` ("rollouts are not available")."""
    with _browser(plane) as browser:
        page = browser.get("/rollouts/%2E%2E")
    assert page.status_code == 404
    assert "no rollout .." in html.unescape(page.text)


def test_links_keep_a_device_written_name_in_its_path_segment(plane: Plane) -> None:
    device = Device(plane)
    device.report(_running("a?b#c", "1/../../logout"))
    with _browser(plane) as browser:
        page = browser.get(f"/devices/{device.id}")
    assert "/models/a%3Fb%23c/1%2F..%2F..%2Flogout" in _links(page.text)


def test_bidi_controls_are_shown_not_obeyed(plane: Plane) -> None:
    """RLO + `0.0.1` displays as `1.0.0`: a device could pass for running another version."""
    device = Device(plane)
    device.report(_running("digits-mlp", "\u202e0.0.1", reason="ok\u2066x\u2069"))
    with _browser(plane) as browser:
        page = browser.get(f"/devices/{device.id}").text
    assert "\u202e" not in page and "\u2066" not in page
    assert "[U+202E]0.0.1" in page and "ok[U+2066]x[U+2069]" in page


def test_an_overlong_selector_is_refused_not_cut(plane: Plane) -> None:
    """Cut at 2,000 characters, this selector parses and matches what it excludes."""
    selector = "site=lab" + ",site=lab" * 221 + ",site=nowhere"
    assert len(selector) > 2000
    with _browser(plane) as browser:
        page = browser.get("/devices", params={"selector": selector})
    assert page.status_code == 400
    assert "No device matches" in page.text


# ------------------------------------------------------------------ sign-in and session


def test_sign_in_keeps_the_whole_query_of_the_page_asked_for(plane: Plane) -> None:
    target = "/devices?selector=site%3Dlab&online=false"
    with httpx.Client(base_url=plane.url, timeout=30, follow_redirects=False) as anon:
        to_login = anon.get(target).headers["location"]
        form = anon.get(to_login).text
        (next_,) = re.findall(r'name="next" value="([^"]*)"', form)
        assert html.unescape(next_) == target
        signed_in = anon.post(
            "/login",
            data={"token": plane.admin, "next": html.unescape(next_)},
            headers={"origin": plane.url},
        )
    assert signed_in.headers["location"] == target


def test_sign_out_from_another_site_is_refused(plane: Plane) -> None:
    with _browser(plane) as browser:
        forged = browser.post("/logout", headers={"origin": "http://evil.example"})
        assert forged.status_code == 403
        assert "set-cookie" not in forged.headers
        assert browser.get("/").status_code == 200  # still signed in
        own = browser.post("/logout", headers={"origin": plane.url})
    assert own.status_code == 303
    assert "max-age=0" in own.headers["set-cookie"].lower()


def test_pages_and_fragments_forbid_framing_and_sniffing(plane: Plane) -> None:
    with _browser(plane) as browser:
        page = browser.get("/")
        fragment = browser.get("/rollouts/ro-nope/progress", headers={"hx-request": "1"})
    for answer in (page, fragment):
        assert answer.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------ PostgreSQL


def test_a_nul_in_a_path_is_a_404_page_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL text cannot hold NUL: the store had refused the query (a JSON 422)."""
    with _serve(Settings(data_dir=tmp_path, db_url=pg_url)) as pg, _browser(pg) as browser:
        for path in (
            "/devices/%00",
            "/models/a%00/1.0.0",
            "/drift/digits-mlp/%00",
            "/deployments/x%00",
            "/rollouts/%00",
        ):
            page = browser.get(path)
            assert page.status_code == 404, path
            assert page.headers["content-type"].startswith("text/html"), path


# ------------------------------------------------------------------ in a real browser


class _ForgedSignOut(http.server.BaseHTTPRequestHandler):
    """Another site's page that posts the console's sign-out form on load."""

    target = ""

    def do_GET(self) -> None:
        form = f'<form id="f" method="post" action="{self.target}/logout"></form>'
        body = f"<!doctype html>{form}<script>document.getElementById('f').submit()</script>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


def test_another_site_cannot_sign_the_browser_out(browser: Any, plane: Plane) -> None:
    handler = type("Forged", (_ForgedSignOut,), {"target": plane.url})
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as evil:
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            page.goto(plane.url + "/login")
            page.fill("#token", plane.admin)
            page.click("button[type=submit]")
            page.wait_for_url(plane.url + "/")
            # `localhost` is another site than `127.0.0.1`: a top-level cross-site post.
            forged = ctx.new_page()
            forged.goto(f"http://localhost:{evil.server_address[1]}/")
            forged.wait_for_url(lambda url: url.startswith(plane.url))  # the post was sent
            assert [c["name"] for c in ctx.cookies()] == ["edgewise_console"]
            assert page.goto(plane.url + "/devices").url == plane.url + "/devices"
            page.click("form.who button[type=submit]")  # the console's own form still works
            page.wait_for_url(plane.url + "/login")
            assert ctx.cookies() == []
        finally:
            ctx.close()
            evil.shutdown()
