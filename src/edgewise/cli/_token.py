"""`edgewise token ...`."""

from __future__ import annotations

import typer

app = typer.Typer(help="token commands.", no_args_is_help=True)
