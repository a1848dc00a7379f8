"""Fixtures for the agent tests: a tiny real HTTP artifact server that can cut connections."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class ArtifactServer:
    """Serves `blobs` by path; `cut_after[path]` closes the first response after N bytes."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    ranges: list[str | None] = field(default_factory=list)
    status_queue: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    url: str = ""
    drip_s: float = 0.0  # > 0: bodies go out 1 KiB at a time, this long apart


@pytest.fixture
def artifact_server() -> Iterator[ArtifactServer]:
    state = ArtifactServer()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with lock:
                queued = state.status_queue.pop(0) if state.status_queue else None
            if queued:
                status, headers = queued
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            blob = state.blobs.get(self.path)
            if blob is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            start = 0
            if rng:
                m = re.match(r"bytes=(\d+)-", rng)
                assert m
                start = int(m.group(1))
                if start >= len(blob):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
            else:
                self.send_response(200)
            body = blob[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = state.cut_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                state.bytes_sent += cut
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if state.drip_s > 0:
                for i in range(0, len(body), 1024):
                    time.sleep(state.drip_s)
                    self.wfile.write(body[i : i + 1024])
                    self.wfile.flush()
                    state.bytes_sent += len(body[i : i + 1024])
                return
            self.wfile.write(body)
            state.bytes_sent += len(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- integration: real control plane and agent processes --------------------------------

from pathlib import Path  # noqa: E402

from ._harness import AgentProc, ControlPlaneProc  # noqa: E402


@pytest.fixture(scope="session")
def example_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgewise.examples import build_examples

    out = tmp_path_factory.mktemp("examples")
    bundles = build_examples(out)
    return {**bundles, "_pub": out / "examples.pub"}


def _start_cp(data: Path, example_bundles: dict[str, Path]) -> ControlPlaneProc:
    cp = ControlPlaneProc(data)
    try:
        cp.start()
        cp.trust(example_bundles["_pub"])
        for key in ("digits-mlp@1.0.0", "digits-mlp@1.1.0", "digits-logreg@1.0.0"):
            cp.push(example_bundles[key])
    except BaseException:
        cp.stop()
        raise
    return cp


@pytest.fixture
def control_plane(tmp_path: Path, example_bundles: dict[str, Path]) -> Iterator[ControlPlaneProc]:
    """A control plane of this test's own (for tests that stop and restart it)."""
    cp = _start_cp(tmp_path / "cp", example_bundles)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def shared_cp(
    tmp_path_factory: pytest.TempPathFactory, example_bundles: dict[str, Path]
) -> Iterator[ControlPlaneProc]:
    """One control plane for the session; tests isolate their devices by a label tag."""
    cp = _start_cp(tmp_path_factory.mktemp("shared") / "cp", example_bundles)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    made: list[AgentProc] = []

    def make(cp: ControlPlaneProc, name: str = "dev", *extra: str, server: str = "") -> AgentProc:
        tag = uuid.uuid4().hex[:10]
        token = cp.enroll_token(tag=tag)
        a = AgentProc(tmp_path / name, server or cp.url, token, *extra, tag=tag)
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.kill()
