"""A small loopback TCP proxy whose link the demo can cut and restore.

One agent talks to the control plane through it. `cut()` closes every open connection
and refuses new ones (accept, then close at once), which is what a dead uplink looks
like to the agent: connection resets and failed requests, never a clean answer.
`restore()` lets connections through again. Threads, not asyncio: the proxy must keep
working while the demo's event loop is busy with the simulated fleet.

Usage::

    proxy = UplinkProxy(("127.0.0.1", server_port))
    port = proxy.start()
    proxy.cut(); ...; proxy.restore()
    proxy.close()
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["UplinkProxy"]

_CHUNK = 64 * 1024


class UplinkProxy:
    """Forward 127.0.0.1:<port> to `target`, with a switch."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connected = threading.Event()
        self.connected.set()
        self.refused = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._thread = threading.Thread(target=self._accept_loop, name="uplink-proxy", daemon=True)

    def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self._thread.start()
        port: int = self._listener.getsockname()[1]
        return port

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore()`."""
        self.connected.clear()
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            _close(s)

    def restore(self) -> None:
        """Let connections through again."""
        self.connected.set()

    def close(self) -> None:
        """Stop the proxy and drop everything."""
        self._closed.set()
        self.cut()
        _close(self._listener)
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.connected.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


def _reset(s: socket.socket) -> None:
    # SO_LINGER with a zero timeout turns close() into an RST: a refused uplink.
    import struct

    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
