"""`edgewise model push|list|show|yank`: the control plane's model registry.

Registered onto the `model` Typer app defined in `_model` (pack/sign/verify/inspect).
"""

from __future__ import annotations

from edgewise.cli._model import app

__all__ = ["app"]
