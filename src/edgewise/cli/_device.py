"""`edgewise device list|show|label|enroll-token|decommission`."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json, finite_option, path_segment
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app", "parse_labels"]

app = typer.Typer(
    help="Devices: list, show, label, enroll-token, decommission.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`k=v` strings to a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"label {pair!r} is not key=value")
        out[key] = value
    return out


@app.command("enroll-token")
def enroll_token(
    label: Annotated[
        list[str] | None, typer.Option("--label", help="k=v applied at enrollment.")
    ] = None,
    ttl: Annotated[
        float, typer.Option("--ttl", callback=finite_option, help="Validity in seconds.")
    ] = 86400.0,
    max_uses: Annotated[int, typer.Option("--max-uses", help="How many devices may use it.")] = 1,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mint an enrollment token; printed alone on the last line."""
    result = call_api(
        "POST",
        "/api/v1/enroll-tokens",
        server,
        token,
        json_body={"labels": parse_labels(label or []), "ttl_s": ttl, "max_uses": max_uses},
    )
    if as_json:
        emit_json(result)
        return
    typer.echo(f"enrollment token {result['id']} (max uses {result['max_uses']}):")
    typer.echo(result["token"])


@app.command("list")
def list_(
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="Label selector.")
    ] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="Only online / offline devices.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices."""
    rows = call_api(
        "GET",
        "/api/v1/devices",
        server,
        token,
        params={"selector": selector, "online": None if online is None else str(online).lower()},
    )
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        state = "online" if r["online"] else r["status"] if r["status"] != "active" else "offline"
        agent = f"agent {r['agent_version']}" if r.get("agent_version") else "agent ?"
        typer.echo(f"{r['id']}  {state:<14}  rev {r['desired_revision']}  {agent:<12}  {labels}")


@app.command("show")
def show(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a device, its pipelines and their timelines."""
    d = call_api("GET", f"/api/v1/devices/{path_segment(device_id, 'device id')}", server, token)
    if as_json:
        emit_json(d)
        return
    typer.echo(f"{d['id']}  status={d['status']}  online={d['online']}")
    typer.echo(f"labels: {d['labels']}")
    typer.echo(f"desired revision {d['desired_revision']}, reported {d['reported_revision']}")
    agent = d.get("agent") or {}
    if agent.get("version"):
        known = agent.get("spec_terms")
        typer.echo(
            f"agent {agent['version']}: "
            + ("spec vocabulary not reported" if known is None else f"knows {known} spec terms")
            + (f" (digest {agent['spec_digest']})" if agent.get("spec_digest") else "")
        )
    for err in d["errors"]:
        typer.echo(f"error: {err}")
    for name, p in d["pipelines"].items():
        typer.echo(
            f"pipeline {name}: {p['model']}@{p['version']} slot={p['slot']} "
            f"{p['status']} {p['reason']}"
        )
        for step in p["timeline"]:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(step["at"]))
            typer.echo(f"  {at}  {step['state']:<16} {step.get('reason', '')}")


@app.command("label")
def label(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    pairs: Annotated[list[str] | None, typer.Argument(help="k=v labels to set.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="Label key to remove.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set or remove labels."""
    d = call_api(
        "POST",
        f"/api/v1/devices/{path_segment(device_id, 'device id')}/labels",
        server,
        token,
        json_body={"set": parse_labels(pairs or []), "remove": remove or []},
    )
    if as_json:
        emit_json(d)
        return
    typer.echo(f"{d['id']} labels: {d['labels']} (desired revision {d['desired_revision']})")


@app.command("decommission")
def decommission(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke a device's key."""
    path = f"/api/v1/devices/{path_segment(device_id, 'device id')}/decommission"
    call_api("POST", path, server, token)
    typer.echo(f"decommissioned {device_id}")
