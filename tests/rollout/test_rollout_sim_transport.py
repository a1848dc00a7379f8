"""The simulator's `LightTransport` against a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest

from edgewise.sim import run as sim_run
from edgewise.sim._transport import LeanClient, LightTransport

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    """A raw HTTP/1.1 server: `handler(request_head_and_body, writer)` answers one request
    and says whether to keep the connection."""

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if not await handler(head + body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
    body = request.split(b"\r\n\r\n", 1)[1]
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-echo: yes\r\n\r\n%s" % (
        len(body), body))  # fmt: skip
    await writer.drain()
    return True


@pytest.mark.parametrize("run", [asyncio.run, sim_run], ids=["asyncio", "sim-loop"])
def test_requests_reuse_one_keep_alive_connection_and_carry_bodies(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        server, url = await _serve(_echo)
        transport = LightTransport()
        async with server, httpx.AsyncClient(base_url=url, transport=transport) as client:
            for i in range(5):
                r = await client.post("/echo", content=f"payload {i}".encode())
                assert (r.status_code, r.content, r.headers["x-echo"]) == (
                    200, f"payload {i}".encode(), "yes")  # fmt: skip
            r = await client.get("/echo")
            assert r.content == b""
        assert transport.connects == 1

    run(main())


def test_chunked_answers_are_read_whole() -> None:
    async def chunked(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 206 Partial Content\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")  # fmt: skip
        await writer.drain()
        return True

    async def main() -> None:
        server, url = await _serve(chunked)
        async with server, httpx.AsyncClient(base_url=url, transport=LightTransport()) as c:
            async with c.stream("GET", "/a") as r:
                parts = [chunk async for chunk in r.aiter_bytes()]
            assert r.status_code == 206 and b"".join(parts) == b"hello world"

    asyncio.run(main())


def test_a_slow_answer_is_a_read_timeout_and_the_next_request_still_works() -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/slow" in request.split(b"\r\n", 1)[0]:
            await asyncio.sleep(2)
        return await _echo(request, writer)

    async def main() -> None:
        server, url = await _serve(slow)
        async with server, httpx.AsyncClient(base_url=url, transport=LightTransport()) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/slow", timeout=0.2)
            r = await c.post("/fast", content=b"ok")
            assert r.content == b"ok"

    asyncio.run(main())


def test_refused_and_cut_connections_raise_httpx_errors() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def cut(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        return False  # closes mid-answer

    async def main() -> None:
        async with httpx.AsyncClient(transport=LightTransport()) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{closed_port}/")
        server, url = await _serve(cut)
        async with server, httpx.AsyncClient(base_url=url, transport=LightTransport()) as c:
            with pytest.raises(httpx.ReadError):
                await c.get("/cut")

    asyncio.run(main())


def test_idle_connections_past_their_age_are_not_reused() -> None:
    async def main() -> None:
        server, url = await _serve(_echo)
        transport = LightTransport(idle_s=0.05)
        async with server, httpx.AsyncClient(base_url=url, transport=transport) as client:
            await client.get("/a")
            await asyncio.sleep(0.1)
            await client.get("/b")
        assert transport.connects == 2

    asyncio.run(main())


@pytest.mark.parametrize("run", [asyncio.run, sim_run], ids=["asyncio", "sim-loop"])
def test_connections_leave_from_the_given_source_address(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    peers: list[str] = []

    async def who(request: bytes, writer: asyncio.StreamWriter) -> bool:
        peers.append(writer.get_extra_info("peername")[0])
        return await _echo(request, writer)

    async def main() -> None:
        server, url = await _serve(who)
        transport = LightTransport(source="127.0.16.7")
        async with server, httpx.AsyncClient(base_url=url, transport=transport) as c:
            assert (await c.post("/a", content=b"x")).content == b"x"
            async with httpx.AsyncClient(base_url=url, transport=LightTransport()) as plain:
                await plain.get("/b")
        with socket.socket() as s:  # a port nobody listens on, from a source address
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        async with httpx.AsyncClient(transport=LightTransport(source="127.0.16.7")) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{closed}/")

    run(main())
    assert peers == ["127.0.16.7", "127.0.0.1"]


def test_shards_of_a_loopback_fleet_get_their_own_source_addresses() -> None:
    from edgewise.sim._fleet import shard_source

    assert shard_source("http://127.0.0.1:8080", 0) == "127.0.16.0"
    assert shard_source("http://127.0.0.1:8080", 300) == "127.0.17.44"
    assert len({shard_source("http://127.0.0.1:1", k) for k in range(1000)}) == 1000
    assert shard_source("http://localhost:8080", 1) is None  # not an address: the kernel's
    assert shard_source("http://[::1]:8080", 1) is None
    assert shard_source("http://192.0.2.1:8080", 1) is None


def test_the_lean_client_sends_what_httpx_would() -> None:
    seen: list[bytes] = []

    async def record(request: bytes, writer: asyncio.StreamWriter) -> bool:
        seen.append(request)
        return await _echo(request, writer)

    def parsed(raw: bytes) -> tuple[bytes, set[tuple[bytes, bytes]], bytes]:
        head, body = raw.split(b"\r\n\r\n", 1)
        line, *fields = head.split(b"\r\n")
        pairs = {(k.strip().lower(), v.strip()) for k, v in (f.split(b":", 1) for f in fields)}
        return line, pairs, body

    async def exchange(client: httpx.AsyncClient) -> list[tuple[int, bytes]]:
        answers = []
        for request in (
            client.build_request(
                "GET", "/device/v1/desired", params={"wait": "30"}, headers={"If-None-Match": '"4"'}
            ),
            client.build_request(
                "POST",
                "/device/v1/report",
                content=b'{"a":1}',
                headers={"Content-Type": "application/json"},
            ),
            client.build_request("POST", "/device/v1/enroll", json={"token": "t"}),
        ):
            request.headers["x-signed"] = "yes"  # as the device client signs a built request
            r = await client.send(request)
            answers.append((r.status_code, r.content))
        return answers

    async def main() -> None:
        server, url = await _serve(record)
        async with server:
            timeout = httpx.Timeout(5.0)
            async with httpx.AsyncClient(
                base_url=url, transport=LightTransport(), timeout=timeout
            ) as plain:
                expected = await exchange(plain)
            async with LeanClient(url, LightTransport(), timeout) as lean:
                assert await exchange(lean) == expected
                assert expected[1] == (200, b'{"a":1}')

    asyncio.run(main())
    assert len(seen) == 6
    for plain_raw, lean_raw in zip(seen[:3], seen[3:], strict=True):
        assert parsed(lean_raw) == parsed(plain_raw)
