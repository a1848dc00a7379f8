"""`edgewise fleet health`: success rate, latency, drift and freshness per group."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgewise.cli._common import emit_json, finite_option
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app", "fmt"]

app = typer.Typer(
    help="Fleet health per model version, deployment or label group.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ByOpt = Annotated[
    str,
    typer.Option("--by", help="Group by: model, deployment, pipeline or label:<key>."),
]
WindowOpt = Annotated[
    float,
    typer.Option(
        "--window", callback=finite_option, help="Seconds of telemetry to look back over."
    ),
]


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A figure for a table cell ('-' when unknown)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


@app.command("health")
def health(
    by: ByOpt = "model",
    window: WindowOpt = 3600.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per group: devices reporting, success rate, p50/p95/p99 latency, drift, freshness."""
    rows = call_api(
        "GET", "/api/v1/fleet/health", server, token, params={"by": by, "window": window}
    )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo(f"no telemetry in the last {window:g} s")
        return
    typer.echo(
        f"{'GROUP':<28} {'DEVICES':>7} {'REQUESTS':>9} {'SUCCESS':>8} {'P50':>8} {'P95':>8} "
        f"{'P99':>8} {'CONF.SHIFT':>10} {'DRIFT':>6} {'AGE':>6}"
    )
    for r in rows:
        success = None if r["success_rate"] is None else 100 * r["success_rate"]
        typer.echo(
            f"{r['group'][:28]:<28} {r['devices_reporting']:>7} {r['requests']:>9} "
            f"{fmt(success, 2, '%'):>8} {fmt(r['p50_ms'], 2):>8} {fmt(r['p95_ms'], 2):>8} "
            f"{fmt(r['p99_ms'], 2):>8} {fmt(r['confidence_shift'], 3):>10} "
            f"{fmt(r['drift_score'], 2):>6} {fmt(r['freshness_s'], 0, 's'):>6}"
        )
