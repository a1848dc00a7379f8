"""`edgewise demo`: the whole edgewise story on one machine, with real processes.

Usage::

    from edgewise.demo import run_demo
    summary = run_demo(Path("/tmp/ew-demo"), devices=20, console=None)
    assert summary["canary_caught"] and summary["rollback_done"]

Modules: `_procs` (child processes in their own process groups, killed at exit),
`_proxy` (the uplink the demo cuts), `_api` (operator client), `_stack` (control plane
and agent processes), `_rollout` (INTERIM rollout driver until the rollout API lands),
`_view` (rich progress and tables), `_story` (the chapters).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgewise.demo._api import DemoError
from edgewise.demo._procs import Processes, free_port
from edgewise.demo._proxy import UplinkProxy
from edgewise.demo._story import CHAPTERS, Story

__all__ = [
    "CHAPTERS",
    "DemoError",
    "Interrupted",
    "Processes",
    "Story",
    "UplinkProxy",
    "free_port",
    "run_demo",
]


class Interrupted(DemoError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the story before its end (everything was shut down)."""


def run_demo(
    directory: Path,
    devices: int = 200,
    port: int = 0,
    keep_running: bool = False,
    console: Any = None,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the story under `directory` (must be empty or absent); returns the summary.

    Args:
        directory: where everything goes (control plane data, agents, bundles, logs).
        devices: simulated devices beside the three real agents.
        port: the control plane's port (0: a free one).
        keep_running: after the story, keep everything up until Ctrl-C / SIGTERM.
        console: a rich Console for progress; None shows nothing.
        on_summary: called with the summary as soon as the story ends (before the
            `keep_running` wait, so the user sees the URL and token while it runs).

    Raises:
        DemoError: a chapter could not be carried out.
        Interrupted: a signal stopped the story before its end.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise DemoError(f"{directory} is not empty: the demo needs a fresh directory")
    return asyncio.run(_main(directory, devices, port, keep_running, console, on_summary))


async def _main(
    directory: Path,
    devices: int,
    port: int,
    keep_running: bool,
    console: Any,
    on_summary: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from edgewise.demo._view import View, summary_table

    # Every stop signal cancels the story, so its `finally` shuts every process down
    # (also when the shell started us with SIGINT ignored, as `cmd &` does).
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, main.cancel)
    story = Story(directory, devices, port, None)
    summary: dict[str, Any] | None = None
    try:
        if console is not None:
            with View(console, CHAPTERS, story.snapshot) as view:
                story.view = view
                summary = await story.run()
                view.finish()
            story.view = None
            console.print(summary_table(summary))
        else:
            summary = await story.run()
        if on_summary is not None:
            on_summary(summary)
        if keep_running:
            if console is not None:
                console.print("everything keeps running; Ctrl-C (or SIGTERM) stops it all")
            try:
                while True:
                    await story.fleet.run_for(3600)
            except asyncio.CancelledError:
                summary["stopped_by_user"] = True
        return summary
    except asyncio.CancelledError:
        raise Interrupted("interrupted; every process was stopped") from None
    finally:
        await story.close()
