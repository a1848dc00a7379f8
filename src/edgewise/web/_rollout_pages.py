"""Rollout pages: the list, a live detail view polled by htmx, and operator commands.

Reads and commands both go through `/api/v1/rollouts` in process with the signed-in
token, so a viewer who forges a pause form gets the API's own 403 (shown as a message),
and every command lands in the audit chain exactly as from the CLI. The detail page's
progress block re-fetches itself (`hx-get ... every Ns`) until the rollout ends.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import escape
from starlette.concurrency import run_in_threadpool

from edgewise.web import _sources as src
from edgewise.web._auth import Session, same_origin, session_of
from edgewise.web._pages import login_redirect, nameless, page_context, plane_of
from edgewise.web._render import SECURITY_HEADERS, render
from edgewise.web._rollouts import ACTIONS, RolloutCard, allowed_actions, rollout_card

__all__ = ["POLL_S", "router"]

router = APIRouter(include_in_schema=False)

POLL_S = 1  # progress poll period, seconds: light (one small API read), and feels live


def _items(body: Any) -> list[dict[str, Any]]:
    items = body if isinstance(body, list) else (body or {}).get("rollouts", [])
    return [i for i in items if isinstance(i, dict)]


async def _session(request: Request) -> Session | None:
    return await run_in_threadpool(session_of, plane_of(request), request)


@router.get("/rollouts", response_class=HTMLResponse)
async def rollouts_page(request: Request) -> Response:
    """Rollouts, newest first, with state and progress."""
    session = await _session(request)
    if session is None:
        return login_redirect(request)
    answer = await src.api_call(request.app, session.token, "GET", "/api/v1/rollouts")
    cards: list[RolloutCard] | None = None
    flash = ""
    if answer.ok:
        cards = [rollout_card(doc) for doc in _items(answer.body)]
        cards.sort(key=lambda c: -(c.created_at or 0.0))
    elif not answer.missing:
        flash = answer.message
    ctx = page_context(session, "/rollouts", "Rollouts", rollouts=cards, flash=flash)
    return render("rollouts.html", ctx)


class _Problem(NamedTuple):
    """Why there is no card: the message, and the status to answer with."""

    message: str
    status: int


def _api_path(rollout_id: str, action: str = "") -> str:
    """The API route of a rollout: the id from the browser's URL is one segment, always."""
    path = f"/api/v1/rollouts/{src.api_segment(rollout_id)}"
    return f"{path}/{action}" if action else path


async def _card(request: Request, session: Session, rollout_id: str) -> RolloutCard | _Problem:
    """The rollout's card, or why there is none."""
    if nameless(rollout_id):
        return _Problem(f"no rollout {rollout_id}", 404)
    answer = await src.api_call(request.app, session.token, "GET", _api_path(rollout_id))
    if answer.missing:
        return _Problem("Rollouts are not available on this control plane yet.", 404)
    if not answer.ok or not isinstance(answer.body, dict):
        # 404 for an unknown rollout, 503 for one this replica cannot read
        return _Problem(answer.message, answer.status if answer.status >= 400 else 502)
    return rollout_card(answer.body)


def _progress_ctx(session: Session, card: RolloutCard, error: str = "") -> dict[str, Any]:
    return {
        "session": session,
        "r": card,
        "actions": allowed_actions(card, session.can_act),
        "poll_s": POLL_S,
        "error": error,
    }


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
async def rollout_page(request: Request, rollout_id: str) -> Response:
    """One rollout: phases, gates against thresholds, live progress, commands."""
    session = await _session(request)
    if session is None:
        return login_redirect(request)
    card = await _card(request, session, rollout_id)
    if isinstance(card, _Problem):
        ctx = page_context(session, "/rollouts", "Rollout", message=card.message)
        return render("error.html", ctx, status=card.status)
    ctx = {
        **page_context(session, "/rollouts", f"Rollout {rollout_id}"),
        **_progress_ctx(session, card),
    }
    return render("rollout.html", ctx)


@router.get("/rollouts/{rollout_id}/progress", response_class=HTMLResponse)
async def rollout_progress(request: Request, rollout_id: str) -> Response:
    """The progress block alone (what htmx swaps in)."""
    session = await _session(request)
    if session is None:
        return login_redirect(request)
    card = await _card(request, session, rollout_id)
    if isinstance(card, _Problem):
        # 286 tells htmx to stop polling: the rollout is gone or unreadable.
        return _notice(card.message, 286)
    return render("_rollout_progress.html", _progress_ctx(session, card))


def _notice(message: str, status: int) -> HTMLResponse:
    """A one-line fragment (what htmx swaps in when there is no progress to show)."""
    body = f'<p class="empty">{escape(message)}</p>'
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


@router.post("/rollouts/{rollout_id}/{action}", response_class=HTMLResponse)
async def rollout_command(request: Request, rollout_id: str, action: str) -> Response:
    """Pause, resume, approve or abort, as the signed-in operator."""
    session = await _session(request)
    if session is None:
        return login_redirect(request)
    htmx = bool(request.headers.get("hx-request"))
    if action not in ACTIONS:
        ctx = page_context(session, "/rollouts", "Unknown command", message=f"no {action!r}")
        return render("error.html", ctx, status=404)
    if not same_origin(request):
        ctx = page_context(
            session, "/rollouts", "Refused", message="the form did not come from this console"
        )
        return render("error.html", ctx, status=403)
    answer = await src.api_call(
        request.app, session.token, "POST", _api_path(rollout_id, action), {}
    )
    error = "" if answer.ok else f"{action} refused: {answer.message}"
    if not htmx:
        return RedirectResponse(f"/rollouts/{quote(rollout_id, safe='')}", status_code=303)
    card = await _card(request, session, rollout_id)
    if isinstance(card, _Problem):
        return _notice(card.message, 200)
    return render("_rollout_progress.html", _progress_ctx(session, card, error))
