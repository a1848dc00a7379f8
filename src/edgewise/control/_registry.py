"""The model registry: verified pushes, immutable versions, content-addressed artifacts.

A push streams the upload to a temporary file under the data directory while hashing it,
verifies it completely against the trusted publisher keys (`edgewise.bundle.verify`), then
links it into `artifacts/<sha256>`. A version is immutable: the same bytes pushed again
are a no-op, other bytes under a registered version are a 409.

A stored artifact is checked against its digest before it is first served (and again
whenever the file changes): a copy damaged on the control plane's disk is answered 503
`artifact_damaged`, saying to push the bundle again, instead of being sent to every
device to fail their digest check every 30 s with nobody told; pushing the same bundle
again replaces a damaged copy.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edgewise.control._plane import ApiError, ControlPlane, Principal
from edgewise.control._store import ConflictError

__all__ = [
    "ArtifactCache",
    "ArtifactDamaged",
    "artifact_path",
    "file_sha256",
    "model_view",
    "receive_upload",
    "register_bundle",
    "set_yanked",
]


class ArtifactDamaged(Exception):
    """A stored artifact whose bytes no longer match its digest."""


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def artifact_path(plane: ControlPlane, sha256: str) -> Path:
    """Where the artifact with this digest lives (it may not exist)."""
    return plane.settings.artifacts_dir / sha256[:2] / sha256


class ArtifactCache:
    """The bytes of small artifacts, kept in memory (least recently used go first).

    A rollout wave downloads one artifact thousands of times within seconds; read from
    disk in chunks on worker threads, each download took a few thread hops and queued
    behind the other device requests. Artifacts are content-addressed and never change,
    so their bytes can be kept as long as memory allows: files up to `max_file` bytes,
    `budget` bytes in all. Thread-safe.
    """

    def __init__(self, max_file: int = 8 << 20, budget: int = 64 << 20) -> None:
        self.max_file = max_file
        self.budget = budget
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        # Files found intact, by (digest, size, mtime): checked again once changed.
        self._intact: set[tuple[str, int, int]] = set()
        #: Digests whose stored copy was found damaged (until found intact again).
        self.damaged: set[str] = set()

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes of this artifact, or None."""
        with self._lock:
            data = self._items.get(sha256)
            if data is not None:
                self._items.move_to_end(sha256)
            return data

    def check(self, path: Path, sha256: str) -> None:
        """Make sure the file at `path` holds the artifact (hashed once per version of it).

        Raises:
            ArtifactDamaged: its bytes do not match `sha256`.
            FileNotFoundError: it is gone.
        """
        st = path.stat()
        key = (sha256, st.st_size, st.st_mtime_ns)
        if key in self._intact:
            return
        if file_sha256(path) != sha256:
            self._found(sha256, intact=False)
            raise ArtifactDamaged(sha256)
        with self._lock:
            self._intact.add(key)
        self._found(sha256, intact=True)

    def _found(self, sha256: str, intact: bool) -> None:
        with self._lock:
            if intact:
                self.damaged.discard(sha256)
            else:
                self.damaged.add(sha256)

    def load(self, path: Path, sha256: str) -> bytes | None:
        """Read the artifact at `path` into the cache (None when it is too large).

        Raises:
            ArtifactDamaged: its bytes do not match `sha256` (nothing is cached).
        """
        with path.open("rb") as fh:
            data = fh.read(self.max_file + 1)
        if len(data) > self.max_file:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            self._found(sha256, intact=False)
            raise ArtifactDamaged(sha256)
        self._found(sha256, intact=True)
        with self._lock:
            if sha256 not in self._items:
                self._items[sha256] = data
                self._size += len(data)
            while self._size > self.budget and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)
        return data


async def receive_upload(
    plane: ControlPlane, chunks: AsyncIterator[bytes]
) -> tuple[Path, str, int]:
    """Write an upload to a temporary file; returns (path, sha256, size).

    Raises:
        ApiError: 413 when larger than the upload limit, 400 when empty.
    """
    tmp_dir = plane.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"upload-{secrets.token_hex(8)}.ewb"
    h = hashlib.sha256()
    size = 0
    limit = plane.settings.max_upload_bytes
    try:
        with open(path, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"bundle larger than {limit} bytes")
                h.update(chunk)
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise ApiError(400, "empty", "empty upload")
    return path, h.hexdigest(), size


def register_bundle(
    plane: ControlPlane, path: Path, sha256: str, size: int, who: Principal
) -> tuple[dict[str, Any], bool]:
    """Verify an uploaded bundle and register it; returns (model view, created).

    Raises:
        ApiError: 400 for a bundle that fails verification (reason in the message),
            409 for a version that exists with other content.
    """
    from edgewise import bundle as ewb

    try:
        trust = {
            kid: ewb.public_key_from_b64(b64) for kid, b64 in plane.store.publisher_keys().items()
        }
        try:
            try:
                checked = ewb.verify(path, trust, threshold=1)
                signers = list(checked.signers)
            except ewb.SignatureError as exc:
                if exc.reason != "unsigned" or not plane.settings.allow_unsigned_models:
                    raise
                checked, signers = _verify_unsigned(path), []
        except ewb.BundleError as exc:
            plane.audit(
                who.actor, "model.push", f"artifact:{sha256}", sha256, f"refused: {exc.reason}"
            )
            raise ApiError(400, f"bundle_{exc.reason}", f"bundle refused: {exc}") from None
        manifest = checked.manifest.model_dump(mode="json")
        name, version = str(manifest["name"]), str(manifest["version"])
        if len(name) > 200 or len(version) > 64:
            raise ApiError(400, "bundle_schema", "model name or version too long")
        target = artifact_path(plane, sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or file_sha256(target) != sha256:
            os.replace(path, target)  # new, or replacing a copy damaged on disk
        row = {
            "name": name,
            "version": version,
            "sha256": sha256,
            "size": size,
            "manifest": manifest,
            "signers": signers,
            "yanked": False,
            "pushed_at": plane.clock(),
            "pushed_by": who.actor,
        }
        try:
            outcome = plane.store.insert_model(row)
        except ConflictError as exc:
            plane.audit(
                who.actor, "model.push", f"model:{name}@{version}", sha256, "refused: conflict"
            )
            raise ApiError(409, "conflict", str(exc)) from None
    finally:
        path.unlink(missing_ok=True)
    created = outcome == "created"
    plane.audit(who.actor, "model.push", f"model:{name}@{version}", sha256, outcome)
    stored = plane.store.get_model(name, version)
    assert stored is not None
    return model_view(stored), created


def _verify_unsigned(path: Path) -> Any:
    """Check layout, schema and file hashes of an unsigned bundle (policy allows it).

    `bundle.verify` insists on a trusted signature, so a copy is signed with a throwaway
    key that is then the only trusted one: every other check runs unchanged.
    """
    import shutil

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgewise import bundle as ewb

    copy = path.with_suffix(".unsigned-check.ewb")
    shutil.copyfile(path, copy)
    try:
        key = Ed25519PrivateKey.generate()
        ewb.sign(copy, key)
        return ewb.verify(copy, [key.public_key()], threshold=1)
    finally:
        copy.unlink(missing_ok=True)


def model_view(row: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    """The operator-facing shape of a model version."""
    view = {
        "name": row["name"],
        "version": row["version"],
        "ref": f"{row['name']}@{row['version']}",
        "sha256": row["sha256"],
        "size": row["size"],
        "signers": row["signers"],
        "yanked": row["yanked"],
        "pushed_at": row["pushed_at"],
        "pushed_by": row["pushed_by"],
        "url": f"/device/v1/artifacts/{row['sha256']}",
    }
    if detail:
        view["manifest"] = row["manifest"]
    return view


def set_yanked(
    plane: ControlPlane, name: str, version: str, yanked: bool, who: Principal
) -> dict[str, Any]:
    """Yank (or unyank) a version: nothing new may pin or roll it out; devices keep it."""
    if not plane.store.set_yanked(name, version, yanked):
        raise ApiError(404, "not_found", f"no model {name}@{version}")
    action = "model.yank" if yanked else "model.unyank"
    plane.audit(who.actor, action, f"model:{name}@{version}", "", "ok")
    row = plane.store.get_model(name, version)
    assert row is not None
    return model_view(row)
