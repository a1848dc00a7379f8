"""Templates, their filters, and the response headers every console page carries.

The Content-Security-Policy allows nothing but this origin: no inline script (charts read
their data from `application/json` blocks), no external font, style or script. A page
that tried to reach another host would be blocked by the browser as well as by review.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

__all__ = ["NAV", "SECURITY_HEADERS", "render"]

_DASH = "\u2013"  # an en dash for "no value"

TEMPLATES = Path(__file__).parent / "templates"

NAV: tuple[tuple[str, str], ...] = (
    ("/", "Fleet"),
    ("/devices", "Devices"),
    ("/models", "Models"),
    ("/deployments", "Deployments"),
    ("/rollouts", "Rollouts"),
    ("/drift", "Drift & SLO"),
)

SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _when(value: Any) -> str:
    if not isinstance(value, int | float) or value <= 0:
        return "never"
    stamp = dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def _show(value: Any) -> str:
    if value is None:
        return _DASH
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value) or _DASH
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _DASH if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{100 * float(value):.0f} %" if value <= 1 else f"{float(value):.0f} %"
    return ""


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return _DASH
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _ref(value: Any) -> str:
    if isinstance(value, Mapping) and "name" in value:
        return f"{value['name']}@{value.get('version', '?')}"
    return _DASH if value is None else str(value)


_env = Environment(
    loader=FileSystemLoader(str(TEMPLATES)),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(when=_when, show=_show, num=_num, pct=_pct, bytes=_bytes, ref=_ref)


def render(
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """Render a template to a response with the console's security headers."""
    body = _env.get_template(template).render({"nav": NAV, **context})
    return HTMLResponse(body, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})
