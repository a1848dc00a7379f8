"""Sign-in and sign-out: the token form and the HttpOnly cookie."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from edgewise.control import ApiError, Permission
from edgewise.web._auth import COOKIE, parse_form, same_origin, session_of
from edgewise.web._pages import plane_of
from edgewise.web._render import render

__all__ = ["COOKIE_MAX_AGE_S", "router"]

router = APIRouter(include_in_schema=False)

COOKIE_MAX_AGE_S = 12 * 3600  # a working day; the token itself may live longer
_FOREIGN_FORM = "the form did not come from this console"


def _safe_next(target: str) -> str:
    """Only local paths: `next` must not turn the form into an open redirect."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target[:500]
    return "/"


def _form(next_: str, flash: str = "", status: int = 200) -> HTMLResponse:
    ctx = {"session": None, "title": "Sign in", "next": _safe_next(next_), "flash": flash}
    return render("login.html", ctx, status=status)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    """The sign-in form (or straight on when already signed in)."""
    if session_of(plane_of(request), request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _form(next)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token like the API does, then keep it in an HttpOnly cookie."""
    form = parse_form(await request.body())
    next_ = form.get("next", "/")
    if not same_origin(request):
        return _form(next_, "Sign-in must come from this console's own form.", 403)
    token = form.get("token", "").strip()
    plane = plane_of(request)

    def check() -> str:
        try:
            who = plane.authenticate(f"Bearer {token}")
            plane.authorize(who, Permission.READ)
        except ApiError as exc:
            return exc.message
        return ""

    problem = await run_in_threadpool(check) if token else "enter a token"
    if problem:
        return _form(next_, f"Sign-in refused: {problem}.", 401)
    response = RedirectResponse(_safe_next(next_), status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """Forget the cookie (only when the form is this console's: no forced sign-out).

    SameSite keeps the cookie from a cross-site request, but not the browser from
    obeying the `Set-Cookie` that clears it in the answer to a top-level form post.
    """
    if not same_origin(request):
        ctx = {"session": None, "title": "Refused", "message": _FOREIGN_FORM}
        return render("error.html", ctx, status=403)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
