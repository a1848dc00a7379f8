"""Shared helpers for CLI modules: errors, output, and control-plane connection settings.

Connection settings resolve in this order: command-line flag, environment
(`EDGEWISE_SERVER`, `EDGEWISE_TOKEN`), then the config file
(`$EDGEWISE_CONFIG` or `~/.config/edgewise/config.json`, keys `server` and `token`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

__all__ = [
    "CliError",
    "config_path",
    "emit_json",
    "parse_broker",
    "resolve_server",
    "resolve_token",
]

DEFAULT_SERVER = "http://127.0.0.1:8080"


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
    return token


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
