"""`edgewise rollout ...`."""

from __future__ import annotations

import typer

app = typer.Typer(help="rollout commands.", no_args_is_help=True)
