"""`edgewise model push|list|show|yank|unyank`: the control plane's model registry.

Registered onto the `model` Typer app defined in `_model` (pack/sign/verify/inspect).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json, path_segment
from edgewise.cli._model import app
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _model_path(ref: str) -> str:
    """`/api/v1/models/NAME/VERSION` for `name@version`."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise CliError(f"{ref!r} is not name@version")
    return f"/api/v1/models/{path_segment(name, 'model name')}/{path_segment(version, 'version')}"


@app.command("push")
def push(
    bundle: Annotated[Path, typer.Argument(help="The .ewb file.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed bundle to the registry."""
    try:
        content = bundle.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {bundle}: {exc.strerror or exc}") from None
    result = call_api("POST", "/api/v1/models", server, token, content=content, timeout=600)
    if as_json:
        emit_json(result)
        return
    what = "pushed" if result["created"] else "already registered"
    typer.echo(f"{what} {result['ref']} sha256={result['sha256']}")


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Option("--name", help="Only this model.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered model versions."""
    rows = call_api("GET", "/api/v1/models", server, token, params={"name": name})
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        flag = "  (yanked)" if r["yanked"] else ""
        typer.echo(f"{r['ref']:<28} {r['sha256'][:16]}  {r['size']:>9} B{flag}")


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="name@version")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a registered version with its manifest."""
    r = call_api("GET", _model_path(ref), server, token)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['ref']}  sha256={r['sha256']}  size={r['size']}  yanked={r['yanked']}")
    typer.echo(f"signers: {', '.join(r['signers']) or '(none)'}")
    typer.echo(f"pushed by {r['pushed_by']}")


@app.command("yank")
def yank(
    ref: Annotated[str, typer.Argument(help="name@version")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Yank a version: no deployment, revision or rollout may pin it from now on.

    Devices running it keep it; a rollout moving devices to it pauses.
    """
    view = call_api("POST", _model_path(ref) + "/yank", server, token)
    typer.echo(f"yanked {ref}")
    for rollout in view.get("rollouts") or []:
        typer.echo(
            f"rollout {rollout} moves devices to it: it pauses (model unyank {ref}, then "
            f"rollout resume {rollout}, to carry on; or rollout abort {rollout})"
        )


@app.command("unyank")
def unyank(
    ref: Annotated[str, typer.Argument(help="name@version")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Undo a yank: the version may be pinned and rolled out again."""
    call_api("POST", _model_path(ref) + "/unyank", server, token)
    typer.echo(f"unyanked {ref}")
