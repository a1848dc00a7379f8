"""Keep the agent process small: skip imports it never uses (imported first, for effect).

`import httpx` also imports its command-line client (`httpx._main`), and with it click,
rich and pygments: about 5 MB of RSS on a device whose budget is 60 MB, for a program
the agent never runs. A `None` entry in `sys.modules` makes that import fail, and httpx
then falls back to its stub `main` (what it does when its CLI extras are missing).
Nothing changes for a process that imported httpx's CLI before the agent.
"""

from __future__ import annotations

import sys

__all__: list[str] = []

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
