"""HttpServer (edgewise._httpd), the loopback server of the local API, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgewise._httpd
from edgewise._httpd import Answer, BusyPoll, Deferred, Headers, HttpServer, error_answer

from .conftest import cyclic_garbage

Seen = list[tuple[str, str, Headers, bytes]]


def echo(seen: Seen) -> Callable[[str, str, Headers, bytes], Answer | Deferred]:
    """Answers with what it got; `/later/<ms>` answers after a delay (a Deferred),
    `/boom` raises, `/late-boom` defers and then fails to make its answer."""

    def handler(method: str, path: str, headers: Headers, body: bytes) -> Answer | Deferred:
        seen.append((method, path, headers, body))
        doc = {"method": method, "path": path, "body": body.decode("latin-1")}
        if path == "/boom":
            raise RuntimeError("handler bug")
        if path.startswith("/later/") or path == "/late-boom":
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            delay = int(path.rsplit("/", 1)[1]) / 1000 if path != "/late-boom" else 0.01
            loop.call_later(delay, fut.set_result, None)

            def finish() -> Answer:
                if path == "/late-boom":
                    raise ValueError("could not make the answer")
                return 200, json.dumps(doc).encode(), ()

            return Deferred(fut, finish)
        if path == "/big":
            return 200, b'"' + b"x" * 100_000 + b'"', ()
        if path == "/teapot":
            return 418, b"{}", ((b"x-extra", b"yes"),)
        return 200, json.dumps(doc).encode(), ()

    return handler


@pytest.fixture
def seen() -> Seen:
    return []


@pytest.fixture
def server(seen: Seen) -> Iterator[HttpServer]:
    srv = HttpServer(echo(seen), max_body_bytes=1000, max_head_bytes=2000, idle_timeout_s=0.3)
    srv.start()
    yield srv
    srv.stop()


def connect(srv: HttpServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return sock


class Reader:
    """Reads HTTP/1.1 answers off a socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def answer(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before an answer: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = 0 if head_only or status == 100 else int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), "connection closed inside a body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        """Whether the server closed the connection (after any bytes still buffered)."""
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/{version}", "Host: x", *extra]) + "\r\n\r\n").encode()


def test_keep_alive_serves_requests_one_after_another_on_one_connection(
    server: HttpServer, seen: Seen
) -> None:
    with connect(server) as sock:
        r = Reader(sock)
        for i in range(3):
            sock.sendall(post("/a%20b?q=1", b"hello %d" % i, "Content-Type: text/plain"))
            status, headers, body = r.answer()
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert "connection" not in headers
            assert json.loads(body) == {"method": "POST", "path": "/a b", "body": f"hello {i}"}
    # The path is percent-decoded and its query dropped; header names are lower-cased.
    assert [s[1] for s in seen] == ["/a b"] * 3
    assert seen[0][2][b"content-type"] == b"text/plain"


def test_pipelined_requests_are_answered_in_order_even_when_the_first_waits(
    server: HttpServer,
) -> None:
    # The first answer is deferred (50 ms); the later ones are ready at once. Forty
    # requests in one write also pass the read-ahead bound, which pauses reading.
    paths = ["/later/50", *[f"/n{i}" for i in range(39)]]
    with connect(server) as sock:
        sock.sendall(b"".join(get(p) for p in paths))
        r = Reader(sock)
        got = [json.loads(r.answer()[2])["path"] for _ in paths]
    assert got == paths


def test_a_client_that_reads_slowly_still_gets_every_answer_in_order(server: HttpServer) -> None:
    # 200 answers of 100 kB fill the socket buffers long before the client reads: the
    # server stops reading (and answering) until the client catches up.
    paths = ["/big" if i % 2 else f"/n{i}" for i in range(200)]
    with connect(server) as sock:
        sock.sendall(b"".join(get(p) for p in paths))
        time.sleep(0.3)
        r = Reader(sock)
        got = [r.answer()[2] for _ in paths]
    assert all(len(b) == 100_002 for b in got[1::2])
    assert [json.loads(b)["path"] for b in got[0::2]] == paths[0::2]


def test_a_chunked_body_is_decoded_and_handed_over_whole(server: HttpServer, seen: Seen) -> None:
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    req = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    with connect(server) as sock:
        sock.sendall(req[:40])
        time.sleep(0.05)  # the request arrives in two reads
        sock.sendall(req[40:])
        status, _, body = Reader(sock).answer()
    assert status == 200 and json.loads(body)["body"] == "hello world"
    assert seen[-1][3] == b"hello world"


def test_expect_100_continue_gets_the_interim_answer_first(server: HttpServer) -> None:
    with connect(server) as sock:
        head = post("/x", b"", "Expect: 100-continue").replace(
            b"Content-Length: 0", b"Content-Length: 4"
        )
        sock.sendall(head)
        r = Reader(sock)
        assert r.answer()[0] == 100
        sock.sendall(b"data")
        status, _, body = r.answer()
    assert status == 200 and json.loads(body)["body"] == "data"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (post("/x", b"y" * 1001), 413, "payload_too_large"),
        (
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"y" * 512
            + b"\r\n"
            + b"200\r\n"
            + b"y" * 512
            + b"\r\n0\r\n\r\n",
            413,
            "payload_too_large",
        ),
        (get("/x", "X-Big: " + "h" * 2100), 431, "headers_too_large"),
        (get("/" + "u" * 2100), 414, "uri_too_long"),
        (b"NONSENSE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nContent-Length: nine\r\n\r\n", 400, "bad_request"),
    ],
    ids=["declared-body", "chunked-body", "headers", "url", "garbage", "bad-length"],
)
def test_a_request_that_cannot_be_read_gets_a_4xx_and_the_connection_closes(
    server: HttpServer, seen: Seen, request_bytes: bytes, status: int, code: str
) -> None:
    with connect(server) as sock:
        sock.sendall(get("/first") + request_bytes)
        r = Reader(sock)
        assert r.answer()[0] == 200  # what came before is still answered
        got, headers, body = r.answer()
        assert (got, json.loads(body)["error"]["code"]) == (status, code)
        assert headers["connection"] == "close"
        assert r.closed()
    assert [s[1] for s in seen] == ["/first"]  # the refused request never reached it
    with connect(server) as sock:  # the server itself is fine
        sock.sendall(get("/again"))
        assert Reader(sock).answer()[0] == 200


def test_a_refused_body_is_read_and_dropped_so_the_client_gets_its_answer(
    server: HttpServer,
) -> None:
    # Closing with 2 MB unread would reset the connection: the client's send fails and
    # the 413 may never be read. The server half-closes and drains instead.
    body = b"y" * 2_000_000
    with connect(server) as sock:
        sock.sendall(post("/x", body))
        r = Reader(sock)
        status, headers, answer = r.answer()
        assert (status, headers["connection"]) == (413, "close")
        assert json.loads(answer)["error"]["code"] == "payload_too_large"
        assert r.closed()  # our side is half-closed at once
        deadline = time.monotonic() + 10  # and the connection ends after 2 idle checks
        while server.conns and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.conns


def test_handler_errors_are_500_json_and_the_connection_stays_usable(server: HttpServer) -> None:
    with connect(server) as sock:
        r = Reader(sock)
        for path in ("/boom", "/late-boom"):
            sock.sendall(get(path))
            status, _, body = r.answer()
            assert status == 500
            err = json.loads(body)["error"]
            assert err["code"] == "internal" and "Error" in err["message"]
        sock.sendall(get("/teapot"))
        status, headers, _ = r.answer()
        assert (status, headers["x-extra"]) == (418, "yes")


def test_head_gets_the_headers_without_the_body(server: HttpServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n" + get("/after"))
        r = Reader(sock)
        status, headers, body = r.answer(head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0 and body == b""
        assert json.loads(r.answer()[2])["path"] == "/after"


def test_http_1_0_without_keep_alive_is_closed_after_its_answer(server: HttpServer) -> None:
    with connect(server) as sock:
        sock.sendall(get("/old", version="1.0"))
        r = Reader(sock)
        status, headers, _ = r.answer()
        assert status == 200 and headers["connection"] == "close"
        assert r.closed()


def test_closed_connections_are_freed_without_the_garbage_collector(server: HttpServer) -> None:
    # A client that connects per request must not leave a cycle (connection, parser,
    # transport) per connection for the collector to find.
    def both_ways() -> None:
        with connect(server) as sock:  # the server closes it (HTTP/1.0)
            sock.sendall(get("/old", version="1.0"))
            r = Reader(sock)
            assert r.answer()[0] == 200 and r.closed()
        with connect(server) as sock:  # the client closes it
            sock.sendall(get("/new"))
            assert Reader(sock).answer()[0] == 200

    both_ways()
    with cyclic_garbage() as kinds:
        for _ in range(10):
            both_ways()
        deadline = time.monotonic() + 5
        while server.conns and time.monotonic() < deadline:  # connection_lost has run
            time.sleep(0.01)
    assert not server.conns
    assert not kinds & {"_Conn", "HttpRequestParser"}


def test_an_idle_connection_is_closed_and_a_waiting_one_is_not(server: HttpServer) -> None:
    with connect(server) as idle, connect(server) as busy:
        busy.sendall(get("/later/1200"))  # longer than the 0.3 s idle timeout, twice
        assert Reader(idle).closed()  # recv returns once the server closes it
        status, _, body = Reader(busy).answer()
        assert status == 200 and json.loads(body)["path"] == "/later/1200"


def test_a_client_gone_while_its_answer_is_pending_harms_nobody(server: HttpServer) -> None:
    with connect(server) as sock:
        sock.sendall(get("/later/100"))
    time.sleep(0.2)  # the deferred answer completes for a closed connection
    with connect(server) as sock:
        sock.sendall(get("/next"))
        assert Reader(sock).answer()[0] == 200


def test_stop_closes_open_connections_and_a_taken_port_fails_start(server: HttpServer) -> None:
    other = HttpServer(lambda *a: error_answer(404, "x", "y"), port=server.port)
    with pytest.raises(OSError, match="did not start"):
        other.start()
    sock = connect(server)
    sock.sendall(get("/x"))
    r = Reader(sock)
    assert r.answer()[0] == 200
    server.stop()
    assert r.closed()
    sock.close()


def test_alone_says_whether_one_connection_is_open(server: HttpServer) -> None:
    assert server.alone()
    with connect(server) as a, connect(server) as b:
        for sock in (a, b):
            sock.sendall(get("/x"))
            Reader(sock).answer()
        assert not server.alone()


def test_many_clients_at_once_are_all_answered(server: HttpServer) -> None:
    errors: list[Any] = []

    def client(k: int) -> None:
        try:
            with connect(server) as sock:
                r = Reader(sock)
                for i in range(20):
                    sock.sendall(post(f"/c{k}", b"%d" % i))
                    status, _, body = r.answer()
                    doc = json.loads(body)
                    if status != 200 or doc != {"method": "POST", "path": f"/c{k}", "body": str(i)}:
                        errors.append((k, i, status, doc))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_requests_split_anywhere_across_reads_get_the_same_answers(
    server: HttpServer, cuts: list[int]
) -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    stream = get("/a?x=1") + post("/b", b"x" * 100, "X-A: 1") + chunked + get("/d%2Fe")
    want = [
        ("GET", "/a", ""),
        ("POST", "/b", "x" * 100),
        ("POST", "/c", "abcde"),
        ("GET", "/d/e", ""),
    ]
    with connect(server) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        at = 0
        for cut in sorted(set(cuts)):
            if at < cut < len(stream):
                sock.sendall(stream[at:cut])
                time.sleep(0.002)  # separate reads on the server's side, most of the time
                at = cut
        sock.sendall(stream[at:])
        r = Reader(sock)
        got = []
        for _ in want:
            status, _, body = r.answer()
            doc = json.loads(body)
            got.append((doc["method"], doc["path"], doc["body"]))
            assert status == 200
    assert got == want


class _Turns:
    """A fake loop for `BusyPoll`: a clock moved by hand and the callbacks it scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self.soon: list[Callable[[], None]] = []

    def clock(self) -> float:
        return self.now

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def turn(self, advance: float = 0.0) -> None:
        """One loop iteration: time passes, then what was scheduled runs."""
        self.now += advance
        ready, self.soon = self.soon, []
        for fn in ready:
            fn()


def test_busy_poll_keeps_polling_after_an_answer_only_while_a_client_calls_back_quickly() -> None:
    loop = _Turns()
    poll = BusyPoll(100e-6, loop.call_soon, loop.clock)
    poll.received()  # the first request: nothing to compare with
    poll.answered()
    assert not poll.hot and not loop.soon  # a first answer never opens a window
    loop.now += 50e-6
    poll.received()  # back within the window: the client calls in a loop
    assert poll.hot
    poll.answered()
    assert poll.windows == 1 and len(loop.soon) == 1
    loop.turn(30e-6)
    loop.turn(30e-6)
    assert len(loop.soon) == 1  # still polling, 60 us after the answer
    poll.received()  # the next request ends the window
    assert poll.hits == 1
    loop.turn(1e-6)
    assert not loop.soon  # the loop may sleep again
    # A window nobody ends runs out, then the loop sleeps.
    poll.answered()
    assert poll.windows == 2
    for _ in range(5):
        loop.turn(30e-6)
    assert not loop.soon and poll.hits == 1
    # Requests that come back slowly (a camera's frames) turn it off again.
    loop.now += 0.033
    poll.received()
    poll.answered()
    assert not poll.hot and not loop.soon and poll.windows == 2


def test_busy_poll_off_does_nothing() -> None:
    loop = _Turns()
    poll = BusyPoll(0.0, loop.call_soon, loop.clock)
    for _ in range(3):
        poll.received()
        poll.answered()
    assert not loop.soon and poll.windows == 0


def test_busy_poll_is_off_on_one_cpu_and_refuses_a_negative_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(edgewise._httpd, "_cpus", lambda: 2)
    assert HttpServer(echo([]), busy_poll_us=50).busy_poll_us == 50
    monkeypatch.setattr(edgewise._httpd, "_cpus", lambda: 1)
    assert HttpServer(echo([]), busy_poll_us=50).busy_poll_us == 0
    with pytest.raises(ValueError, match="busy_poll_us"):
        HttpServer(echo([]), busy_poll_us=-1)


@pytest.mark.parametrize(
    ("window_us", "pause_s", "opens"),
    [
        pytest.param(300_000, 0.0, True, id="back-to-back"),
        pytest.param(1_000, 0.05, False, id="every-50ms"),
    ],
)
def test_the_server_polls_on_for_back_to_back_requests_and_not_for_spaced_ones(
    seen: Seen, window_us: int, pause_s: float, opens: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edgewise._httpd, "_cpus", lambda: 2)  # on whatever machine runs this
    srv = HttpServer(echo(seen), busy_poll_us=window_us)
    srv.start()
    try:
        with connect(srv) as sock:
            r = Reader(sock)
            for i in range(4):
                time.sleep(pause_s)
                sock.sendall(post("/x", b"%d" % i))
                assert r.answer()[0] == 200
        poll = srv.busy_poll
        # 300 ms is far longer than a loopback round trip; 50 ms far longer than 1 ms.
        assert (poll.windows >= 2 and poll.hits >= 1) is opens
        assert (poll.windows == 0) is not opens
    finally:
        srv.stop()
    assert len(seen) == 4
