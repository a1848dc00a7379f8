"""`edgewise token create|list|revoke`: operator tokens (admin)."""

from __future__ import annotations

from typing import Annotated

import typer

from edgewise.cli._common import emit_json, path_segment
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(help="Operator tokens: create, list, revoke.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses the token.")],
    role: Annotated[str, typer.Option("--role", help="admin, publisher, operator or viewer.")],
    scope: Annotated[
        str | None, typer.Option("--scope", help="Label selector limiting the token.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; the secret is printed alone on the last line (shown once)."""
    result = call_api(
        "POST",
        "/api/v1/tokens",
        server,
        token,
        json_body={"name": name, "role": role, "scope": scope},
    )
    if as_json:
        emit_json(result)
        return
    typer.echo(f"token {result['id']} ({result['role']}) created:")
    typer.echo(result["token"])


@app.command("list")
def list_(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    rows = call_api("GET", "/api/v1/tokens", server, token)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        typer.echo(f"{r['id']}  {r['role']:<9}  {state:<7}  {r['name']}  {r['scope'] or ''}")


@app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (from `token list`).")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke a token."""
    call_api("DELETE", f"/api/v1/tokens/{path_segment(token_id, 'token id')}", server, token)
    typer.echo(f"revoked {token_id}")
