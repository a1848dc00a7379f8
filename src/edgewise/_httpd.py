"""A small HTTP/1.1 server for the device's loopback API: asyncio and httptools, no ASGI.

    >>> server = HttpServer(handler)          # handler(method, path, headers, body)
    >>> port = server.start()                 # 127.0.0.1, its own event loop and thread
    >>> server.stop()

A handler gets a whole request (method, path, lower-cased headers, body) and returns an
`Answer` `(status, JSON body, extra headers)` at once, or a `Deferred`: a future plus
the function that turns it into an answer once it is done. The inference route answers
at once when the executor runs the request right there (the usual case at one
connection), and defers when the request waits for a batch: no task, coroutine or
per-request ASGI message on its path.

Why not uvicorn: the local inference API's budget is a few percent over a bare endpoint
that calls `session.run`, and at one connection the server's own work is a large part
of a request. Measured on the digits MLP at one connection (bench/runtime.py): the same
routes cost 199-233 us of server CPU per request as an ASGI app on uvicorn, 144-156 us
on this server, whose own Python work is ~9 us of that. It is the simulator's transport
approach (`edgewise.sim._transport`) on the serving side.

It lives at the package's top, importing nothing of edgewise, because two parts use it:
the runtime's inference API answers in its terms, and the agent serves its loopback
routes with it. The agent must not import the runtime package (numpy alone is ~19 MB
of RSS) until it runs a pipeline.

What it does: keep-alive; pipelined requests answered in order; Content-Length and
chunked bodies (httptools decodes the chunking); `Expect: 100-continue`; HEAD; limits
(a request line or head over `max_head_bytes` gets 414 or 431, a body over
`max_body_bytes` 413); a malformed request gets 400. After such a refusal the
connection closes, once the rest of the request has been read and dropped (see
`_Conn._linger`). A handler that raises gets a 500 JSON answer, never a traceback. A
connection silent for `idle_timeout_s` with nothing in flight is closed (checked every
`idle_timeout_s`, so after one to two of them). A client that does not read its answers
is not answered, nor read, further until it does. Every answer is JSON. Not here: TLS,
HTTP/2, upgrades, streamed bodies.

Busy polling (`busy_poll_us`, 100 by default): after an answer, the loop keeps polling
its sockets without sleeping for up to that long, but only while requests have been
coming back within that window of the previous answer (a client calling in a loop), and
never on a machine with one CPU (the client needs it). The first byte that arrives ends
the window. Why: at one connection the server otherwise sleeps after every answer, and
the next request waits for a sleeping thread to be woken on an idle CPU. On the 2-vCPU
machines the bench runs on that cost 50-65 us a request (wrk's median latency 222-266 us
without, 166-182 us with): the digits MLP at one connection had the same server CPU per
request as the bare endpoint and 0.86-0.89 of its rate; with busy polling 1.09-1.13, CPU
per request unchanged (bench/runtime.py). A client calling every few milliseconds (a
camera's frames) never turns it on. It is what Linux's `SO_BUSY_POLL` does in the
kernel, here in the loop, since loopback sockets have no NIC queue to poll.
`HttpServer.busy_poll` counts the windows and the requests that ended one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools
import orjson

__all__ = [
    "BUSY_POLL_US",
    "Answer",
    "BusyPoll",
    "Deferred",
    "Handler",
    "Headers",
    "HttpServer",
    "error_answer",
]

Headers = dict[bytes, bytes]
Answer = tuple[int, bytes, Sequence[tuple[bytes, bytes]]]


class Deferred:
    """An answer that is not ready yet: `finish()` makes it once `fut` is done."""

    __slots__ = ("finish", "fut")

    def __init__(self, fut: asyncio.Future[Any], finish: Callable[[], Answer]) -> None:
        self.fut = fut
        self.finish = finish


Handler = Callable[[str, str, Headers, bytes], "Answer | Deferred"]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
BUSY_POLL_US = 100.0  # the default window of busy polling (see the module's notes)
_MAX_QUEUED = 16  # pipelined requests read ahead of their answers before reading pauses


def error_answer(status: int, code: str, message: str) -> Answer:
    """The JSON error body every route uses: `{"error": {"code", "message"}}`."""
    return status, orjson.dumps({"error": {"code": code, "message": message}}), ()


def _head(status: int, length: int, extra: Sequence[tuple[bytes, bytes]], close: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        length,
    )
    for name, value in extra:
        head += name + b": " + value + b"\r\n"
    return head + (b"connection: close\r\n\r\n" if close else b"\r\n")


class BusyPoll:
    """Keeps an event loop polling for a moment after an answer (see the module's notes).

    `answered()` after each answer written, `received()` on each read: a request that
    arrives within `window_s` of the previous answer makes the loop hot, and a hot loop
    keeps polling (a `call_soon` that reschedules itself, so the loop's poll does not
    sleep) until a request arrives or `window_s` has passed since the last answer.
    """

    __slots__ = (
        "_call_soon",
        "_clock",
        "_last",
        "_ticking",
        "_until",
        "hits",
        "hot",
        "window_s",
        "windows",
    )

    def __init__(
        self,
        window_s: float,
        call_soon: Callable[[Callable[[], None]], object],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.window_s = window_s
        self._call_soon = call_soon
        self._clock = clock
        self._last: float | None = None  # when the last answer was written
        self._until = 0.0  # polling goes on until then
        self._ticking = False
        self.hot = False
        self.windows = 0  # polling windows opened
        self.hits = 0  # windows a request ended (the rest ran out)

    def answered(self) -> None:
        """An answer was written: poll on, if requests have been coming back quickly."""
        if not self.window_s:
            return
        now = self._clock()
        self._last = now
        if not self.hot:
            return
        if not self._until:
            self.windows += 1
        self._until = now + self.window_s
        if not self._ticking:
            self._ticking = True
            self._call_soon(self._tick)

    def received(self) -> None:
        """Data arrived: it ends the window, and says whether requests come back quickly."""
        if self._last is None:
            return
        now = self._clock()
        self.hot = now - self._last <= self.window_s
        if self._until:
            if now < self._until:
                self.hits += 1
            self._until = 0.0

    def _tick(self) -> None:
        if self._until and self._clock() < self._until:
            self._call_soon(self._tick)
            return
        self._until = 0.0
        self._ticking = False


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Refused(Exception):
    """A request that cannot be served: answered with `answer`, then the connection ends."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[0])
        self.answer = answer


class _Conn(asyncio.Protocol):
    """One connection: parses requests, answers them strictly in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Requests waiting for their turn, in order. A request that could not be read
        # holds its place with the refusal that answers it (and then closes).
        self.queue: deque[tuple[str, str, Headers, bytes, bool, Answer | None]] = deque()
        self.waiting = False  # a Deferred answer is outstanding
        self.closed = False
        self.heard = True  # data arrived since the last idle check
        self.reading = True
        self.writable = True  # the transport's write buffer is below its high-water mark
        self.refused: _Refused | None = None
        self.lingering = 0  # idle checks seen since a refusal was sent (see _linger)
        self.url = b""
        self.headers: Headers = {}
        self.body: list[bytes] = []
        self.size = 0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        # Let go of the transport and the parser (which holds this object's bound
        # methods): a closed connection is freed by reference counting then, not left
        # as a cycle for the garbage collector (a client that connects per request).
        self.transport = None
        del self.parser

    def data_received(self, data: bytes) -> None:
        self.heard = True
        self.server.busy_poll.received()
        if self.lingering:
            return  # the rest of a refused request: dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (WebSocket, h2c) is not spoken here: answer what was asked, close.
            if self.queue:
                method, path, headers, body, _keep, refusal = self.queue.pop()
                self.queue.append((method, path, headers, body, False, refusal))
            else:
                self._close()
        except httptools.HttpParserCallbackError:
            refused = self.refused
            self._refuse(
                refused.answer if refused else error_answer(400, "bad_request", "bad request")
            )
        except httptools.HttpParserError as exc:
            self._refuse(error_answer(400, "bad_request", f"malformed HTTP request: {exc}"))

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests until it does.
        self.writable = False
        self._pause()

    def resume_writing(self) -> None:
        self.writable = True
        if not self.waiting:
            self._serve()

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.size += len(url)
        if self.size > self.server.max_head_bytes:
            self._over_limit(error_answer(414, "uri_too_long", "request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value)
        if self.size > self.server.max_head_bytes:
            limit = self.server.max_head_bytes
            self._over_limit(error_answer(431, "headers_too_large", f"head over {limit} bytes"))
        name = name.lower()
        seen = self.headers.get(name)
        self.headers[name] = value if seen is None else seen + b", " + value

    def on_headers_complete(self) -> None:
        self.size = 0
        limit = self.server.max_body_bytes
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._over_limit(
                error_answer(
                    413,
                    "payload_too_large",
                    f"body of {int(declared)} bytes is over the {limit} byte limit",
                )
            )
        expect = self.headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.transport:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.server.max_body_bytes:
            limit = self.server.max_body_bytes
            self._over_limit(
                error_answer(413, "payload_too_large", f"body over the {limit} byte limit")
            )
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        raw = self.url.split(b"?", 1)[0]
        path = unquote(raw.decode("latin-1")) if b"%" in raw else raw.decode("latin-1")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        method = parser.get_method().decode("latin-1")
        self.queue.append((method, path, self.headers, body, parser.should_keep_alive(), None))
        if len(self.queue) > _MAX_QUEUED:
            self._pause()
        if not self.waiting:
            self._serve()

    # -- answering --------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer queued requests in order until one has to wait.

        Answers are written only while the transport's buffer is below its high-water
        mark: a client that does not read its answers is not answered (or read) further.
        """
        handler = self.server.handler
        while self.queue and not self.waiting and not self.closed and self.writable:
            method, path, headers, body, keep, refusal = self.queue.popleft()
            if refusal is not None:
                self._write(refusal, False, linger=True)
                return
            try:
                answer = handler(method, path, headers, body)
            except Exception as exc:  # never a traceback to the client
                answer = error_answer(500, "internal", f"{type(exc).__name__}: {exc}")
            if isinstance(answer, Deferred):
                self.waiting = True
                answer.fut.add_done_callback(
                    functools.partial(self._finished, answer, keep, method == "HEAD")
                )
                return
            self._write(answer, keep, method == "HEAD")
        if not self.reading and len(self.queue) <= _MAX_QUEUED // 2:
            self._resume()

    def _finished(
        self, deferred: Deferred, keep: bool, head_only: bool, _fut: asyncio.Future[Any]
    ) -> None:
        self.waiting = False
        if self.closed:
            return
        try:
            answer = deferred.finish()
        except Exception as exc:
            answer = error_answer(500, "internal", f"{type(exc).__name__}: {exc}")
        self._write(answer, keep, head_only)
        self._serve()

    def _write(
        self, answer: Answer, keep: bool, head_only: bool = False, linger: bool = False
    ) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        status, body, extra = answer
        head = _head(status, len(body), extra, not keep)
        transport.write(head if head_only else head + body)
        self.server.busy_poll.answered()
        if linger:
            self._linger()
        elif not keep:
            self._close()

    def _over_limit(self, answer: Answer) -> None:
        self.refused = _Refused(answer)
        raise self.refused

    def _refuse(self, answer: Answer) -> None:
        """Answer a request that cannot be read (after any answers owed), then close."""
        self.refused = _Refused(answer)  # and read no more
        self.queue.append(("", "", {}, b"", False, answer))
        self._pause()
        if not self.waiting:
            self._serve()

    def _pause(self) -> None:
        if self.reading and self.transport is not None and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if (
            not self.reading
            and self.writable
            and self.refused is None
            and self.transport is not None
            and not self.closed
        ):
            self.reading = True
            self.transport.resume_reading()

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def _linger(self) -> None:
        """Close after a refusal without losing it to a reset.

        The client may still be sending the request that was refused (a body over the
        limit). Closing a socket with unread data makes the kernel send a reset, which
        can reach the client before it reads the answer. So, as web servers do: close
        our side for writing once the answer is out, read and drop whatever still
        comes, and close when the client does, or at the second idle check from now.
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        self.lingering = 1
        if transport.can_write_eof():
            transport.write_eof()
        self.reading = True
        transport.resume_reading()

    def idle(self) -> bool:
        """Nothing heard since the last check and nothing in flight.

        A connection lingering after a refusal counts as idle at its second check.
        """
        if self.lingering:
            self.lingering += 1
            return self.lingering > 2
        quiet = not self.heard and not self.waiting and not self.queue
        self.heard = False
        return quiet


class HttpServer:
    """Serves one `Handler` on a loopback port from its own thread and event loop."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 8 * 1024 * 1024,
        max_head_bytes: int = 64 * 1024,
        idle_timeout_s: float = 5.0,
        busy_poll_us: float = BUSY_POLL_US,
    ) -> None:
        """A server for `handler`; `start()` runs it.

        Args:
            handler: answers each request (see `Handler`).
            host: the address to listen on (loopback).
            port: the port; 0 picks a free one (`start()` returns it).
            max_body_bytes: a longer body gets 413.
            max_head_bytes: a longer request line gets 414, longer headers 431.
            idle_timeout_s: a connection silent this long, with nothing in flight, closes.
            busy_poll_us: how long the loop polls on after an answer while a client calls
                back-to-back (see the module's notes); 0 turns it off, as does a machine
                with one CPU.
        """
        if busy_poll_us < 0:
            raise ValueError("busy_poll_us must be >= 0")
        self.handler = handler
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.max_head_bytes = max_head_bytes
        self.idle_timeout_s = idle_timeout_s
        self.conns: set[_Conn] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.busy_poll_us = busy_poll_us if _cpus() > 1 else 0.0
        self.busy_poll = BusyPoll(0.0, lambda _fn: None)  # replaced when the loop starts

    def alone(self) -> bool:
        """Whether at most one connection is open (for `InferenceAPI`'s batching)."""
        return len(self.conns) <= 1

    def start(self, timeout: float = 10.0) -> int:
        """Start serving; returns the bound port.

        Raises:
            OSError: the port could not be bound, or the server did not start in time.
        """
        self._thread = threading.Thread(target=self._run, name="local-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError("the local API did not start in time")
        if self._error is not None:
            raise OSError(f"the local API did not start: {self._error}") from self._error
        return self.port

    def stop(self) -> None:
        """Stop listening, close every connection and end the thread."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already stopped
            loop.call_soon_threadsafe(self._shutdown)
        thread.join(timeout=5)

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # uvloop is optional (not on Windows)
            loop = asyncio.new_event_loop()
        self.loop = loop
        self.busy_poll = BusyPoll(self.busy_poll_us / 1e6, loop.call_soon)
        try:
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _Conn(self), self.host, self.port)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        loop.call_later(self.idle_timeout_s, self._sweep)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _sweep(self) -> None:
        for conn in list(self.conns):
            if conn.idle():
                conn._close()
        assert self.loop is not None
        self.loop.call_later(self.idle_timeout_s, self._sweep)

    def _shutdown(self) -> None:
        assert self.loop is not None
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn._close()
        self.loop.stop()
