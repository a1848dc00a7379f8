"""`edgewise demo`: the whole story on one machine."""

from __future__ import annotations

from edgewise.cli._common import CliError


def demo() -> None:
    """Run the demo."""
    raise CliError("the demo is not built yet")
