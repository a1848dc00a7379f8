"""`edgewise audit list|verify|export`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json, write_output
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(help="The audit chain: list, verify, export.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command("list")
def list_(
    after: Annotated[int, typer.Option("--after", help="Only records after this id.")] = 0,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List audit records."""
    rows = call_api("GET", "/api/v1/audit", server, token, params={"after": after, "limit": limit})
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        typer.echo(f"{r['id']:>6}  {at}  {r['actor']}  {r['action']}  {r['object']}  {r['result']}")


@app.command("verify")
def verify(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Check the hash chain; exits 1 naming the first broken record."""
    result = call_api("GET", "/api/v1/audit/verify", server, token)
    if as_json:
        emit_json(result)
    if not result["ok"]:
        raise CliError(result["message"])
    if not as_json:
        typer.echo(f"audit chain intact ({result['records']} records)")


@app.command("export")
def export(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File (default stdout).")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export every record as JSON lines."""
    lines: list[str] = []
    after = 0
    while True:
        rows = call_api(
            "GET", "/api/v1/audit", server, token, params={"after": after, "limit": 10000}
        )
        lines += [json.dumps(r, sort_keys=True) for r in rows]
        if len(rows) < 10000:
            break
        after = rows[-1]["id"]
    text = "\n".join(lines) + ("\n" if lines else "")
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_output(out, text)
        typer.echo(f"wrote {len(lines)} records to {out}")
