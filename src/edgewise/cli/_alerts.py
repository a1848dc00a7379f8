"""`edgewise alerts list|rules|set-rule|delete-rule|evaluate`."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json, path_segment
from edgewise.cli._fleet import JsonOpt, fmt
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(help="Alerts on burn rate, drift and telemetry freshness.", no_args_is_help=True)


@app.command("list")
def list_(
    state: Annotated[
        str | None,
        typer.Option("--state", help="open, firing, suppressed or resolved (default: all)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many.")] = 200,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Alert records, newest first."""
    rows = call_api("GET", "/api/v1/alerts", server, token, params={"state": state, "limit": limit})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no alerts")
        return
    for r in rows:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["updated_at"]))
        typer.echo(
            f"{at}  {r['state']:<10} {r['rule']:<16} {r['scope']:<24} "
            f"value={fmt(r['value'], 2)}  {r['message']}"
        )


@app.command("rules")
def rules(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The alert rules."""
    rows = call_api("GET", "/api/v1/alert-rules", server, token)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no alert rules")
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("name", "kind")}
        typer.echo(f"{r['name']:<20} {r['kind']:<10} {json.dumps(rest, sort_keys=True)}")


@app.command("set-rule")
def set_rule(
    name: Annotated[str, typer.Argument(help="Rule name (lower case).")],
    kind: Annotated[str, typer.Option("--kind", help="burn_rate, drift or freshness.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value rule parameter, e.g. burn_rate=14.4."),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or replace a rule; parameters are JSON values (numbers, true/false, text)."""
    body: dict[str, object] = {"name": name, "kind": kind}
    for pair in param or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"rule parameter {pair!r} is not key=value")
        try:
            body[key] = json.loads(value)
        except (ValueError, RecursionError):
            body[key] = value
    path = f"/api/v1/alert-rules/{path_segment(name, 'rule name')}"
    result = call_api("PUT", path, server, token, json_body=body)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"rule {result['name']} ({result['kind']}) saved")


@app.command("delete-rule")
def delete_rule(
    name: Annotated[str, typer.Argument(help="Rule name.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Remove a rule."""
    call_api("DELETE", f"/api/v1/alert-rules/{path_segment(name, 'rule name')}", server, token)
    typer.echo(f"rule {name} deleted")


@app.command("evaluate")
def evaluate(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Evaluate every rule now and print what changed."""
    changes = call_api("POST", "/api/v1/alerts/evaluate", server, token)
    if as_json:
        emit_json(changes)
        return
    if not changes:
        typer.echo("no alert changed")
    for c in changes:
        typer.echo(f"{c['rule']} {c['scope']}: {c['old']} -> {c['new']}  {c['message']}")
