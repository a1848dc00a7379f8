"""What the demo shows: step progress and a live fleet table while it runs, a summary after.

`View` owns the rich `Live` display; the story calls `step()` for each chapter and
`note()` for one-line facts, and hands a `snapshot` callable that returns the fleet's
rows (what runs where) for the live table. `summary_table` renders the final figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["View", "summary_table"]

Rows = list[tuple[str, str, str]]


class View:
    """Progress over the story's steps plus a live table of the fleet."""

    def __init__(self, console: Console, steps: int, snapshot: Callable[[], Rows]) -> None:
        self.console = console
        self.snapshot = snapshot
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("edgewise demo", total=steps)
        self.notes: list[str] = []
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
        self.started = time.monotonic()

    def __enter__(self) -> View:
        self.live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.refresh()
        self.live.__exit__(exc_type, exc, tb)
        self.console.print()  # what follows (a table, an error) starts on its own line

    def step(self, description: str) -> None:
        """Start a new chapter (the previous one counts as done)."""
        if self.notes:
            self.progress.advance(self.task)
        self.progress.update(self.task, description=description)
        self.note(f"[bold cyan]{description}[/]")

    def finish(self) -> None:
        """Mark the last chapter done."""
        self.progress.update(self.task, completed=self.progress.tasks[0].total, description="done")
        self.refresh()

    def note(self, text: str) -> None:
        """Add one line to the running log under the progress bar."""
        at = time.monotonic() - self.started
        self.notes.append(f"[dim]{at:6.1f}s[/] {text}")
        self.refresh()

    def refresh(self) -> None:
        """Redraw now."""
        self.live.update(self._render())

    def _render(self) -> RenderableType:
        table = Table(title="fleet now", expand=False)
        table.add_column("device(s)")
        table.add_column("model")
        table.add_column("state", overflow="fold")
        try:
            rows = self.snapshot()
        except Exception:  # a half-built fleet has nothing to show yet
            rows = []
        for row in rows:
            table.add_row(*row)
        return Group(*self.notes[-14:], self.progress, table)


def summary_table(summary: dict[str, Any]) -> Table:
    """The closing table: each chapter, whether it held, and its figures."""
    table = Table(title="edgewise demo: what happened", show_lines=True)
    table.add_column("chapter")
    table.add_column("ok", justify="center")
    table.add_column("figures", overflow="fold")
    for row in summary["chapters"]:
        mark = "[green]yes[/]" if row["ok"] else "[red]NO[/]"
        table.add_row(row["chapter"], mark, row["figures"])
    return table
