"""What the simulator learns from a downloaded bundle, verified once per digest per process.

Every simulated device downloads the whole artifact and checks its sha256 (the bytes and
the digest are what the wire contract promises). Verifying the bundle itself (publisher
signatures, file hashes) and reading its provenance is the same work for every device
that downloads the same digest, so it is done once per `ArtifactBook` (one per fleet)
with `edgewise.bundle.verify` against the publisher keys of the device's trust root.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ArtifactBook", "ArtifactInfo"]


@dataclass(frozen=True)
class ArtifactInfo:
    """The verdict on one bundle.

    Attributes:
        ref: `name@version` from its manifest (None when it could not be read).
        accuracy: `provenance.metrics.accuracy`, if stated.
        error: why a device would refuse it (None: it verifies).
    """

    ref: str | None
    accuracy: float | None
    error: str | None = None


class ArtifactBook:
    """Digest -> `ArtifactInfo`, filled by the first device that downloads a digest."""

    def __init__(self) -> None:
        self._known: dict[str, ArtifactInfo] = {}
        self._lock = threading.Lock()

    def info(self, sha256: str, data: bytes, publishers: Mapping[str, str]) -> ArtifactInfo:
        """The verdict on a downloaded bundle (its bytes already match `sha256`)."""
        with self._lock:
            known = self._known.get(sha256)
        if known is not None:
            return known
        verdict = _verify(data, publishers)
        with self._lock:
            self._known.setdefault(sha256, verdict)
            return self._known[sha256]

    def __len__(self) -> int:
        return len(self._known)


def _verify(data: bytes, publishers: Mapping[str, str]) -> ArtifactInfo:
    from edgewise.bundle import BundleError, public_key_from_b64, trust_set, verify

    try:
        trust = trust_set([public_key_from_b64(v) for v in publishers.values()])
    except (BundleError, ValueError) as exc:
        return ArtifactInfo(None, None, f"bad trust root: {exc}")
    with tempfile.TemporaryDirectory(prefix="edgewise-sim-") as tmp:
        path = Path(tmp) / "artifact.ewb"
        path.write_bytes(data)
        try:
            checked = verify(path, trust)
        except BundleError as exc:
            return ArtifactInfo(None, None, exc.reason)
    manifest = checked.manifest
    return ArtifactInfo(manifest.ref, manifest.provenance.metrics.get("accuracy"))
