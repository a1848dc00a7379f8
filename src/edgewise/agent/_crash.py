"""Crash points for crash-safety tests: `EDGEWISE_CRASH_AT=<name>` SIGKILLs the process there.

The install path calls `crashpoint(name)` at each step. With the variable unset the call
is one dictionary lookup done once at import, so production pays nothing. A test sets the
variable, starts the real agent, lets it die at that instant, restarts it without the
variable and checks what it serves.

`EDGEWISE_CRASH_AT=name@N` kills at the N-th hit (1-based) instead of the first.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_POINTS", "crashpoint"]

#: Every point the install path announces, in the order an install passes them.
CRASH_POINTS: tuple[str, ...] = (
    "during_download",
    "after_download",
    "mid_write",
    "after_write",
    "during_health_check",
    "after_switch",
    "after_commit",
)

_TARGET, _, _NTH = os.environ.get("EDGEWISE_CRASH_AT", "").partition("@")
_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """Kill this process with SIGKILL if `EDGEWISE_CRASH_AT` names this point."""
    if not _TARGET or name != _TARGET:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
