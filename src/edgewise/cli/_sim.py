r"""`edgewise sim`: run a simulated fleet against a control plane.

Example::

    edgewise sim --server http://127.0.0.1:8080 --token $ADMIN --devices 1000 --seed 7 \\
        --labels "hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2" \\
        --flaky 0.02 --crash-during-install 0.01 --duration 300
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edgewise.cli._common import (
    DAY_S,
    CliError,
    emit_json,
    finite_option,
    resolve_server,
    resolve_token,
)

__all__ = ["sim"]

# Bounds of the numeric options: past them a value is a typo, not a setting (clock
# arithmetic overflows near 1e300; waits under a second poll in a tight loop).
MAX_DEVICES = 100_000  # ten times the scale the simulator is built and measured for
MAX_DURATION_S = 365 * DAY_S
MAX_TIME_SCALE = 1000.0


def _refs(param: typer.CallbackParam, refs: list[str] | None) -> list[str] | None:
    """Typer callback: each `--regressed` is NAME@VERSION with a semantic VERSION."""
    import re

    from edgewise.bundle._manifest import NAME_PATTERN, SEMVER_RE

    for ref in refs or ():
        name, sep, version = ref.rpartition("@")
        if not sep or not re.match(NAME_PATTERN, name):
            raise CliError(f"--regressed {ref!r} is not NAME@VERSION (e.g. digits-mlp@2.0.0)")
        if not SEMVER_RE.match(version):
            raise CliError(f"--regressed {ref!r}: {version!r} is not a version (e.g. 2.0.0)")
    return refs


def sim(
    server: Annotated[str | None, typer.Option("--server", help="Control-plane URL.")] = None,
    devices: Annotated[
        int, typer.Option("--devices", "-n", min=1, max=MAX_DEVICES, help="Devices.")
    ] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed: same seed, same fleet.")] = 0,
    enroll_token: Annotated[
        str | None, typer.Option("--enroll-token", help="Enrollment token (>= N uses).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Operator token used to mint an enrollment token."),
    ] = None,
    labels: Annotated[
        str, typer.Option("--labels", help='e.g. "hw=cpu-small:0.5,cpu-large:0.5;site=lab,s1"')
    ] = "",
    offline_fraction: Annotated[
        float,
        typer.Option(
            "--offline-fraction",
            callback=finite_option,
            min=0.0,
            max=1.0,
            help="Devices that go dark.",
        ),
    ] = 0.0,
    flaky: Annotated[
        float,
        typer.Option(
            "--flaky", callback=finite_option, min=0.0, max=0.99, help="P(request fails)."
        ),
    ] = 0.0,
    slow_download: Annotated[
        float,
        typer.Option(
            "--slow-download", callback=finite_option, min=0.0, max=1.0, help="P(download is slow)."
        ),
    ] = 0.0,
    cut_download: Annotated[
        float,
        typer.Option(
            "--cut-download", callback=finite_option, min=0.0, max=1.0, help="P(download is cut)."
        ),
    ] = 0.0,
    crash_during_install: Annotated[
        float,
        typer.Option(
            "--crash-during-install",
            callback=finite_option,
            min=0.0,
            max=1.0,
            help="P(install crashes).",
        ),
    ] = 0.0,
    clock_skew_s: Annotated[
        float,
        typer.Option(
            "--clock-skew-s",
            callback=finite_option,
            min=0.0,
            max=DAY_S,
            help="Device clocks off by up to S.",
        ),
    ] = 0.0,
    old_agents: Annotated[
        float,
        typer.Option(
            "--old-agents",
            callback=finite_option,
            min=0.0,
            max=1.0,
            help="Devices on an older agent (it does not know batching.overflow).",
        ),
    ] = 0.0,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            callback=finite_option,
            min=0.0,
            max=MAX_DURATION_S,
            help="Seconds to run (0: until Ctrl-C).",
        ),
    ] = 0.0,
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale",
            callback=finite_option,
            min=0.0001,
            max=MAX_TIME_SCALE,
            help="Real seconds per simulated second.",
        ),
    ] = 1.0,
    window_s: Annotated[
        float | None,
        typer.Option(
            "--window-s",
            callback=finite_option,
            min=1.0,
            max=DAY_S,
            help="Telemetry window (simulated s).",
        ),
    ] = None,
    poll_wait_s: Annotated[
        float | None,
        typer.Option(
            "--poll-wait-s",
            callback=finite_option,
            # The wait goes out in whole seconds: under 1 it is 0, and devices poll flat out.
            min=1.0,
            max=DAY_S,
            help="Long-poll wait (s).",
        ),
    ] = None,
    regressed: Annotated[
        list[str] | None,
        typer.Option("--regressed", callback=_refs, help="A regressed NAME@VERSION (repeatable)."),
    ] = None,
    accuracy_floor: Annotated[
        float,
        typer.Option(
            "--accuracy-floor",
            callback=finite_option,
            min=0.0,
            max=1.0,
            help="Provenance accuracy below this is regressed.",
        ),
    ] = 0.8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run N simulated devices (one process) that speak the real device protocol."""
    from edgewise.sim import BehaviourBook, Faults, Fleet, run

    admin = None if enroll_token else resolve_token(token)
    try:
        faults = Faults(
            offline_fraction=offline_fraction,
            flaky=flaky,
            slow_download=slow_download,
            cut_download=cut_download,
            crash_during_install=crash_during_install,
            clock_skew_s=clock_skew_s,
            old_agents=old_agents,
        )
        book = BehaviourBook(accuracy_floor=accuracy_floor)
        if regressed:
            book = book.with_regressed(*regressed)
        fleet = Fleet(
            resolve_server(server),
            devices,
            seed,
            labels=labels,
            enroll_token=enroll_token,
            admin_token=admin,
            faults=faults,
            behaviours=book,
            time_scale=time_scale,
            window_s=window_s,
            poll_wait_s=poll_wait_s,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        summary = run(_run(fleet, duration, quiet=as_json))
    except KeyboardInterrupt:
        summary = fleet.summary()
    if as_json:
        emit_json(summary)
    else:
        _print_summary(summary)


async def _run(fleet: Any, duration: float, quiet: bool) -> dict[str, Any]:
    import asyncio
    import time

    import httpx

    from edgewise.agent import GiveUp, UplinkError

    try:
        await fleet.start()
    except (httpx.HTTPError, UplinkError, GiveUp, RuntimeError) as exc:
        await fleet.stop()
        raise CliError(f"cannot start the fleet: {exc}") from None
    if not quiet:
        typer.echo(f"{len(fleet.devices)} devices enrolled", err=True)
    deadline = time.monotonic() + duration if duration > 0 else None
    try:
        while deadline is None or time.monotonic() < deadline:
            step = 5.0 if deadline is None else min(5.0, max(0.0, deadline - time.monotonic()))
            await fleet.run_for(step)
            if not quiet:
                s = fleet.summary()
                running = ", ".join(f"{k}={v}" for k, v in s["running"].items()) or "nothing"
                typer.echo(f"[{s['elapsed_s']:.0f}s] running: {running}", err=True)
    except asyncio.CancelledError:
        pass
    finally:
        summary: dict[str, Any] = fleet.summary()
        await fleet.stop()
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="simulated fleet", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)
