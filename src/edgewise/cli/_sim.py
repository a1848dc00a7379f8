"""`edgewise sim`: a simulated fleet."""

from __future__ import annotations

from edgewise.cli._common import CliError


def sim() -> None:
    """Run a simulated fleet against a control plane."""
    raise CliError("the fleet simulator is not built yet")
