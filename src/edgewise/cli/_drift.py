"""`edgewise drift show`: input drift per model version or device group."""

from __future__ import annotations

from typing import Annotated

import typer

from edgewise.cli._common import emit_json
from edgewise.cli._fleet import ByOpt, JsonOpt, WindowOpt, fmt
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(
    help="Input and confidence drift against the models' references.", no_args_is_help=True
)


@app.command("show")
def show(
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (name or name@version).")
    ] = None,
    by: ByOpt = "model",
    window: WindowOpt = 3600.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drift score per group (1.0 = alarm level), confidence shift, devices drifted."""
    rows = call_api(
        "GET",
        "/api/v1/drift",
        server,
        token,
        params={"by": by, "window": window, "model": model},
    )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo(f"no drift figures in the last {window:g} s")
        return
    typer.echo(f"{'GROUP':<28} {'DRIFT':>6} {'CONF.SHIFT':>10} {'DEVICES':>7}  DRIFTED")
    for r in rows:
        drifted = ", ".join(r["devices_drifted"][:5])
        more = len(r["devices_drifted"]) - 5
        if more > 0:
            drifted += f" (+{more})"
        typer.echo(
            f"{r['group'][:28]:<28} {fmt(r['drift_score'], 2):>6} "
            f"{fmt(r['confidence_shift'], 3):>10} {r['devices_reporting']:>7}  {drifted or '-'}"
        )
