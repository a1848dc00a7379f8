"""The drift baseline of a registered model, read from its manifest's `reference`.

The reading itself is `edgewise.drift.DriftReference.from_manifest`, which the agent
uses too; here a malformed reference means "no baseline", never an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgewise.drift import DriftReference

__all__ = ["reference_of"]


def reference_of(manifest: Mapping[str, Any]) -> DriftReference | None:
    """The model's `DriftReference`, or None when the manifest has no usable reference."""
    ref = manifest.get("reference")
    if not isinstance(ref, Mapping):
        return None
    try:
        return DriftReference.from_manifest(ref)
    except ValueError:
        return None
