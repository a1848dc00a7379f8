"""Read-only pages: fleet overview, devices, models, deployments, drift and SLO.

Each handler resolves the session (or sends the browser to the sign-in form), reads
through `_sources` in the thread pool, shapes the data with `_views` and renders one
template. Scope applies as in the API: a scoped token sees only its devices.
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from edgewise.control import ApiError, ControlPlane
from edgewise.control import _deployments as deps
from edgewise.control import _fleet as fleet
from edgewise.control import _registry as registry
from edgewise.control._rbac import in_scope
from edgewise.web import _slo as slo
from edgewise.web import _sources as src
from edgewise.web import _views as views
from edgewise.web._auth import Session, session_of
from edgewise.web._render import render

__all__ = ["login_redirect", "nameless", "page_context", "plane_of", "router"]

router = APIRouter(include_in_schema=False)

# A page of 1,000 rows is still quick to render and to read; beyond that, filter.
MAX_ROWS = 1000
MAX_SELECTOR = 2000  # as the API's `selector` query parameter


def nameless(*parts: str) -> bool:
    """Whether a path segment can name nothing stored: it holds a NUL character.

    PostgreSQL text cannot hold one (the store refuses the query, as a 422 in JSON);
    SQLite finds nothing. Either way the console answers its own 404 page.
    """
    return any("\x00" in part for part in parts)


def plane_of(request: Request) -> ControlPlane:
    """The control plane serving this app."""
    plane: ControlPlane = request.app.state.plane
    return plane


def login_redirect(request: Request) -> Response:
    """Send an anonymous browser to the sign-in form (htmx: a client-side redirect)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": "/login"})
    # Encoded: the page's own query (`?selector=...&online=false`) is one value of `next`.
    return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)


def page_context(session: Session, active: str, title: str, **extra: Any) -> dict[str, Any]:
    """What every page's base template reads."""
    return {"session": session, "active": active, "title": title, **extra}


def _not_found(session: Session, what: str, active: str) -> HTMLResponse:
    return _error(session, ApiError(404, "not_found", f"no {what}"), active)


def _error(session: Session, exc: ApiError, active: str) -> HTMLResponse:
    return render(
        "error.html",
        page_context(session, active, f"{exc.status} {exc.code}", message=exc.message),
        status=exc.status,
    )


_OPEN = frozenset({"open", "firing", "active", "suppressed"})


async def _alerts(request: Request, session: Session) -> list[dict[str, Any]] | None:
    answer = await src.api_call(request.app, session.token, "GET", "/api/v1/alerts?state=open")
    if not answer.ok or not isinstance(answer.body, list | dict):
        return None
    items = answer.body if isinstance(answer.body, list) else answer.body.get("alerts", [])
    out = []
    for a in items:
        if not isinstance(a, dict) or a.get("state", "open") not in _OPEN:
            continue
        state = a.get("state", "open")
        kind = f" ({a['kind']})" if a.get("kind") else ""
        suppressed = " [suppressed while a rollout touches it]" if state == "suppressed" else ""
        out.append(
            {
                "severity": str(
                    a.get("severity") or ("warning" if state == "suppressed" else "critical")
                ),
                "rule": f"{a.get('rule', a.get('name', '?'))}{kind}",
                "subject": str(a.get("subject", a.get("scope", a.get("target", "")))),
                "since": a.get("since", a.get("opened_at", a.get("started_at"))),
                "message": f"{a.get('message', a.get('summary', ''))}{suppressed}",
            }
        )
    return out


async def _active_rollouts(request: Request, session: Session) -> int | None:
    answer = await src.api_call(request.app, session.token, "GET", "/api/v1/rollouts")
    if not answer.ok:
        return None
    items = answer.body if isinstance(answer.body, list) else answer.body.get("rollouts", [])
    ended = {"completed", "rolled_back", "aborted", "failed"}
    return sum(1 for r in items if isinstance(r, dict) and r.get("state") not in ended)


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    """Fleet overview: online/offline, versions in the field, open alerts."""
    plane = plane_of(request)
    session = await run_in_threadpool(session_of, plane, request)
    if session is None:
        return login_redirect(request)

    def gather() -> views.FleetSummary:
        devices = src.device_rows(plane, session.principal, None, None)
        return views.fleet_summary(devices, src.pipelines_by_device(plane))

    summary = await run_in_threadpool(gather)
    alerts = await _alerts(request, session)
    active = await _active_rollouts(request, session)
    ctx = page_context(
        session, "/", "Fleet", summary=summary, alerts=alerts, active_rollouts=active
    )
    return render("fleet.html", ctx)


@router.get("/devices", response_class=HTMLResponse)
def devices_page(request: Request, selector: str = "", online: str = "") -> Response:
    """Devices, filtered by a label selector and connectivity."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    want = {"true": True, "false": False}.get(online)
    try:
        if len(selector) > MAX_SELECTOR:
            # Refused, not cut: a cut selector may parse, and select other devices.
            raise ApiError(400, "bad_selector", f"selector longer than {MAX_SELECTOR} characters")
        found = src.device_rows(plane, session.principal, selector or None, want)
    except ApiError as exc:
        found = []
        flash = f"{exc.message}"
    else:
        flash = ""
    pipes = src.pipelines_by_device(plane)
    rows = [{**d, "pipes": pipes.get(d["id"], [])} for d in found[:MAX_ROWS]]
    ctx = page_context(
        session,
        "/devices",
        "Devices",
        devices=rows,
        total=len(found),
        shown=len(rows),
        selector=selector[:MAX_SELECTOR],
        online=online if want is not None else "",
        flash=flash,
    )
    return render("devices.html", ctx, status=400 if flash else 200)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, device_id: str) -> Response:
    """One device: labels, capabilities, pipelines, slots, timeline, telemetry."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    if nameless(device_id):
        return _not_found(session, f"device {device_id}", "/devices")
    try:
        row = fleet.visible_device(plane, session.principal, device_id)
    except ApiError as exc:
        return _error(session, exc, "/devices")
    d = fleet.device_view(plane, row, detail=True)
    timeline = sorted(
        (
            {"pipeline": name, **e}
            for name, p in d["pipelines"].items()
            for e in (p.get("timeline") or [])
            if isinstance(e, dict)
        ),
        key=lambda e: -(views.number(e.get("at")) or 0.0),
    )[:200]
    desired = {
        name: f"{p['model']['name']}@{p['model']['version']}"
        for name, p in ((d.get("desired") or {}).get("pipelines") or {}).items()
        if isinstance(p, dict) and isinstance(p.get("model"), dict)
    }
    records = src.recent_telemetry(plane, device_id)
    series = _series(records)
    events = [r for r in records if r["cls"] == "event"][-30:]
    events.reverse()
    ctx = page_context(
        session,
        "/devices",
        f"Device {device_id}",
        d=d,
        timeline=timeline,
        desired=desired,
        series=series,
        events=events,
    )
    return render("device.html", ctx)


def _visible_pipelines(plane: ControlPlane, session: Session) -> list[dict[str, Any]]:
    labels = src.device_labels(plane)
    return [
        p
        for device_id, rows in src.pipelines_by_device(plane).items()
        if in_scope(session.principal.scope, labels.get(device_id, {}))
        for p in rows
    ]


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request) -> Response:
    """Model versions, signatures and where each runs."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    placements = views.model_placements(_visible_pipelines(plane, session))
    models = [
        {**registry.model_view(r), "placement": placements.get(f"{r['name']}@{r['version']}", {})}
        for r in plane.store.list_models()
    ]
    models.sort(key=lambda m: (m["name"], views.version_key(m["version"])))
    trust = plane.trust_root_view()
    if session.principal.scope:  # the fleet-wide counts are not a scoped token's to see
        trust["devices"] = {}
    trusted = set(trust["publishers"])
    for m in models:  # a model no trusted key signed installs nowhere any more
        m["untrusted"] = bool(m["signers"]) and not trusted.intersection(m["signers"])
    held = sorted(trust["devices"].items(), key=lambda kv: -int(kv[0]))
    return render(
        "models.html",
        page_context(session, "/models", "Models", models=models, trust=trust, held=held),
    )


@router.get("/models/{name}/{version}", response_class=HTMLResponse)
def model_page(request: Request, name: str, version: str) -> Response:
    """One model version: artifact, signatures, provenance, requirements, placement."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    row = None if nameless(name, version) else plane.store.get_model(name, version)
    if row is None:
        return _not_found(session, f"model {name}@{version}", "/models")
    running = [
        p
        for p in _visible_pipelines(plane, session)
        if p["model"] == name and p["version"] == version
    ]
    running.sort(key=lambda p: (p["device_id"], p["pipeline"]))
    ctx = page_context(
        session,
        "/models",
        f"{name}@{version}",
        m=registry.model_view(row),
        manifest=row["manifest"] or {},
        running=running[:200],
        more=max(0, len(running) - 200),
    )
    return render("model.html", ctx)


@router.get("/deployments", response_class=HTMLResponse)
def deployments_page(request: Request) -> Response:
    """Deployments: selector, priority, pipelines."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    rows = []
    for r in plane.store.list_deployments():
        if not deps.visible_to(session.principal, r):
            continue  # another site's, for a scoped token (as the API answers)
        view = deps.deployment_view(r)
        view["refs"] = {
            name: f"{p['model']['name']}@{p['model']['version']}"
            for name, p in (view["pipelines"] or {}).items()
            if isinstance(p, dict) and isinstance(p.get("model"), dict)
        }
        rows.append(view)
    ctx = page_context(session, "/deployments", "Deployments", deployments=rows)
    return render("deployments.html", ctx)


def _revisions(plane: ControlPlane, ref: str) -> list[dict[str, Any]] | None:
    """The deployment's revisions, newest first (None: no revisions in this build)."""
    try:
        from edgewise.control._revisions import list_revisions
    except ImportError:
        return None
    try:
        history = list_revisions(plane, ref)
    except ApiError:
        return None
    return list(reversed(history.get("revisions") or []))


@router.get("/deployments/{ref}", response_class=HTMLResponse)
def deployment_page(request: Request, ref: str) -> Response:
    """One deployment with its pre-flight result against today's fleet."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    row = None if nameless(ref) else plane.store.get_deployment(ref)
    if row is None or not deps.visible_to(session.principal, row):
        return _not_found(session, f"deployment {ref}", "/deployments")
    view = deps.deployment_view(row)
    preflight: dict[str, Any] | None = None
    why = ""
    try:
        req = deps.DeploymentRequest(
            name=view["name"],
            selector=view["selector"],
            priority=view["priority"],
            pipelines={n: p["spec"] for n, p in view["pipelines"].items()},
        )
        preflight = deps.dry_run(plane, req, session.principal)
    except ApiError as exc:
        why = f"pre-flight not available: {exc.message}"
    except (ValueError, KeyError, TypeError) as exc:
        why = f"pre-flight not available: {type(exc).__name__}"
    ctx = page_context(
        session,
        "/deployments",
        f"Deployment {view['name']}",
        d=view,
        preflight=preflight,
        preflight_error=why,
        revisions=_revisions(plane, ref),
    )
    return render("deployment.html", ctx)


@router.get("/drift", response_class=HTMLResponse)
def drift_index(request: Request) -> Response:
    """Model versions, with how many devices report each, linking to their charts."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    running: Counter[str] = Counter(
        f"{p['model']}@{p['version']}" for p in _visible_pipelines(plane, session)
    )
    refs = [f"{r['name']}@{r['version']}" for r in plane.store.list_models()]
    versions = sorted(((ref, running.get(ref, 0)) for ref in refs), key=lambda kv: (-kv[1], kv[0]))
    ctx = page_context(session, "/drift", "Drift & SLO", versions=versions)
    return render("drift.html", ctx)


# Window fields the SLO series already show (or that are timestamps, not figures).
_COVERED = frozenset({"start", "end", "ts", "drift", "latency", "window_s"})


def _series(records: list[dict[str, Any]]) -> list[views.Series]:
    """SLO series first, then any other numeric field the windows carry.

    All-zero fields are left out: five flat lines of never-shed requests say nothing.
    """
    extra = [
        s
        for s in views.bucketed_series(records)
        if s.name.split(".")[0] not in _COVERED and any(y for y in s.ys)
    ]
    return slo.slo_series(records) + extra


def _drift_figures(
    records: list[dict[str, Any]], reference: dict[str, Any]
) -> tuple[list[views.Series], list[views.Histogram]]:
    """SLO series first, then any other numeric field; histograms against the reference."""
    series = _series(records)
    histograms = slo.reference_histograms(records, reference)
    if not histograms:
        histograms = [
            views.compare_histograms(field, counts, None)
            for field, counts in sorted(views.window_histograms(records).items())
        ]
    if not histograms and isinstance(reference.get("confidence"), dict):
        ref_conf = reference["confidence"]
        empty = [0.0] * len(ref_conf.get("frequencies") or [])
        histograms.append(views.compare_histograms("top-1 confidence (reference)", empty, ref_conf))
    return series, histograms


@router.get("/drift/{name}/{version}", response_class=HTMLResponse)
def drift_page(request: Request, name: str, version: str) -> Response:
    """Time series of a version's telemetry and its histograms against the reference."""
    plane = plane_of(request)
    session = session_of(plane, request)
    if session is None:
        return login_redirect(request)
    row = None if nameless(name, version) else plane.store.get_model(name, version)
    if row is None:
        return _not_found(session, f"model {name}@{version}", "/drift")
    labels = src.device_labels(plane)
    ids, sampled, records = src.model_telemetry(plane, session.principal, name, version, labels)
    reference = (row["manifest"] or {}).get("reference") or {}
    series, histograms = _drift_figures(records, reference)
    ctx = page_context(
        session,
        "/drift",
        f"Drift {name}@{version}",
        ref=f"{name}@{version}",
        devices=len(ids),
        sampled=len(sampled),
        records=len(records),
        series=series,
        histograms=histograms,
    )
    return render("drift_model.html", ctx)
