"""The upstream HTTP/1.1 client against raw loopback servers that send exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from proxy.http1 import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    AnswerHeadTooLarge,
    ConnectFailed,
    Origin,
    Pool,
    PoolTimeout,
    ProtocolError,
    ServerClosed,
)

from .conftest import cpu_wait, eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on loopback running ``handler`` per connection; counts connections and
    keeps the request heads it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        return head

    @property
    def origin(self) -> Origin:
        return Origin.make("http", "127.0.0.1", self.port)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        rs = RawServer(handler)
        rs.server = await asyncio.start_server(rs._serve, "127.0.0.1", 0)
        rs.port = rs.server.sockets[0].getsockname()[1]
        servers.append(rs)
        return rs

    yield start
    for rs in servers:
        assert rs.server is not None
        rs.server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool(limit=10, connect_timeout=2, read_timeout=2)
    yield p
    await p.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def test_keep_alive_reuses_one_connection_and_sends_exact_head(raw, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await rs.read_request(reader)
            writer.write(OK)

    rs = await raw(handler)
    for _ in range(3):
        r = await pool.request(
            rs.origin, "POST", "/v1/x?a=1", "X-Caf\u00e9: \u00e9t\u00e9\r\n".encode(), b"hi"
        )
        assert (r.status, await r.read()) == (200, b"{}")
        assert r.header("content-type") == "application/json"
        r.release()
    assert rs.connections == 1 and pool.idle == 1 and pool.in_use == 0
    assert rs.heads[0] == (
        f"POST /v1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{rs.port}\r\n".encode()
        + "X-Caf\u00e9: \u00e9t\u00e9\r\n".encode()
        + b"Content-Length: 2\r\n\r\n"
    )


async def test_get_without_body_sends_no_length_and_post_without_body_sends_zero(raw, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await rs.read_request(reader)
            writer.write(OK)

    rs = await raw(handler)
    for method in ("GET", "POST"):
        r = await pool.request(rs.origin, method, "/", b"", None)
        await r.read()
        r.release()
    assert b"content-length" not in rs.heads[0].lower()
    assert b"Content-Length: 0\r\n" in rs.heads[1]


async def test_chunked_stream_arrives_in_pieces_and_whole(raw, pool) -> None:
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rs.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await go.wait()
        writer.write(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        await reader.read()

    rs = await raw(handler)
    r = await pool.request(rs.origin, "POST", "/", b"", b"{}")
    assert r.content_length is None
    assert await r.readany() == b"hello"
    go.set()
    assert await r.read() == b" world"
    r.release()
    assert pool.idle == 1


async def test_body_until_close_and_connection_close_are_not_reused(raw, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rs.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    rs = await raw(handler)
    for _ in range(2):
        r = await pool.request(rs.origin, "POST", "/", b"", b"{}")
        assert await r.read() == b"all of it"
        r.release()
    assert rs.connections == 2 and pool.idle == 0


async def test_interim_answers_are_skipped_and_head_has_no_body(raw, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rs.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        await rs.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await reader.read()

    rs = await raw(handler)
    r = await pool.request(rs.origin, "POST", "/", b"", b"{}")
    assert (r.status, r.headers[0][0], await r.read()) == (200, "Content-Type", b"{}")
    r.release()
    r = await pool.request(rs.origin, "HEAD", "/", b"", None)
    assert (r.status, r.content_length, await r.read()) == (200, 1000, b"")
    r.release()
    assert pool.idle == 0  # a connection after HEAD is not trusted again


async def test_truncated_body_and_garbage_raise(raw, pool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await rs.read_request(reader)
        if b"/garbage" in head:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()

    rs = await raw(handler)
    r = await pool.request(rs.origin, "POST", "/", b"", b"{}")
    with pytest.raises(ServerClosed):
        await r.read()
    r.close()
    with pytest.raises(ProtocolError):
        await pool.request(rs.origin, "POST", "/garbage", b"", b"{}")
    assert pool.in_use == 0


async def test_silence_times_out_but_a_slow_steady_stream_does_not(raw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await rs.read_request(reader)
        if b"/silent" in head:
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, never a second silent
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
        writer.write(b"0\r\n\r\n")
        await reader.read()

    rs = await raw(handler)
    # A second of silence (not 0.3 s): this process hosts the server too, and on a busy machine
    # a 0.1 s pause of its own can stretch past 0.3 s.
    p = Pool(limit=4, connect_timeout=1, read_timeout=1.0)
    try:
        r = await p.request(rs.origin, "POST", "/steady", b"", b"{}")
        assert await r.read() == b"x" * 6
        r.release()
        loop = asyncio.get_running_loop()
        t, waited = loop.time(), cpu_wait()
        with pytest.raises(TimeoutError):
            await p.request(rs.origin, "POST", "/silent", b"", b"{}")
        # Late by no more than the time this process waited for a CPU (and a margin).
        assert 0.95 < loop.time() - t < 1.5 + cpu_wait() - waited
    finally:
        await p.close()


async def test_connect_failure_names_the_host(pool) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectFailed) as info:
        await pool.request(Origin.make("http", "127.0.0.1", port), "GET", "/", b"", None)
    assert info.value.port == port and pool.in_use == 0


async def test_reused_connection_closed_before_answering_retried_only_when_safe(raw, pool) -> None:
    """Each connection answers one request, then reads the next and closes without an answer:
    the race of a keep-alive connection the server closes as the next request arrives."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rs.read_request(reader)
        writer.write(OK)
        await rs.read_request(reader)

    rs = await raw(handler)

    async def go(method: str, headers: bytes) -> int:
        body = b"{}" if method == "POST" else None
        r = await pool.request(rs.origin, method, "/", headers, body)
        await r.read()
        r.release()
        return r.status

    assert await go("GET", b"") == 200
    assert await go("GET", b"") == 200  # conn 1 closed on it: sent again on conn 2
    assert rs.connections == 2
    with pytest.raises(ServerClosed):  # a POST may have reached the provider: never resent
        await go("POST", b"")
    assert rs.connections == 2 and len(rs.heads) == 4
    key = b"Idempotency-Key: k1\r\n"
    assert await go("POST", key) == 200  # conn 3
    assert await go("POST", key) == 200  # conn 3 closed on it: resent on conn 4
    assert rs.connections == 4 and pool.in_use == 0


async def test_limit_makes_requests_wait_for_a_connection(raw) -> None:
    release = asyncio.Event()
    active = 0
    most = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, most
        while True:
            await rs.read_request(reader)
            active += 1
            most = max(most, active)
            await release.wait()
            active -= 1
            writer.write(OK)

    rs = await raw(handler)
    p = Pool(limit=2, connect_timeout=1, read_timeout=5)

    async def one() -> bytes:
        r = await p.request(rs.origin, "POST", "/", b"", b"{}")
        data = await r.read()
        r.release()
        return data

    try:
        tasks = [asyncio.ensure_future(one()) for _ in range(6)]
        await eventually(lambda: p.in_use == 2 and active == 2)  # and no more: see `most`
        release.set()
        assert await asyncio.gather(*tasks) == [b"{}"] * 6
        assert most <= 2 and rs.connections == 2
    finally:
        await p.close()


async def test_idle_connections_are_swept(raw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await rs.read_request(reader)
            writer.write(OK)

    rs = await raw(handler)
    p = Pool(limit=4, connect_timeout=1, read_timeout=5, keepalive=0.2)
    try:
        r = await p.request(rs.origin, "POST", "/", b"", b"{}")
        await r.read()
        r.release()
        assert p.idle == 1
        await asyncio.sleep(0.5)
        assert p.idle == 0
    finally:
        await p.close()


async def test_slow_reader_pauses_the_socket(aiohttp_server) -> None:
    """Back-pressure: a reader that does not read leaves at most about HIGH_WATER buffered, the
    rest stays in the kernel and the server's writes block."""
    sent = 0

    async def big(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(2000):  # 2000 x 16 KiB = 32 MiB
            await resp.write(b"x" * 16384)
            sent += 16384
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/", big)
    server = await aiohttp_server(app)
    p = Pool(limit=4, connect_timeout=1, read_timeout=5)
    try:
        r = await p.request(Origin.make("http", "127.0.0.1", server.port), "POST", "/", b"", b"{}")
        await asyncio.sleep(0.5)
        assert sent < 16 * 1024 * 1024  # socket buffers, not the whole body
        total = 0
        while chunk := await r.readany():
            total += len(chunk)
        assert total == 2000 * 16384
        r.release()
    finally:
        await p.close()


async def test_connection_reused_after_an_answer_that_paused_reading(raw) -> None:
    """An answer over the buffer limit that arrives whole in one read pauses the socket and
    completes at once; the next request on that connection must still be read."""
    big = b"y" * (300 * 1024)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await rs.read_request(reader)
            writer.write(answer)

    rs = await raw(handler)
    p = Pool(limit=4, connect_timeout=1, read_timeout=1)
    try:
        for _ in range(3):
            r = await p.request(rs.origin, "POST", "/", b"", b"{}")
            await asyncio.sleep(0.05)  # let the whole answer arrive before reading
            assert await r.read() == big
            r.release()
        assert rs.connections == 1
    finally:
        await p.close()


@pytest.mark.parametrize(
    ("head", "fits"),
    [
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD_BYTES - 2000) + b"\r\n", True),
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n", False),
        (b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * (MAX_HEADERS - 1), True),
        (b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * (MAX_HEADERS + 1), False),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 3000 + b"HTTP/1.1 200 OK\r\n", False),
    ],
    ids=["60 KiB head", "a line over 64 KiB", "127 headers", "129 headers", "3,000 interim heads"],
)
async def test_an_answer_head_is_bounded(raw, pool, head: bytes, fits: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rs.read_request(reader)
        writer.write(head + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()

    rs = await raw(handler)
    if fits:
        r = await pool.request(rs.origin, "POST", "/", b"", b"{}")
        assert (r.status, await r.read()) == (200, b"{}")
        r.release()
    else:
        with pytest.raises(AnswerHeadTooLarge):
            await pool.request(rs.origin, "POST", "/", b"", b"{}")
    assert pool.in_use == 0


async def test_waiting_for_a_connection_ends_after_the_pool_timeout(raw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await rs.read_request(reader)
        if b"/hang" in head:
            await reader.read()
            return
        writer.write(OK)
        await writer.drain()

    rs = await raw(handler)
    p = Pool(limit=2, connect_timeout=2, read_timeout=30, pool_timeout=0.2)
    try:
        hanging = [
            asyncio.ensure_future(p.request(rs.origin, "POST", "/hang", b"", b"{}"))
            for _ in range(2)
        ]
        await asyncio.sleep(0.1)
        assert p.in_use == 2
        with pytest.raises(PoolTimeout, match="within 0.2s"):
            await p.request(rs.origin, "POST", "/", b"", b"{}")
        # A waiter that leaves passes its turn on: a freed connection still serves the next.
        waiting = asyncio.ensure_future(p.request(rs.origin, "POST", "/", b"", b"{}"))
        await asyncio.sleep(0.05)
        hanging[0].cancel()
        r = await asyncio.wait_for(waiting, 1)
        assert await r.read() == b"{}"
        r.release()
        hanging[1].cancel()
    finally:
        await p.close()
