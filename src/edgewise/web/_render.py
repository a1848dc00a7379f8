"""Templates, their filters, and the response headers every console page carries.

The Content-Security-Policy allows nothing but this origin: no inline script (charts read
their data from `application/json` blocks), no external font, style or script. A page
that tried to reach another host would be blocked by the browser as well as by review.

Much of what the pages show was written by devices (pipeline and model names, reasons,
errors, telemetry field names), and a compromised device writes whatever it likes. So,
besides HTML autoescaping: every `{{ value }}` has its bidi embedding, override and
isolate controls shown as `[U+202E]` (so `1.0.0` cannot be made of a reversed `0.0.1`);
chart data is strict JSON (a non-finite number is `null`, which `JSON.parse` reads,
where `NaN` would throw and leave every chart of the page undrawn); a value used as a
path segment of a link goes through `seg` (percent-encoded: `?`, `#` and `/` stay inside
it); and a timestamp no calendar holds shows as a number instead of failing the page.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup

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
        "base-uri 'none'; object-src 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",  # frame-ancestors, for browsers that predate CSP 2
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


# Bidi embeddings, overrides and isolates (LRE..RLO, LRI..PDI): what "Trojan Source"
# text uses to make one string display as another. Marks (LRM, RLM) are left alone.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def _visible(value: Any) -> Any:
    """Jinja's `finalize`: bidi controls in plain strings shown as `[U+XXXX]`."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", value)
    return value


def _when(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return "never"
    try:
        stamp = dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    except (OverflowError, ValueError, OSError):
        # A device's clock or units gone wrong (milliseconds, say): past year 9999.
        return f"{float(value):.6g} (not a time)"
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seg(value: Any) -> str:
    """A link's path segment, percent-encoded (`/`, `?` and `#` included).

    Dots stay: browsers read `%2E%2E` as `..` anyway, and `1.0.0` reads better.
    """
    return quote(str(value), safe="")


def _finite(value: Any) -> Any:
    """Non-finite floats (anywhere inside) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _chart(value: Any) -> Markup:
    """Strict JSON for a `<script type="application/json">` block (`</script>` escaped)."""
    return htmlsafe_json_dumps(_finite(value), dumps=json.dumps, allow_nan=False)


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
    finalize=_visible,
)
_env.filters.update(
    when=_when, show=_show, num=_num, pct=_pct, bytes=_bytes, ref=_ref, seg=_seg, chart=_chart
)


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
