"""Case 10: size limits. An oversized body is refused before anything is sent upstream; an
oversized request head gets 431 (headers) or 414 (request line) in JSON; large uploads stream
through without the daemon holding them."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp

from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, port_of, raw_request


def status_and_json(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def test_oversized_body_is_413_before_any_upstream_connection(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy(server={"max_body_bytes": 1_000_000})
    port = port_of(p.url)
    # Announced by Content-Length: refused from the head, the body never read.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 5000000\r\n\r\n"
    )
    status, body = status_and_json(await raw_request(port, head + b"{" * 1000))
    assert status == 413 and "body_too_large" in json.dumps(body)
    # Chunked, no length: refused once the limit is passed.
    async with aiohttp.ClientSession() as s:

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(40):
                yield b" " * 65536

        try:
            async with s.post(p.url + "/v1/chat/completions", data=chunks()) as r:
                chunked_status = r.status
        except aiohttp.ClientError:
            chunked_status = 413  # the daemon may close while the client still sends
    assert chunked_status == 413
    assert fake.connections == 0 and fake.requests == []
    figures("upstream connections opened for oversized bodies", fake.connections)


async def test_oversized_head_is_431_or_414_in_json(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy()
    port = port_of(p.url)
    base = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
    cases = {
        "one header of 9000 bytes": base + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n{}",
        "200 headers": base + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n{}",
        "a 20000-byte path": b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    }
    got = {}
    for name, data in cases.items():
        status, body = status_and_json(await raw_request(port, data))
        got[name] = status
        assert isinstance(body.get("error"), dict), body
    assert got == {"one header of 9000 bytes": 431, "200 headers": 431, "a 20000-byte path": 414}
    assert fake.requests == []
    # The daemon is fine afterwards.
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/healthz") as r:
            assert r.status == 200
    figures("statuses", got)


async def test_concurrent_large_uploads_stream_through(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """100 concurrent 30 MiB uploads (10 of 8 MiB in the short version) reach the provider
    intact while the daemon's RSS grows by far less than what passes through it."""
    n, size = (100, 30 * 1024 * 1024) if long else (10, 8 * 1024 * 1024)
    p = await start_proxy(server={"max_body_bytes": 64 * 1024 * 1024})
    start = p.rss_mb()
    peak = start
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, p.rss_mb())
            await asyncio.sleep(0.05)

    def body(k: int) -> list[bytes]:
        """Upload k in 1 MiB pieces (views of one shared buffer: the client holds little)."""
        head = b'{"model": "text-embedding-3-small", "input": "%08d' % k
        return [head, *([MIB] * (size // len(MIB))), b'"}']

    async def upload(s: aiohttp.ClientSession, k: int) -> int:
        parts = body(k)

        async def pieces():  # type: ignore[no-untyped-def]
            for part in parts:
                yield part

        total = sum(len(x) for x in parts)
        headers = {"Content-Type": "application/json", "Content-Length": str(total)}
        async with s.post(p.url + "/v1/embeddings", data=pieces(), headers=headers) as r:
            await r.read()
            return r.status

    sampler = asyncio.ensure_future(sample())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        statuses = await asyncio.gather(*(upload(s, k) for k in range(n)))
    done.set()
    await sampler
    assert statuses == [200] * n
    expected = {hashlib.sha256(b"".join(body(k))).hexdigest() for k in range(n)}
    assert {r.digest for r in fake.requests} == expected  # every byte arrived
    growth = peak - start
    figures("uploads", f"{n} x {size >> 20} MiB")
    figures("RSS growth (MB)", f"{growth:.1f}")
    assert growth < 50


MIB = b"x" * (1 << 20)


def dense_body(nonce: int) -> bytes:
    """The attack review's body: 4 MiB of tiny JSON objects, brotli: about 100 bytes that parse
    to about 100 MB of Python objects."""
    import brotli

    start = b'{"model":"gpt-4o-mini","nonce":%d,"messages":[' % nonce
    plain = start + b"{}," * ((4194304 - len(start) - 10) // 3) + b"{}]}"
    return bytes(brotli.compress(plain, quality=5))


async def test_dense_json_bodies_are_not_parsed_into_memory(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """Twenty requests of about 100 bytes each (brotli of 4 MiB of ``{},``), held open by a
    provider that does not answer: the daemon does not parse them (too many values), holds no
    parse tree while it waits, and stays responsive."""
    p = await start_proxy(ship=False)
    rss0 = p.rss_mb()
    bodies = [dense_body(i) for i in range(20)]
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "br",
        "x-fake-fault": "hang",
    }
    async with aiohttp.ClientSession() as s:
        pending = [
            asyncio.ensure_future(s.post(p.url + "/v1/chat/completions", data=b, headers=headers))
            for b in bodies
        ]
        try:
            worst = 0.0
            for _ in range(20):
                t = asyncio.get_running_loop().time()
                async with s.get(p.url + "/healthz") as r:
                    await r.read()
                worst = max(worst, asyncio.get_running_loop().time() - t)
                await asyncio.sleep(0.05)
            arrived = sum(1 for seen in fake.requests if seen.header("Content-Encoding") == "br")
            peak = p.rss_mb()
        finally:
            for f in pending:
                f.cancel()
    figures("requests of ~100 bytes held open", f"{len(bodies)} ({len(bodies[0])} bytes each)")
    figures("RSS before / while they wait (MB)", f"{rss0:.0f} / {peak:.0f}")
    figures("slowest /healthz meanwhile (ms)", f"{worst * 1000:.0f}")
    assert arrived == 20  # relayed as sent, all waiting on the provider
    assert peak - rss0 < 60
    assert worst < 1.0


async def test_unfinished_bodies_cannot_take_the_daemons_memory(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """A fresh attack review: 200 connections each sending all but the last byte of a 4 MiB body
    (the buffered limit) and holding it took 1.6 GB (8 MiB each, without end). Bodies being read
    whole share ``server.max_buffered_total_bytes``; past it a body streams upstream."""
    budget = 64 * 1024 * 1024
    p = await start_proxy(ship=False, server={"max_buffered_total_bytes": budget})
    port = port_of(p.url)
    rss0 = p.rss_mb()
    size = 4 * 1024 * 1024
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
    )
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(100):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b" " * (size - 1))
            held.append(writer)
        for writer in held:
            await writer.drain()
        await asyncio.sleep(1.0)  # the daemon reads what was sent
        peak = p.rss_mb()
        async with aiohttp.ClientSession() as s:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                status = r.status
        metrics = await p.metrics()
    finally:
        for writer in held:
            writer.close()
    streamed = metrics.get('atlasburn_limit_hits_total{limit="buffered_bodies"}', 0.0)
    figures("unfinished 4 MiB bodies held", len(held))
    figures("RSS before / while held (MB)", f"{rss0:.0f} / {peak:.0f}")
    figures("bodies streamed for want of room", int(streamed))
    figures("a legitimate request meanwhile", status)
    assert status == 200
    assert streamed >= 100 - budget // size
    assert peak - rss0 < 2.5 * budget / 1e6 + 60  # each held body costs up to twice its size
