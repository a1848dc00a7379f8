"""A light HTTP/1.1 transport for the simulator: keep-alive connections on asyncio, no more.

10,000 simulated devices in one process spend most of their CPU in the HTTP stack, and
most of that in httpcore's general machinery (anyio cancel scopes, pool bookkeeping, a
new TCP connection whenever the pool's keep-alive limit closes one). The simulator needs
much less: plain HTTP/1.1 to one control plane on loopback. `LightTransport` is an
`httpx.AsyncBaseTransport`, so the devices still talk through the agent's own
`AsyncDeviceClient` and `httpx.AsyncClient` (signing, status handling, retries are the
agent's); only the bytes on the wire are moved by this module:

- a connection is an `asyncio.Protocol` parsing answers with `httptools` (uvicorn's
  parser); idle connections are kept (up to `max_idle`, for `idle_s`) and reused;
- a request's read timeout (`request.extensions["timeout"]`, as httpx sets it) closes
  its connection and raises `httpx.ReadTimeout`; a refused connect raises
  `httpx.ConnectError`, a connection lost mid-answer `httpx.ReadError`, as httpcore does;
- the answer is read whole (`Content-Length` or chunked) before it is returned: the
  artifacts the simulator downloads are small, and `aiter_bytes` still works on it;
- `source`: a local address its connections leave from. 10,000 devices on one host
  share one source address and so one ephemeral port range (28,000 ports by default),
  half of which `connect()` prefers; a fleet's long-polls and keep-alive connections
  fill it, and past ~14,000 connections each `connect()` searches the range for a free
  port: about 1 ms of CPU instead of 70 us (measured here). Real devices each have their
  own address; the simulator gives each shard its own loopback one (127.0.0.0/8 is all
  loopback on Linux), bound with `IP_BIND_ADDRESS_NO_PORT` so the port is still chosen
  per destination at `connect()`.

`LeanClient` is the `httpx.AsyncClient` the shards use over it. The agent's client code
calls `build_request` and `send` as on any client; measured on this machine, httpx's
general machinery around them (joining the base URL and parsing the result again,
merging default headers and cookies, the cookie jar's look at every answer, which builds
a urllib request each time) took ~60 % of the simulator's CPU per request. For what the
device client sends (a path on the base URL, optional query, headers, bytes) the lean
client builds the same `httpx.Request` from a cached URL and hands it straight to the
transport; anything else (JSON bodies, absolute URLs, auth, redirects) takes httpx's own
path. Cookies are never kept: the device protocol sets none.

Not for the agent itself: no TLS, no proxies, no HTTP/2, no streaming of large bodies.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast
from urllib.parse import urlencode

import httptools
import httpx

__all__ = ["LeanClient", "LightTransport"]

# Linux's value; the socket module names it from Python 3.12 only.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"bad answer from the server: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(httpx.ReadError("connection closed by the server"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    # ours
    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]]:
        assert self.transport is not None
        self.headers, self.body = [], []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


def _head(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path.decode("ascii")
    lines = [f"{request.method} {target} HTTP/1.1"]
    for name, value in request.headers.raw:
        low = name.lower()
        if low not in (b"content-length", b"transfer-encoding", b"connection"):
            lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


class LightTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to one server (no TLS); see the module notes.

    Args:
        max_idle: idle connections kept for reuse.
        idle_s: an idle connection older than this is closed instead of reused (keep it
            below the server's keep-alive timeout).
        source: the local IPv4 address connections leave from (default: the kernel's
            choice); see the module notes.
    """

    def __init__(self, max_idle: int = 16, idle_s: float = 60.0, source: str | None = None) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.source = source
        self._resolved: dict[tuple[str, int], tuple[str, int]] = {}
        self.connects = 0  # TCP connections opened (a figure for tests)
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()

    async def _connection(self, request: httpx.Request) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.close()
        url = request.url
        loop = asyncio.get_running_loop()
        try:
            if self.source is None:
                _, conn = await loop.create_connection(_Conn, url.host, url.port or 80)
            else:
                sock = await self._connect_from_source(url.host, url.port or 80)
                _, conn = await loop.create_connection(_Conn, sock=sock)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect: {exc}", request=request) from None
        self.connects += 1
        return conn

    async def _connect_from_source(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        address = self._resolved.get((host, port))
        if address is None:
            infos = await loop.getaddrinfo(host, port, family=socket.AF_INET)
            address = self._resolved[(host, port)] = (str(infos[0][4][0]), port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` on an idle (or new) connection and read the whole answer."""
        body = request.content
        conn = await self._connection(request)
        self._busy.add(conn)
        timeout = (request.extensions.get("timeout") or {}).get("read")
        loop = asyncio.get_running_loop()
        answer = conn.send(_head(request, body) + body)
        timer = loop.call_later(timeout, conn.close) if timeout else None
        try:
            status, headers, content = await answer
        except httpx.ReadError:
            if timer is not None and timer.when() <= loop.time():
                raise httpx.ReadTimeout("no answer in time", request=request) from None
            raise
        except BaseException:
            conn.close()  # cancelled or failed mid-request: the connection is unusable
            raise
        finally:
            self._busy.discard(conn)
            if timer is not None:
                timer.cancel()
        if conn.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        self._busy.clear()


class LeanClient(httpx.AsyncClient):
    """An `httpx.AsyncClient` with a short path for the device client's requests.

    Args:
        base_url: the control plane.
        transport: what moves the bytes (a `LightTransport`, possibly wrapped).
        timeout: the default timeout, as on `httpx.AsyncClient`.
    """

    _MAX_URLS = 1024

    def __init__(
        self, base_url: str, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout
    ) -> None:
        super().__init__(base_url=base_url, transport=transport, timeout=timeout)
        self._lean_transport = transport
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._default_headers = {k.lower(): v for k, v in self.headers.items()}
        self._timeout_extension = self.timeout.as_dict()

    def build_request(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        **other: Any,
    ) -> httpx.Request:
        """The request httpx would build; the short path for a path, query and bytes."""
        if other or not isinstance(url, str) or not url.startswith("/"):
            return super().build_request(
                method, url, content=content, params=params, headers=headers, **other
            )
        key = (url, urlencode(params) if params else "")
        full = self._urls.get(key)
        if full is None:
            if len(self._urls) >= self._MAX_URLS:
                self._urls.clear()
            full = self._urls[key] = super().build_request(method, url, params=params).url
        merged = self._default_headers
        if headers:
            merged = {**merged, **{k.lower(): v for k, v in headers.items()}}
        return httpx.Request(
            method,
            full,
            content=content,
            headers=merged,
            extensions={"timeout": self._timeout_extension},
        )

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **other: Any
    ) -> httpx.Response:
        """Send `request` as built: straight to the transport (no auth, redirects, cookies)."""
        if other:
            return await super().send(request, stream=stream, **other)
        response = await self._lean_transport.handle_async_request(request)
        response.request = request
        if not stream:
            await response.aread()
        return response
