"""`edgewise agent`: the device agent."""

from __future__ import annotations

from edgewise.cli._common import CliError


def agent() -> None:
    """Run the device agent."""
    raise CliError("the agent is not built yet")
