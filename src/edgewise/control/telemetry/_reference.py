"""The drift baseline of a registered model, read from its manifest's `reference`.

The agent has the same reading in `edgewise.agent.telemetry.reference_from_manifest`;
control may not import agent, and the function belongs in `edgewise.drift` once its
owner takes it (`DriftReference.from_manifest`), at which point both sides call that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgewise.drift import DriftReference

__all__ = ["reference_of"]

_DEFAULT_SAMPLES = 1000  # as on the device: the manifest does not say


def reference_of(manifest: Mapping[str, Any]) -> DriftReference | None:
    """The model's `DriftReference`, or None when the manifest has no usable reference."""
    ref = manifest.get("reference")
    if not isinstance(ref, Mapping):
        return None
    features = ref.get("features") or []
    confidence = ref.get("confidence")
    prior = ref.get("class_prior") or []
    if not features or not isinstance(confidence, Mapping) or not prior:
        return None
    try:
        return DriftReference.build(
            [f.get("bin_edges", f.get("edges")) for f in features],
            [f.get("frequencies", f.get("freqs")) for f in features],
            confidence.get("bin_edges", confidence.get("edges")),
            confidence.get("frequencies", confidence.get("freqs")),
            prior,
            int(ref.get("samples") or _DEFAULT_SAMPLES),
        )
    except (AttributeError, TypeError, ValueError):
        return None
