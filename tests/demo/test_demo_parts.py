"""The demo's own parts: the uplink proxy it cuts and the process set it cleans up."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from edgewise.demo import Processes, UplinkProxy


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(1024)


def test_proxy_forwards_refuses_while_cut_and_recovers() -> None:
    srv, target = _echo_server()
    proxy = UplinkProxy(("127.0.0.1", target))
    port = proxy.start()
    try:
        assert _roundtrip(port, b"hello") == b"hello"
        proxy.cut()
        try:
            got = _roundtrip(port, b"lost")
        except OSError:
            got = b""
        assert got == b""
        assert proxy.refused >= 1
        proxy.restore()
        assert _roundtrip(port, b"back") == b"back"
    finally:
        proxy.close()
        srv.close()


def test_cutting_drops_connections_already_open() -> None:
    srv, target = _echo_server()
    proxy = UplinkProxy(("127.0.0.1", target))
    port = proxy.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"a")
            assert s.recv(16) == b"a"
            proxy.cut()
            try:
                s.sendall(b"b")
                got = s.recv(16)
            except OSError:
                got = b""
            assert got == b""
    finally:
        proxy.close()
        srv.close()


def test_stop_all_kills_children_and_their_children(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs")
    # A child that ignores SIGTERM and spawns a grandchild in its own group.
    code = (
        "import signal, subprocess, sys, time;"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print('ready', flush=True); time.sleep(60)"
    )
    child = procs.spawn("stubborn", [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while "ready" not in child.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    family = psutil.Process(child.pid).children(recursive=True)
    assert family, "the grandchild should be running"

    procs.stop_all(grace_s=0.5)

    assert not child.alive()
    _gone, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []
    procs.detach()


def test_spawned_children_lead_their_own_process_group(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs")
    child = procs.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.proc.wait()
        procs.detach()
