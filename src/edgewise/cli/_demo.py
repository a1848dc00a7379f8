"""`edgewise demo`: the whole story on one machine (the orchestration is `edgewise.demo`).

A control plane, three real agents and a simulated fleet under a fresh directory;
deploy, a regressed canary that rolls back, an int8 rollout that completes through a
SIGKILL, an uplink cut with backfill; then a summary table (or `--json`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import CliError, emit_json

__all__ = ["demo"]


def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Fresh directory for everything (default: a new temp dir)."),
    ] = None,
    devices: Annotated[
        int, typer.Option("--devices", min=1, max=20000, help="Simulated devices.")
    ] = 200,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave everything up until Ctrl-C.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON (progress on stderr).")
    ] = False,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Control-plane port (0: any free).")
    ] = 0,
) -> None:
    """Run the whole edgewise story: rollouts, a canary that catches, a crash, an outage."""
    from rich.console import Console

    from edgewise.demo import DemoError, Interrupted, run_demo

    where = directory or Path(tempfile.mkdtemp(prefix="edgewise-demo-"))
    console = Console(stderr=as_json, width=max(Console().width, 110))
    console.print(f"edgewise demo under {where}")

    def show(summary: dict[str, Any]) -> None:
        if as_json:
            emit_json(summary)
            return
        console.print(f"console: {summary['console_url']}")
        console.print(f"admin token: {summary['admin_token']}")
        console.print(f"everything is under {where} (logs in {where / 'logs'})")

    try:
        summary = run_demo(where, devices, port, keep_running, console, show)
    except Interrupted as exc:
        raise CliError(str(exc), exit_code=130) from None
    except DemoError as exc:
        raise CliError(f"{exc} (logs under {where / 'logs'})") from None
    if summary.get("stopped_by_user"):
        console.print("stopped; every process was shut down")
    held = all(
        summary[k]
        for k in (
            "canary_caught", "rollback_done", "int8_completed",
            "crash_recovered", "offline_served", "backfilled",
        )
    )  # fmt: skip
    if not held:
        raise CliError("the story did not hold: see the summary above")
