from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from edgewise.agent._backoff import Backoff, RetryableError
from edgewise.agent._fetch import ArtifactCache, FetchError, HttpArtifactSource, InsufficientDisk

from .conftest import ArtifactServer


def _blob(n: int) -> tuple[bytes, str]:
    data = os.urandom(n)
    return data, hashlib.sha256(data).hexdigest()


def test_cut_download_resumes_from_its_offset_not_from_zero(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(1_000_000)
    artifact_server.blobs["/a"] = data
    artifact_server.cut_after["/a"] = 300_000
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client:
        source = HttpArtifactSource(client)
        with pytest.raises(RetryableError):
            cache.fetch(source, "/a", sha, len(data))
        assert cache.partial_size(sha) == 300_000
        result = cache.fetch(source, "/a", sha, len(data))
    assert result.resumed_from == 300_000
    assert result.bytes_fetched == len(data) - 300_000
    assert artifact_server.ranges == [None, "bytes=300000-"]
    assert artifact_server.bytes_sent == len(data)
    assert result.path.read_bytes() == data


def test_backoff_retries_a_cut_download_to_completion(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(200_000)
    artifact_server.blobs["/a"] = data
    artifact_server.cut_after["/a"] = 50_000
    cache = ArtifactCache(tmp_path)
    policy = Backoff(base_s=0.0, max_tries=3, sleep=lambda s: None)
    with httpx.Client(base_url=artifact_server.url) as client:
        result = policy.call(lambda: cache.fetch(HttpArtifactSource(client), "/a", sha, len(data)))
    assert result.path.read_bytes() == data
    assert artifact_server.bytes_sent == len(data)


def test_never_reads_more_than_the_declared_size(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(100_000)
    artifact_server.blobs["/a"] = data + b"x" * 500_000  # a server that sends too much
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client:
        result = cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
    assert result.bytes_fetched == len(data)
    assert result.path.stat().st_size == len(data)


def test_digest_mismatch_is_refused_and_nothing_is_cached(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, _ = _blob(10_000)
    artifact_server.blobs["/a"] = data
    wrong = hashlib.sha256(b"other").hexdigest()
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client, pytest.raises(FetchError):
        cache.fetch(HttpArtifactSource(client), "/a", wrong, len(data))
    assert not cache.has(wrong)
    assert cache.partial_size(wrong) == 0


def test_insufficient_disk_is_refused_before_any_byte_is_fetched(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(10_000)
    artifact_server.blobs["/a"] = data
    cache = ArtifactCache(tmp_path, free_bytes=lambda p: 15_000)
    with (
        httpx.Client(base_url=artifact_server.url) as client,
        pytest.raises(InsufficientDisk) as err,
    ):
        cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
    assert err.value.reason.startswith("insufficient disk")
    assert artifact_server.bytes_sent == 0


def test_busy_server_is_retryable_with_its_retry_after(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(1000)
    artifact_server.blobs["/a"] = data
    artifact_server.status_queue.append((503, {"Retry-After": "7"}))
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client:
        with pytest.raises(RetryableError) as err:
            cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
        assert err.value.retry_after == 7.0
        assert cache.fetch(HttpArtifactSource(client), "/a", sha, len(data)).path.exists()


def test_unknown_artifact_is_a_permanent_error(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client, pytest.raises(FetchError):
        cache.fetch(HttpArtifactSource(client), "/missing", "0" * 64, 10)


def test_cached_artifact_is_not_fetched_again(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    data, sha = _blob(5000)
    artifact_server.blobs["/a"] = data
    cache = ArtifactCache(tmp_path)
    with httpx.Client(base_url=artifact_server.url) as client:
        cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
        again = cache.fetch(HttpArtifactSource(client), "/a", sha, len(data))
    assert again.bytes_fetched == 0
    assert artifact_server.bytes_sent == len(data)


def test_a_dripping_download_is_fetched_in_slices_that_resume(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    # A link that delivers a trickle had held the agent inside one download for as long
    # as it lasted: no polls, no reports, no new desired state.
    import time

    from edgewise.agent._fetch import DownloadPaused

    blob = os.urandom(20 * 1024)
    sha = hashlib.sha256(blob).hexdigest()
    artifact_server.blobs["/a"] = blob
    artifact_server.drip_s = 0.05  # 20 KiB over about a second
    cache = ArtifactCache(tmp_path / "cache")
    slices = 0
    with httpx.Client(base_url=artifact_server.url) as http:
        source = HttpArtifactSource(http)
        while True:
            try:
                result = cache.fetch(source, "/a", sha, len(blob), deadline=time.monotonic() + 0.2)
                break
            except DownloadPaused as paused:
                slices += 1
                assert paused.done == cache.partial_size(sha) > 0
                assert slices < 200
    assert slices >= 2 and result.path.read_bytes() == blob
    resumed = [r for r in artifact_server.ranges if r]
    assert len(resumed) == slices  # each slice after the first asked for the rest only
