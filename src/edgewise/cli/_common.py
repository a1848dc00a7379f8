"""Shared helpers for CLI modules: errors, output, and control-plane connection settings.

Connection settings resolve in this order: command-line flag, environment
(`EDGEWISE_SERVER`, `EDGEWISE_TOKEN`), then the config file
(`$EDGEWISE_CONFIG` or `~/.config/edgewise/config.json`, keys `server` and `token`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

__all__ = [
    "DAY_S",
    "CliError",
    "config_path",
    "emit_json",
    "finite_option",
    "json_problem",
    "off_or_range",
    "output_error",
    "parse_broker",
    "path_segment",
    "resolve_server",
    "resolve_token",
    "write_output",
]

DEFAULT_SERVER = "http://127.0.0.1:8080"
DAY_S = 86400.0  # the longest wait or interval an option takes


class CliError(Exception):
    """A user-facing failure: printed as one line, exits non-zero."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_path() -> Path:
    """Where the CLI config file lives."""
    env = os.environ.get("EDGEWISE_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".config" / "edgewise" / "config.json"


def _config() -> dict[str, Any]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        raise CliError(f"cannot read config file {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def resolve_server(flag: str | None) -> str:
    """The control-plane URL from flag, environment or config file."""
    return (
        flag
        or os.environ.get("EDGEWISE_SERVER")
        or str(_config().get("server") or "")
        or DEFAULT_SERVER
    ).rstrip("/")


def resolve_token(flag: str | None) -> str:
    """The operator token from flag, environment or config file; required."""
    token = flag or os.environ.get("EDGEWISE_TOKEN") or str(_config().get("token") or "")
    if not token:
        raise CliError(
            "no operator token: pass --token, set EDGEWISE_TOKEN, or write a config file"
        )
    if not token.isascii() or not token.isprintable():  # it goes into an HTTP header
        raise CliError("token must be ASCII (printable characters only)")
    return token


def path_segment(value: str, what: str) -> str:
    """`value` percent-encoded as one URL path segment, so it cannot change the route.

    Raises:
        CliError: `value` is empty, or holds a "/" (the server decodes %2F before routing,
            so no id or name it can address holds one).
    """
    if not value:
        raise CliError(f"{what} must not be empty")
    if "/" in value:
        raise CliError(f"{what} {value!r} must not contain '/'")
    segment = quote(value, safe="")
    # "." and ".." are dot segments: HTTP clients resolve them away (`a/..` is `/`).
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def http_url(value: str, flag: str) -> str:
    """`value`, refused unless it is an http:// or https:// URL with a host."""
    import httpx

    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise CliError(f"{flag} {value!r} is not an http:// or https:// URL with a host")
    return value


def http_url_option(param: typer.CallbackParam, value: str | None) -> str | None:
    """Typer callback: an optional URL option must be http(s) with a host."""
    if value is None or value == "":
        return value
    return http_url(value, (param.opts or [f"--{param.name}"])[0])


def finite_option(param: typer.CallbackParam, value: Any) -> Any:
    """Typer callback for float options: refuse nan and infinities (not JSON numbers).

    Raises:
        CliError: the value is not a finite number.
    """
    if isinstance(value, float) and not math.isfinite(value):
        flag = max(param.opts, key=len) if param.opts else param.name
        raise CliError(f"{flag} must be a finite number")
    return value


def off_or_range(low: float, high: float, unit: str) -> Callable[[typer.CallbackParam, Any], Any]:
    """A Typer callback for a float option that is 0 (off) or within `low` to `high`.

    For a setting whose 0 turns a feature off while small values do harm (a long-poll
    wait under a second is sent as 0 and polls in a tight loop); typer's `min=` cannot
    leave such a gap. None (not given) passes.

    Raises:
        CliError: the value is not finite, or neither 0 nor from `low` to `high`.
    """

    def check(param: typer.CallbackParam, value: Any) -> Any:
        finite_option(param, value)
        if value is None or value == 0 or low <= value <= high:
            return value
        flag = max(param.opts, key=len) if param.opts else param.name
        raise CliError(
            f"{flag} {value:g} is out of range: use 0 (off) or {low:g} to {high:g} {unit}"
        )

    return check


def json_problem(data: Any) -> str | None:
    """Why `data` cannot be sent as JSON, naming the field; None when it can.

    YAML hands back what JSON has no value for: dates, `.nan` and `.inf`, self-referencing
    aliases, binary. JSON text itself may hold `NaN` and `Infinity`.
    """
    try:
        return _json_problem(data, "", frozenset())
    except RecursionError:
        return "nested too deeply"


def _json_problem(data: Any, where: str, seen: frozenset[int]) -> str | None:
    at = f"{where}: " if where else ""
    if data is None or isinstance(data, (str, bool, int)):
        return None
    if isinstance(data, float):
        return None if math.isfinite(data) else f"{where or 'a value'} is not a finite number"
    if isinstance(data, (datetime.date, datetime.time)):
        return f"{at}a {type(data).__name__} is not a JSON value; quote it"
    if not isinstance(data, (dict, list)):
        return f"{at}a {type(data).__name__} value is not JSON"
    if id(data) in seen:
        return f"{at}circular reference"
    seen |= {id(data)}
    if isinstance(data, list):
        for i, item in enumerate(data):
            if problem := _json_problem(item, f"{where}[{i}]", seen):
                return problem
        return None
    for key, item in data.items():
        name = f"{where}.{key}" if where else str(key)
        if not isinstance(key, (str, int, float)) and key is not None:
            return f"{name}: a {type(key).__name__} key is not JSON; quote it"
        if problem := _json_problem(item, name, seen):
            return problem
    return None


def write_output(path: Path, data: str | bytes, *, parents: bool = False) -> None:
    """Write an output file (`--out`), turning OS errors into one-line messages.

    With `parents`, missing directories above `path` are created first.

    Raises:
        CliError: `path` is a directory, its directory is missing (or a file), or it is
            not writable.
    """
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as exc:
        raise output_error(path, exc) from None


def output_error(path: Path, exc: OSError) -> CliError:
    """The one-line error for an output file (or directory) that could not be written."""
    if isinstance(exc, IsADirectoryError):
        return CliError(f"cannot write {path}: it is a directory; name a file")
    if isinstance(exc, FileNotFoundError):
        return CliError(f"cannot write {path}: directory {path.parent} does not exist")
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return CliError(f"cannot write {path}: {path.parent} is not a directory")
    return CliError(f"cannot write {path}: {exc.strerror or exc}")


def emit_json(data: Any) -> None:
    """Print machine-readable output."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def parse_broker(text: str | None, flag: str = "--mqtt") -> tuple[str, int] | None:
    """`HOST:PORT` of an MQTT broker (host 127.0.0.1 when left out); None when empty.

    Raises:
        CliError: not HOST:PORT with a port from 1 to 65535.
    """
    if not text:
        return None
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise CliError(f"bad {flag} {text!r}: use HOST:PORT")
    return host or "127.0.0.1", number
