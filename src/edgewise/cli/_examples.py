"""`edgewise examples ...`."""

from __future__ import annotations

import typer

app = typer.Typer(help="examples commands.", no_args_is_help=True)
