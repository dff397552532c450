"""Case 16: clients that do not send. Every read from a client is bounded in time, and a client
that holds a connection without sending holds nothing anyone else needs: no upstream connection,
no file descriptor a legitimate client would need.

The short version uses timeouts of a few seconds (the defaults are nginx's: 60 s for a head or
a body pause, 75 s for an idle keep-alive connection); ``--long`` runs the defaults and the
issue's full numbers (1,000 silent uploads against the default pool of 1,000)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time

import aiohttp
import orjson

from ..conftest import eventually
from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, port_of

NONCE = itertools.count()
IN_USE = 'atlasburn_upstream_connections{state="in_use"'
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

# The exact bytes: a body announced (over the 4 MiB buffered limit, so it would stream
# upstream) and then never sent.
SILENT_UPLOAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5000000\r\n\r\n"
)


class Slow:
    """One connection that sends ``head`` and then ``piece`` (one byte) every ``every`` seconds
    (never, for 0), and notes when the daemon answered or closed it, and the answer's status
    line."""

    def __init__(self, port: int, head: bytes, every: float = 0.0, piece: bytes = b"x") -> None:
        self.port = port
        self.head = head
        self.every = every
        self.piece = piece
        self.opened = 0.0
        self.ended: float | None = None
        self.status_line = b""
        self.task: asyncio.Future[None] | None = None

    def start(self) -> Slow:
        self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.opened = time.monotonic()
        try:
            writer.write(self.head)
            read = asyncio.ensure_future(reader.read(65536))
            while not read.done():
                if self.every:
                    done, _ = await asyncio.wait({read}, timeout=self.every)
                    if not done:
                        try:
                            writer.write(self.piece)
                            await writer.drain()
                        except ConnectionError:
                            await asyncio.wait({read})
                else:
                    await asyncio.wait({read})
            try:
                data = read.result()
            except ConnectionError:
                data = b""
            self.status_line = data.split(b"\r\n", 1)[0]
            self.ended = time.monotonic()
        finally:
            writer.close()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def chat(url: str) -> tuple[int, float]:
    """One chat completion on a new connection (at most 10 s): (status, seconds); status 0
    when the connection failed."""
    t = time.monotonic()
    body = {**CHAT, "seed": next(NONCE)}  # each its own fingerprint: no loop
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status, time.monotonic() - t
    except (aiohttp.ClientError, TimeoutError):
        return 0, time.monotonic() - t


async def test_silent_uploads_hold_no_upstream_connection(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    slots, attackers = (1000, 1000) if long else (50, 100)
    body_timeout = 60.0 if long else 2.0
    p = await start_proxy(
        ship=False,
        server={"allowed_hosts": ["x"], "body_timeout_seconds": body_timeout},
        upstream={"max_connections": slots, "pool_timeout_seconds": 5.0},
    )
    port = port_of(p.url)
    slow = [Slow(port, SILENT_UPLOAD).start() for _ in range(attackers)]
    try:
        # Every silent upload is in (its head parsed, its handler waiting for the body).
        await asyncio.sleep(0.5 if not long else 3.0)
        metrics = await p.metrics()
        in_use = sum(v for k, v in metrics.items() if k.startswith(IN_USE))
        status, seconds = await chat(p.url)
        figures("silent uploads / upstream slots", f"{attackers} / {slots}")
        figures("upstream connections they hold", int(in_use))
        figures("a legitimate request meanwhile", f"{status} in {seconds * 1000:.0f} ms")
        assert in_use == 0
        assert status == 200
        # After the body timeout each silent upload is answered 408 and closed.
        await asyncio.wait_for(
            asyncio.gather(*(s.task for s in slow if s.task)), body_timeout + 15
        )
        answers = {s.status_line for s in slow}
        waited = sorted(s.ended - s.opened for s in slow if s.ended is not None)
        figures("their answers", sorted(answers))
        figures("closed after (s): first / last", f"{waited[0]:.1f} / {waited[-1]:.1f}")
        assert answers == {b"HTTP/1.1 408 Request Timeout"}
        assert body_timeout - 0.5 <= waited[0] and waited[-1] <= body_timeout + 10
        # A 408 is an answer, not a fault: one info line each, no "Unhandled exception" (aiohttp
        # read the rest of the body after the answer, got the timeout again and logged it).
        assert "Traceback" not in p.process.log and "Unhandled exception" not in p.process.log
    finally:
        for s in slow:
            s.stop()


async def test_a_full_pool_answers_503_in_time(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy(ship=False, upstream={"max_connections": 4, "pool_timeout_seconds": 1.0})
    async with aiohttp.ClientSession() as s:
        hanging = [
            asyncio.ensure_future(
                s.post(
                    p.url + "/v1/chat/completions",
                    json={**CHAT, "seed": i},  # four fingerprints: no loop
                    headers={"x-fake-fault": "hang"},
                )
            )
            for i in range(4)
        ]
        try:
            await asyncio.sleep(0.5)  # all four hold their connection to the provider
            t = time.monotonic()
            async with s.post(p.url + "/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
                status, retry = r.status, r.headers.get("Retry-After")
            waited = time.monotonic() - t
        finally:
            for h in hanging:
                h.cancel()
    figures("the fifth request on a pool of 4", f"{status} after {waited:.2f} s")
    assert status == 503 and retry == "1"
    assert body["error"]["code"] == "upstream_busy"  # the OpenAI error shape
    assert 0.9 <= waited < 3.0


async def test_slowloris_cannot_lock_out_clients(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """The issue's numbers: ``ulimit -n 1024``, 1,100 connections sending one byte every 5 s,
    half in the request head and half in the body."""
    timeout, every = (60.0, 5.0) if long else (4.0, 1.0)
    p = await start_proxy(
        ship=False,
        nofile=1024,
        server={"header_timeout_seconds": timeout, "body_timeout_seconds": timeout},
    )
    port = port_of(p.url)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    body = head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    slow = []
    for i in range(1100):
        slow.append(Slow(port, head if i % 2 == 0 else body, every).start())
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    try:
        await asyncio.sleep(1.0)
        results = [await chat(p.url) for _ in range(20)]
        ok = sum(1 for status, _ in results if status == 200)
        metrics = await p.metrics()
        figures("slow connections / daemon's open-file limit", "1,100 / 1,024")
        figures("client connection bound", int(metrics["atlasburn_client_connections_limit"]))
        figures("legitimate requests served meanwhile", f"{ok}/20")
        figures(
            "slow connections closed to make room",
            int(metrics['atlasburn_limit_hits_total{limit="client_connections"}']),
        )
        assert ok == 20
        await asyncio.wait_for(
            asyncio.gather(*(s.task for s in slow if s.task), return_exceptions=True), timeout + 20
        )
        heads = [s for i, s in enumerate(slow) if i % 2 == 0]
        bodies = [s for i, s in enumerate(slow) if i % 2 == 1]
        late = max(s.ended - s.opened for s in slow if s.ended is not None)
        figures("every slow connection closed within (s)", f"{late:.1f}")
        figures(
            "answers to the slow heads",
            sorted({s.status_line.decode() or "(closed to make room)" for s in heads}),
        )
        figures(
            "answers to the slow bodies",
            sorted({s.status_line.decode() or "(closed to make room)" for s in bodies}),
        )
        assert all(s.ended is not None for s in slow)
        # A slow head is closed, not answered; a body gets its 408. Either, arriving while
        # every connection was taken and none slow for a second yet, got a 503 at once.
        refused = b"HTTP/1.1 503 Service Unavailable"
        assert {s.status_line for s in heads} <= {b"", refused}
        assert {s.status_line for s in bodies} <= {b"", b"HTTP/1.1 408 Request Timeout", refused}
        assert late <= timeout + 10
        assert (await chat(p.url))[0] == 200
    finally:
        for s in slow:
            s.stop()


async def test_idle_keepalive_connections_are_closed(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    keepalive = 2.0
    p = await start_proxy(ship=False, server={"keepalive_timeout_seconds": keepalive})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    idle_from = time.monotonic()
    closed = await asyncio.wait_for(reader.read(), keepalive + 10)
    idle = time.monotonic() - idle_from
    writer.close()
    figures("an idle keep-alive connection closed after (s)", f"{idle:.1f}")
    assert closed == b""
    assert keepalive - 0.5 <= idle <= keepalive + 5


async def test_a_client_that_stops_reading_is_closed(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """A client that stops reading a stream would hold the provider's stream (and a connection
    of the pool) for as long as it likes: after ``send_timeout_seconds`` without taking a byte,
    it is closed, and so is the stream upstream."""
    send_timeout = 60.0 if long else 2.0
    p = await start_proxy(ship=False, server={"send_timeout_seconds": send_timeout})
    body = b'{"model": "gpt-4o-mini", "stream": true, "messages": []}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nx-fake-bytes: 104857600\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await reader.read(65536)  # the answer has begun; from now on nothing is read
    stopped = time.monotonic()
    try:
        while not fake.stream_ends:
            assert time.monotonic() - stopped < send_timeout + 20, "the stream was never closed"
            await asyncio.sleep(0.05)
        ended = fake.stream_ends[0].at - stopped
        # The daemon reset the connection: the kernel dropped the megabytes it still held for
        # this client instead of retrying them for minutes after the socket was closed.
        end = b"(end of stream)"
        try:
            while await reader.read(1 << 20):
                pass
        except ConnectionResetError as exc:
            end = type(exc).__name__.encode()
        figures("what the client sees once it reads again", end.decode())
        assert end == b"ConnectionResetError"
    finally:
        writer.close()
    metrics = await p.metrics()
    figures("a client that stopped reading a 100 MB stream: closed after (s)", f"{ended:.1f}")
    assert fake.stream_ends[0].how == "disconnected"
    assert send_timeout - 0.5 <= ended <= send_timeout + 10
    assert metrics['atlasburn_limit_hits_total{limit="send_timeout"}'] == 1
    assert sum(v for k, v in metrics.items() if k.startswith(IN_USE)) == 0


async def test_bodies_paced_just_above_the_minimum_cannot_lock_out_clients(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """Attack review M2: bodies sent at 1 KiB/s (twice the minimum pace, so never timed out)
    on every connection the daemon allows locked every newcomer out until they ended; a fresh
    review did the same at 20 KiB/s. When nothing is idle or slow, the slowest body is closed
    to make room, at any pace."""
    bound = 30
    p = await start_proxy(
        ship=False,
        server={"max_client_connections": bound, "body_timeout_seconds": 60},
    )
    port = port_of(p.url)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    paced = [Slow(port, head, 0.25, b" " * 5000).start() for _ in range(bound)]
    try:
        await asyncio.sleep(2.0)  # each has averaged 20 KB/s for over a second
        results = await asyncio.gather(*(chat(p.url) for _ in range(5)))
        metrics = await p.metrics()
        closed = sum(1 for s in paced if s.ended is not None)
        figures("paced bodies (20 KB/s) / connection bound", f"{bound} / {bound}")
        figures("legitimate requests served meanwhile", [status for status, _ in results])
        figures("paced bodies closed to make room", closed)
        assert [status for status, _ in results] == [200] * 5
        assert closed == 5
        assert metrics['atlasburn_limit_hits_total{limit="client_connections"}'] == 5
    finally:
        for s in paced:
            s.stop()


async def test_a_connection_past_the_bound_gets_a_503_when_every_one_is_busy(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """Every connection has a request the provider is answering: none is closed for room, and
    the newcomer gets a 503 with Retry-After (the SDKs retry it), not a reset."""
    bound = 10
    p = await start_proxy(ship=False, server={"max_client_connections": bound})
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as s:
        hung = [
            asyncio.ensure_future(
                s.post(
                    p.url + "/v1/chat/completions",
                    json={**CHAT, "seed": next(NONCE)},
                    headers={"x-fake-fault": "hang"},
                )
            )
            for _ in range(bound)
        ]
        try:
            await eventually(lambda: len(fake.requests) >= bound, within=10)
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            figures("the newcomer's answer", head.split(b"\r\n")[0])
            assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
            assert b"Retry-After: 1" in head.split(b"\r\n")
            assert orjson.loads(body)["error"]["code"] == "too_many_connections"
            assert not any(h.done() for h in hung)  # none of the busy ones was closed
        finally:
            for h in hung:
                h.cancel()


async def test_clients_that_take_no_answers_cannot_lock_out_clients(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """A fresh attack review: connections that read none of their answers (a small receive
    buffer; here, 100 MB streams) were busy until send_timeout, and on every connection the
    bound allows they locked newcomers out. Now they are closed to make room first."""
    bound = 20
    p = await start_proxy(ship=False, server={"max_client_connections": bound})
    port = port_of(p.url)

    def stream(seed: int) -> bytes:  # each its own fingerprint: no loop
        body = b'{"model": "gpt-4o-mini", "stream": true, "messages": [], "seed": %d}' % seed
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nx-fake-bytes: 104857600\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    stuck: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    try:
        for i in range(bound):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, stream(i))
            stuck.append(sock)
        await asyncio.sleep(2.0)  # their answers have filled the buffers for over a second
        results = await asyncio.gather(*(chat(p.url) for _ in range(5)))
    finally:
        for sock in stuck:
            sock.close()
    metrics = await p.metrics()
    figures("connections reading none of their answers / bound", f"{bound} / {bound}")
    figures("legitimate requests served meanwhile", [status for status, _ in results])
    assert [status for status, _ in results] == [200] * 5
    assert metrics['atlasburn_limit_hits_total{limit="client_connections"}'] >= 5
