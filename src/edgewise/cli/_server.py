"""`edgewise server`: the control plane."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run and administer the control plane.")
