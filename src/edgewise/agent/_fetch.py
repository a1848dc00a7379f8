"""The artifact fetcher: a content-addressed cache that resumes cut downloads.

Bundles are cached under their sha256. A download writes `<sha256>.part`; after a cut
(connection reset, agent killed, machine off) the next attempt asks for
`Range: bytes=<part size>-` and appends, so a device on a bad link never starts over.
The fetcher never reads more than the declared size, checks the sha256 before the file
takes its final name, and refuses an install that would not fit on disk before the first
byte is fetched.

The device's own storage failing is not the network failing: a full disk mid-download
raises `InsufficientDisk` and gives the partial file's space back, a read-only or broken
disk raises `StorageError`; neither is retried like a cut connection (`OSError` is, for
the uplink's sake, in `Backoff.recoverable`). A `.part` that is not a plain file of ours
(a symlink, a directory) is removed, never appended through.

A download may be given a `deadline` (monotonic): past it, the bytes so far are synced
and `DownloadPaused` is raised, so a bundle arriving over a slow or dripping link is
fetched in slices between which the agent polls and reports; the next call resumes.

Example:
    >>> import tempfile, pathlib
    >>> cache = ArtifactCache(pathlib.Path(tempfile.mkdtemp()))
    >>> cache.has("0" * 64)
    False
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from edgewise.agent._backoff import RetryableError
from edgewise.agent._crash import crashpoint
from edgewise.agent._durable import fsync_dir, out_of_space, remove_tree, replace_file

__all__ = [
    "ArtifactCache",
    "ArtifactSource",
    "DownloadPaused",
    "FetchError",
    "FetchResult",
    "HttpArtifactSource",
    "InsufficientDisk",
    "StorageError",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes \*/([0-9]+)$")
_DIGITS = re.compile(r"^[0-9]+$")
_SYNC_EVERY = 4 * 1024 * 1024
_PIECE = 4096  # write granularity: a crash test can stop mid-file even on small bundles
# Room an install needs beyond the download: the bundle is extracted into a slot.
INSTALL_FACTOR = 2.0


class FetchError(Exception):
    """A download that cannot succeed by retrying the same request; `reason` is for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InsufficientDisk(FetchError):
    """The bundle and its extracted copy would not fit in the free space."""


class StorageError(FetchError):
    """The device's storage refused a read or write (read-only, I/O error)."""


class DownloadPaused(Exception):
    """A download that reached its deadline; what arrived is kept, the next call resumes.

    Not a `RetryableError`: nothing failed, so no backoff retries it in place.
    """

    def __init__(self, done: int, size: int) -> None:
        super().__init__(f"paused at {done}/{size} bytes; resumes at the next round")
        self.done, self.size = done, size


def storage_failure(exc: OSError, doing: str) -> FetchError:
    """The `FetchError` for a local file error: `InsufficientDisk` when out of space."""
    why = exc.strerror or str(exc)
    if out_of_space(exc):
        return InsufficientDisk(f"insufficient disk: {why} while {doing}")
    return StorageError(f"storage error: {why} while {doing}")


@dataclass(frozen=True)
class FetchResult:
    """Where the verified bundle is, and what this call transferred."""

    path: Path
    bytes_fetched: int
    resumed_from: int


class ArtifactSource(Protocol):
    """Opens a (ranged) GET on an artifact URL; the response body is streamed."""

    def open(self, url: str, start: int) -> AbstractContextManager[httpx.Response]:
        """Open `url` from byte `start` (`Range: bytes=start-` when start > 0)."""
        ...


class HttpArtifactSource:
    """An `ArtifactSource` over an httpx client; `sign(method, path_qs)` adds headers."""

    def __init__(
        self,
        client: httpx.Client,
        sign: Callable[[str, str], dict[str, str]] | None = None,
    ) -> None:
        self._client = client
        self._sign = sign

    @contextmanager
    def open(self, url: str, start: int) -> Iterator[httpx.Response]:
        """Stream a GET of `url` from `start`."""
        headers = dict(self._sign("GET", url) if self._sign else {})
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                yield response
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise RetryableError(f"artifact download interrupted: {exc}") from exc


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    """Verified bundles by sha256 under `root`, plus resumable partial downloads."""

    def __init__(
        self,
        root: Path,
        free_bytes: Callable[[Path], int] = _disk_free,
        reserve_bytes: int = 0,
    ) -> None:
        self.root = root
        self.free_bytes = free_bytes
        self.reserve_bytes = reserve_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where a verified bundle lives."""
        if not _SHA256.match(sha256):
            raise FetchError(f"bad artifact digest {sha256!r}")
        return self.root / f"{sha256}.ewb"

    def _part(self, sha256: str) -> Path:
        return self.root / f"{sha256}.part"

    def has(self, sha256: str) -> bool:
        """Whether a verified copy is cached (its digest is re-checked).

        Raises:
            StorageError: the copy cannot be read.
        """
        path = self.path(sha256)
        try:
            if not os.path.lexists(path):
                return False
            if not _plain_file(path):
                remove_tree(path, sync=False)  # a link or a directory is not a cached copy
                return False
            if sha256_of(path) != sha256:
                path.unlink(missing_ok=True)
                return False
        except OSError as exc:
            raise storage_failure(exc, "reading the artifact cache") from exc
        return True

    def partial_size(self, sha256: str) -> int:
        """Bytes already downloaded of an unfinished artifact (0 unless a plain file)."""
        try:
            st = self._part(sha256).lstat()
        except OSError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def discard_partial(self, sha256: str) -> None:
        """Give back the space of an unfinished download (it cannot complete for now)."""
        with contextlib.suppress(OSError):
            remove_tree(self._part(sha256), sync=False)

    def preflight(self, size: int, already: int = 0, reclaim: int = 0) -> None:
        """Refuse a download that, with its extraction, would not fit.

        Args:
            size: the artifact's size.
            already: bytes of it already downloaded.
            reclaim: bytes the install frees before extracting (the inactive slot it
                replaces); the download itself must fit without them.

        Raises:
            InsufficientDisk: with the numbers in the reason.
        """
        download = size - already
        need = download + int(size * INSTALL_FACTOR) + self.reserve_bytes
        free = self.free_bytes(self.root)
        if free < download + self.reserve_bytes or free + reclaim < need:
            also = f" (and {reclaim / 1e6:.1f} MB to reuse)" if reclaim else ""
            raise InsufficientDisk(
                f"insufficient disk: need {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free{also}"
            )

    def prune_one(self, sha256: str) -> None:
        """Forget one cached bundle (it was refused: fetch it afresh next time)."""
        self.path(sha256).unlink(missing_ok=True)

    def prune(self, keep: set[str]) -> None:
        """Delete cached bundles (not partial downloads) whose digest is not in `keep`."""
        for path in self.root.glob("*.ewb"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def prune_partial(self, wanted: set[str]) -> None:
        """Delete partial downloads whose digest is not in `wanted`.

        A download cut short and then no longer wanted (the desired state moved on) would
        otherwise hold its space for good, and on a small disk keep the next install from
        fitting.
        """
        for path in self.root.glob("*.part"):
            if path.stem not in wanted:
                with contextlib.suppress(OSError):
                    remove_tree(path, sync=False)

    def fetch(
        self,
        source: ArtifactSource,
        url: str,
        sha256: str,
        size: int,
        progress: Callable[[int, int], None] | None = None,
        reclaim: int = 0,
        deadline: float | None = None,
    ) -> FetchResult:
        """Fetch one artifact into the cache (or find it there).

        `reclaim` is as for `preflight`; `deadline` (monotonic) ends this call's share.

        Raises:
            InsufficientDisk: before any byte is fetched.
            FetchError: the server refuses it or the bytes do not match the digest.
            RetryableError: the transfer was cut; call again to resume.
            DownloadPaused: `deadline` passed first; call again to resume.
        """
        final = self.path(sha256)
        if self.has(sha256):
            return FetchResult(final, 0, size)
        part = self._part(sha256)
        offset = self.partial_size(sha256)
        try:
            if offset > size or (offset == 0 and (part.exists() or part.is_symlink())):
                remove_tree(part, sync=False)  # too long, or not a plain file of ours
                offset = 0
            self.preflight(size, offset, reclaim)
        except InsufficientDisk:
            self.discard_partial(sha256)
            raise
        except OSError as exc:
            raise storage_failure(exc, "preparing the download") from exc
        start = offset
        fetched = 0
        if offset < size:
            fetched, start = self._transfer(source, url, sha256, offset, size, progress, deadline)
        crashpoint("after_download")
        try:
            if sha256_of(part) != sha256:
                part.unlink(missing_ok=True)
                raise FetchError("digest mismatch: downloaded bytes do not match the sha256")
            replace_file(part, final)
            fsync_dir(self.root)
        except OSError as exc:
            raise self._failed(exc, sha256, "storing the download") from exc
        return FetchResult(final, fetched, start)

    def _failed(self, exc: OSError, sha256: str, doing: str) -> FetchError:
        if out_of_space(exc):
            self.discard_partial(sha256)
        return storage_failure(exc, doing)

    def _transfer(
        self,
        source: ArtifactSource,
        url: str,
        sha256: str,
        offset: int,
        size: int,
        progress: Callable[[int, int], None] | None,
        deadline: float | None = None,
    ) -> tuple[int, int]:
        part = self._part(sha256)
        fetched = 0
        with source.open(url, offset) as resp:
            wrong = _wrong_size(resp, size)
            if wrong:
                # Not a cut: retrying the same request gets the same wrong artifact.
                part.unlink(missing_ok=True)
                raise FetchError(wrong)
            if resp.status_code == 416 or (resp.status_code == 200 and offset > 0):
                # The server cannot resume from here: start over from zero.
                part.unlink(missing_ok=True)
                if resp.status_code == 416:
                    raise RetryableError("range not satisfiable; restarting from zero")
                offset = 0
            elif resp.status_code == 206:
                match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not match or int(match.group(1)) != offset:
                    # Asking again for the same range gets the same answer: start over.
                    part.unlink(missing_ok=True)
                    raise RetryableError("server answered a different range; restarting from zero")
            elif resp.status_code in (429, 502, 503, 504):
                raise RetryableError(
                    f"artifact server busy ({resp.status_code})",
                    _retry_after(resp.headers.get("retry-after")),
                )
            elif resp.status_code != 200:
                raise FetchError(f"artifact download refused: HTTP {resp.status_code}")
            start = offset
            remaining = size - offset
            try:
                # O_NOFOLLOW: a symlink planted at the name is refused, not appended through.
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise self._failed(exc, sha256, "downloading") from exc
            unsynced = 0
            try:
                for chunk in resp.iter_raw():
                    # Never read more than declared: stop at the declared size.
                    chunk = chunk[:remaining]
                    try:  # the device's disk, not the link (the link's errors are httpx's)
                        for i in range(0, len(chunk), _PIECE):
                            view = memoryview(chunk)[i : i + _PIECE]
                            n = len(view)
                            while view:
                                view = view[os.write(fd, view) :]
                            fetched += n
                            remaining -= n
                            unsynced += n
                            if remaining > 0:
                                crashpoint("during_download")
                        if unsynced >= _SYNC_EVERY:
                            os.fsync(fd)
                            unsynced = 0
                    except OSError as exc:
                        raise self._failed(exc, sha256, "downloading") from exc
                    if progress:
                        progress(size - remaining, size)
                    if remaining <= 0:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        try:
                            os.fsync(fd)  # what arrived is kept for the resume
                        except OSError as exc:
                            raise self._failed(exc, sha256, "downloading") from exc
                        raise DownloadPaused(size - remaining, size)
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise self._failed(exc, sha256, "downloading") from exc
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise RetryableError(
                    f"artifact download cut at {size - remaining}/{size} bytes: {exc}"
                ) from exc
            finally:
                os.close(fd)
            if remaining > 0:
                raise RetryableError(f"artifact download cut at {size - remaining}/{size} bytes")
        return fetched, start


def _wrong_size(resp: httpx.Response, size: int) -> str | None:
    """Why a response shows the server's artifact is shorter than `size`, or None (pure).

    A server holding a shorter file (truncated, replaced, another artifact) would
    otherwise be retried as a cut download for ever: each short body resumes, each resume
    meets 416, and the next try starts from zero again. A longer one is read up to `size`
    and judged by its digest.
    """
    status = resp.status_code
    header = resp.headers.get("content-range", "").strip()
    total: int | None = None
    if status == 206:
        match = _CONTENT_RANGE.match(header)
        if match and match.group(3) != "*":
            total = int(match.group(3))
    elif status == 416:
        match = _UNSATISFIED_RANGE.match(header)
        total = int(match.group(1)) if match else None
    elif status == 200:
        length = resp.headers.get("content-length", "")
        # Only an identity body's length is the artifact's size.
        if _DIGITS.match(length) and resp.headers.get("content-encoding", "identity") == "identity":
            total = int(length)
    if total is None or total >= size:
        return None
    return f"artifact too short: the server has {total} bytes, the desired state says {size}"


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
