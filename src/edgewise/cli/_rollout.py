r"""`edgewise rollout start|status|pause|resume|approve|abort|rollback|list`.

Also adds `deploy update` (a new revision of a deployment; devices move only through a
rollout, or at once with `--promote`) and `deploy history` to the deploy commands.

Example::

    edgewise deploy update base -p digits=digits-mlp@1.1.0          # -> revision 2
    edgewise rollout start --deployment base --to 2 --canary 5% --waves 25,100 \\
        --soak 300 --success-threshold 95 --error-threshold 2 --on-breach rollback
    edgewise rollout status ro-1a2b3c --watch
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli import _deploy
from edgewise.cli._common import CliError, emit_json, finite_option, path_segment
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(
    help="Staged rollouts: start, status, pause, resume, approve, abort, rollback, list.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
IdArg = Annotated[str, typer.Argument(help="Rollout id.")]


def _waves(text: str) -> list[float]:
    try:
        waves = [float(w.strip().rstrip("%")) for w in text.split(",") if w.strip()]
    except ValueError:
        raise CliError(f"--waves {text!r} is not a list of percents like 25,50,100") from None
    if not waves:
        raise CliError("--waves needs at least one percent")
    if not all(math.isfinite(w) for w in waves):
        raise CliError(f"--waves {text!r}: each percent must be a finite number")
    return waves


def _canary(text: str) -> int | str:
    text = text.strip()
    if text.endswith("%"):
        return text
    try:
        return int(text)
    except ValueError:
        raise CliError(f"--canary {text!r} is neither a count nor a percent like 5%") from None


@app.command("start")
def start(
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="Deployment name or id.")],
    to: Annotated[int, typer.Option("--to", help="Target revision (see deploy history).")],
    canary: Annotated[str | None, typer.Option("--canary", help="Count or percent.")] = None,
    waves: Annotated[str | None, typer.Option("--waves", help="e.g. 25,50,100")] = None,
    soak: Annotated[
        float | None, typer.Option("--soak", callback=finite_option, help="Soak seconds per phase.")
    ] = None,
    success: Annotated[
        float | None,
        typer.Option(
            "--success-threshold", callback=finite_option, help="Percent healthy to pass."
        ),
    ] = None,
    error: Annotated[
        float | None,
        typer.Option(
            "--error-threshold", callback=finite_option, help="Percent failed that breaches."
        ),
    ] = None,
    on_breach: Annotated[str | None, typer.Option("--on-breach", help="pause or rollback.")] = None,
    max_per_minute: Annotated[
        float | None,
        typer.Option(
            "--max-per-minute", callback=finite_option, help="Devices notified per minute."
        ),
    ] = None,
    ramp: Annotated[
        float | None, typer.Option("--ramp", callback=finite_option, help="Rate x this per minute.")
    ] = None,
    require_approval: Annotated[
        bool, typer.Option("--require-approval", help="Approve before every next phase.")
    ] = False,
    device_timeout: Annotated[
        float | None,
        typer.Option("--device-timeout", callback=finite_option, help="Seconds before TIMED_OUT."),
    ] = None,
    min_reporting: Annotated[
        int | None, typer.Option("--min-reporting", help="Devices reporting before gates.")
    ] = None,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option("--max-latency-ratio", callback=finite_option, help="p95 new/old <= L."),
    ] = None,
    max_error_rate_delta: Annotated[
        float | None,
        typer.Option(
            "--max-error-rate-delta", callback=finite_option, help="Error-rate delta <= E."
        ),
    ] = None,
    max_confidence_shift: Annotated[
        float | None,
        typer.Option("--max-confidence-shift", callback=finite_option, help="Confidence JS <= S."),
    ] = None,
    max_input_drift: Annotated[
        float | None,
        typer.Option("--max-input-drift", callback=finite_option, help="Input drift <= D."),
    ] = None,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="Rollout spec (JSON or YAML).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start though some targeted devices cannot run the revision (their agents "
            "do not know terms of its specs, or they lack what its models require): they "
            "refuse it and are held back.",
        ),
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start moving a deployment's devices to a revision, phase by phase."""
    spec: dict[str, Any] = _deploy._load(spec_file) if spec_file else {}
    flags: dict[str, Any] = {
        "canary": _canary(canary) if canary is not None else None,
        "waves": _waves(waves) if waves is not None else None,
        "soak_s": soak,
        "on_breach": on_breach,
        "rate_per_min": max_per_minute,
        "rate_ramp": ramp,
        "device_timeout_s": device_timeout,
    }
    spec.update({k: v for k, v in flags.items() if v is not None})
    gates = dict(spec.get("gates") or {})
    gate_flags = {
        "success_pct": success,
        "error_pct": error,
        "min_reporting": min_reporting,
        "max_latency_ratio": max_latency_ratio,
        "max_error_rate_delta": max_error_rate_delta,
        "max_confidence_shift": max_confidence_shift,
        "max_input_drift": max_input_drift,
    }
    gates.update({k: v for k, v in gate_flags.items() if v is not None})
    if gates:
        spec["gates"] = gates
    if require_approval:
        phases = len(spec.get("waves") or [25, 100]) + 1
        spec["require_approval"] = [True] * phases
    body: dict[str, Any] = {"deployment": deployment, "to_revision": to, "spec": spec}
    if force:
        body["force"] = True
    view = call_api("POST", "/api/v1/rollouts", server, token, json_body=body)
    if as_json:
        emit_json(view)
        return
    sizes = ", ".join(f"{p['name']}={p['size']}" for p in view["phases"])
    typer.echo(
        f"rollout {view['id']}: {view['deployment']} revision {view['from_revision']} -> "
        f"{view['to_revision']}, {view['devices']} devices ({sizes})"
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _render(view: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"rollout {view['id']}  {view['deployment']}  revision {view['from_revision']} -> "
        f"{view['to_revision']}  state={view['state']}"
        + (f"  ({view['reason']})" if view.get("reason") else "")
    )
    phases = Table(title="phases", show_header=True)
    for col in ("#", "phase", "state", "size", "devices by state"):
        phases.add_column(col)
    for p in view["phases"]:
        marker = "*" if p["index"] == view["phase_index"] else ""
        devices = ", ".join(f"{k}={v}" for k, v in p["counts"].items())
        phases.add_row(f"{p['index']}{marker}", p["name"], p["state"], str(p["size"]), devices)
    gates = Table(title=f"gates ({view['phase_name']})", show_header=True)
    for col in ("gate", "value", "threshold", "outcome", "detail"):
        gates.add_column(col)
    for g in view["gates"]:
        gates.add_row(g["name"], _fmt(g["value"]), _fmt(g["threshold"]), g["outcome"], g["detail"])
    parts: list[Any] = [head, phases, gates]
    totals = ", ".join(f"{k}={v}" for k, v in view["counts"].items())
    parts.append(Text(f"devices: {totals}"))
    held = view["counts"].get("held_back", 0)
    if held:
        parts.append(
            Text(
                f"{held} held back: they cannot run this revision and keep serving the old "
                "one (--devices held_back lists them):"
            )
        )
        for r in view.get("held_back_reasons", []):
            parts.append(Text(f"  {r['devices']:>6}  {r['reason']}"))
    for d in view.get("device_list", [])[:200]:
        parts.append(Text(f"  {d['id']}  {d['state']}  phase {d['phase']}  {d['reason']}"))
    history = view.get("history", [])[-8:]
    if history:
        parts.append(Text("recent events:"))
        for h in history:
            parts.append(Text(f"  {h['at']:.0f}  {h['kind']}  {h['actor']}"))
    return Group(*parts)


@app.command("status")
def status(
    rollout_id: IdArg,
    device: Annotated[
        str | None, typer.Option("--device", help="Explain where one device is and why.")
    ] = None,
    devices: Annotated[
        str | None, typer.Option("--devices", help="List devices: 'all' or a state.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Live view until it ends.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", callback=finite_option, help="Watch refresh (s).")
    ] = 1.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each phase, each gate against its threshold, devices by state, and why."""
    if device is not None:
        rollout = path_segment(rollout_id, "rollout id")
        path = f"/api/v1/rollouts/{rollout}/devices/{path_segment(device, '--device')}"
        why = call_api("GET", path, server, token)
        if as_json:
            emit_json(why)
        else:
            typer.echo(f"{why['device']}: {why['state']} in {why['where']}: {why['why']}")
        return
    params = {"devices": devices} if devices else None
    path = f"/api/v1/rollouts/{path_segment(rollout_id, 'rollout id')}"
    view = call_api("GET", path, server, token, params=params)
    if as_json and not watch:
        emit_json(view)
        return
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not watch:
        console.print(_render(view))
        return
    terminal = {"completed", "rolled_back", "aborted", "failed"}
    with Live(_render(view), console=console, refresh_per_second=4) as live:
        while view["state"] not in terminal:
            time.sleep(interval)
            view = call_api("GET", path, server, token, params=params)
            live.update(_render(view))
    if as_json:
        emit_json(view)


def _act(name: str, rollout_id: str, server: str | None, token: str | None, as_json: bool) -> None:
    path = f"/api/v1/rollouts/{path_segment(rollout_id, 'rollout id')}/{name}"
    view = call_api("POST", path, server, token)
    if as_json:
        emit_json(view)
    else:
        reason = f" ({view['reason']})" if view.get("reason") else ""
        typer.echo(f"rollout {view['id']}: {view['state']}{reason}")


@app.command("pause")
def pause_cmd(
    rollout_id: IdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Stop notifying devices until resumed."""
    _act("pause", rollout_id, server, token, as_json)


@app.command("resume")
def resume_cmd(
    rollout_id: IdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Carry on (a breached phase counts as passed: an operator override)."""
    _act("resume", rollout_id, server, token, as_json)


@app.command("approve")
def approve_cmd(
    rollout_id: IdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Let the next phase start."""
    _act("approve", rollout_id, server, token, as_json)


@app.command("abort")
def abort_cmd(
    rollout_id: IdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Stop for good; every device moved goes back to the old revision."""
    _act("abort", rollout_id, server, token, as_json)


@app.command("rollback")
def rollback_cmd(
    rollout_id: IdArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Roll back by hand: every device moved goes back."""
    _act("rollback", rollout_id, server, token, as_json)


@app.command("list")
def list_cmd(
    deployment: Annotated[
        str | None, typer.Option("--deployment", "-d", help="Only this deployment.")
    ] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--ended", help="Only active / ended ones.")
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List rollouts, newest first."""
    params = {"deployment": deployment, "active": active}
    rows = call_api("GET", "/api/v1/rollouts", server, token, params=params)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        if r.get("unreadable"):  # a newer control plane's rollout: what its row says
            typer.echo(
                f"{r['id']}  {r['deployment']}  {r['from_revision']}->{r['to_revision']}  "
                f"{r['state']}  unreadable here: {r['unreadable']}"
            )
            continue
        typer.echo(
            f"{r['id']}  {r['deployment']}  {r['from_revision']}->{r['to_revision']}  "
            f"{r['state']}  {r['phase_name']}  {r['succeeded']}/{r['devices']} ok  "
            f"{r['failed']} failed"
            + (f"  {r['held_back']} held back" if r.get("held_back") else "")
        )


# ------------------------------------------------------- deploy update / history
def _revisions_path(deployment: str) -> str:
    return f"/api/v1/deployments/{path_segment(deployment, 'deployment')}/revisions"


@_deploy.app.command("update")
def deploy_update(
    deployment: Annotated[str, typer.Argument(help="Deployment name or id.")],
    pipelines: _deploy.PipelineOpt = None,
    file: _deploy.FileOpt = None,
    egress: _deploy.EgressOpt = None,
    note: Annotated[str, typer.Option("--note", help="Why this revision.")] = "",
    promote: Annotated[
        bool, typer.Option("--promote", help="Make it stable at once (no rollout).")
    ] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a revision (devices move only through a rollout, or at once with --promote)."""
    spec = _deploy._load(file) if file else {}
    spec.setdefault("name", deployment)
    body_pipelines = _deploy._spec(spec["name"], None, None, pipelines, file)["pipelines"]
    body = {"pipelines": body_pipelines, "note": note, "promote": promote}
    if egress is not None:  # otherwise the file's, else the previous revision's policy
        body["egress"] = _deploy.egress_value(egress)
    elif "egress" in spec:
        body["egress"] = spec["egress"]
    view = call_api("POST", _revisions_path(deployment), server, token, json_body=body)
    if as_json:
        emit_json(view)
        return
    what = "created" if view.get("created") else "unchanged (same content as"
    models = ", ".join(f"{k}={v}" for k, v in view["pipelines"].items())
    suffix = ")" if not view.get("created") else ""
    typer.echo(f"{deployment} revision {view['revision']} {what}{suffix}: {models}"
               + ("  [stable]" if view.get("stable") else ""))  # fmt: skip
    _deploy.warn_incompatible(view, f"revision {view['revision']}")


@_deploy.app.command("history")
def deploy_history(
    deployment: Annotated[str, typer.Argument(help="Deployment name or id.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A deployment's revisions, oldest first; the stable one is marked."""
    data = call_api("GET", _revisions_path(deployment), server, token)
    if as_json:
        emit_json(data)
        return
    for r in data["revisions"]:
        models = ", ".join(f"{k}={v}" for k, v in r["pipelines"].items())
        mark = "*" if r["stable"] else " "
        typer.echo(f"{mark} {r['revision']:>3}  {models}  {r['note']}  ({r['created_by']})")
