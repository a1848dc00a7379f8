"""A control-plane process that is told to stop answers its long-polls and exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise.bundle import public_key_to_b64
from edgewise.protocol import sign_request

from .conftest import ControlPlaneProcess


def _waiting(plane: ControlPlaneProcess) -> float:
    for line in httpx.get(plane.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edgewise_longpoll_waiting "):
            return float(line.split()[1])
    raise AssertionError("no edgewise_longpoll_waiting gauge")


def test_a_stopping_control_plane_answers_its_long_polls_and_exits(tmp_path: Path) -> None:
    # uvicorn stops by waiting for the requests in flight, and a long-poll waits up to
    # `max_poll_wait_s` (300 s): SIGTERM left the process waiting for it that long.
    plane = ControlPlaneProcess(tmp_path / "cp").start()
    assert plane.proc is not None
    try:
        tok = plane.api("POST", "/api/v1/enroll-tokens", json={})["token"]
        key = Ed25519PrivateKey.generate()
        enrolled = httpx.post(
            plane.url + "/device/v1/enroll",
            json={"token": tok, "public_key": public_key_to_b64(key.public_key())},
            timeout=30,
        )
        device = enrolled.json()["device_id"]
        path = "/device/v1/desired?wait=300"
        answers: list[int | str] = []

        def poll() -> None:
            headers = {**sign_request(key, device, "GET", path, b"", time.time())}
            headers["if-none-match"] = '"1"'
            try:
                r = httpx.get(plane.url + path, headers=headers, timeout=4000)
                answers.append(r.status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        waiter = threading.Thread(target=poll, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 30
        while _waiting(plane) < 1:
            assert time.monotonic() < deadline, "the long-poll never started waiting"
            time.sleep(0.05)
        plane.proc.send_signal(signal.SIGTERM)
        # Less than the 300 s the poll may wait. (uvicorn ends by re-raising the signal
        # it stopped for, once shut down.)
        assert plane.proc.wait(timeout=120) in (0, -signal.SIGTERM)
        waiter.join(timeout=30)
        assert answers == [304]  # answered as unchanged, not cut off
    finally:
        plane.kill()
