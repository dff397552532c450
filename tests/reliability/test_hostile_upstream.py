"""Case 17: a hostile (or broken) upstream. What a provider sends is bounded before the daemon
holds it: a compressed answer is inflated for the meter only so far (the client still gets every
byte), and an answer head past 64 KiB or 128 headers is refused as malformed (502). Meanwhile
the daemon stays responsive: ``/healthz`` is polled throughout."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from ..fakes.provider import FakeProvider, gzip_bomb
from .conftest import Figures, Proxy, StartProxy

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Watch:
    """Until stopped: polls the daemon's /healthz every 20 ms (the slowest answer), and reads its
    RSS from /proc every 10 ms on its own (the highest), also while /healthz waits."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.worst = 0.0
        self.rss = proxy.rss_mb()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._health()), asyncio.ensure_future(self._mem())]

    async def _health(self) -> None:
        async with aiohttp.ClientSession() as s:
            while not self._stop.is_set():
                t = time.monotonic()
                async with s.get(self.proxy.url + "/healthz") as r:
                    await r.read()
                self.worst = max(self.worst, time.monotonic() - t)
                await asyncio.sleep(0.02)

    async def _mem(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, self.proxy.rss_mb())
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.mark.parametrize("fault", ["bomb", "bomb-sse"])
async def test_a_compression_bomb_is_relayed_whole_and_metered_within_bounds(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, fault: str
) -> None:
    p = await start_proxy(ship=False)
    rss0 = p.rss_mb()
    watch = Watch(p)
    bomb = gzip_bomb()
    t = time.monotonic()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(
            p.url + "/v1/chat/completions", json=CHAT, headers={"x-fake-fault": fault}
        ) as r:
            data = await r.read()
            encoding = r.headers.get("Content-Encoding")
    took = time.monotonic() - t
    await asyncio.sleep(0.2)
    await watch.stop()
    metrics = await p.metrics()
    figures(f"{fault}: answer", f"{len(bomb):,} bytes of gzip inflating to 1 GiB, in {took:.2f} s")
    figures(f"{fault}: RSS before / highest during (MB)", f"{rss0:.0f} / {watch.rss:.0f}")
    figures(f"{fault}: slowest /healthz meanwhile (ms)", f"{watch.worst * 1000:.0f}")
    assert hashlib.sha256(data).digest() == hashlib.sha256(bomb).digest()  # relayed untouched
    assert encoding == "gzip"
    assert metrics['atlasburn_limit_hits_total{limit="inflate"}'] == 1
    assert watch.rss - rss0 < 100
    assert watch.worst < 1.5


class RawUpstream:
    """A TCP server that answers every request with ``answer()``'s bytes, as they come."""

    def __init__(self, answer: Callable[[], AsyncIterator[bytes]]) -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            async for piece in self.answer():
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def long_header() -> AsyncIterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long: "
    for _ in range(20 * 16):  # 20 MiB of one header line
        yield b"a" * 65536
    yield b"\r\nContent-Length: 2\r\n\r\n{}"


async def many_headers() -> AsyncIterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    for i in range(0, 100_000, 1000):
        yield b"".join(b"X-H%d: v\r\n" % n for n in range(i, i + 1000))
    yield b"Content-Length: 2\r\n\r\n{}"


async def endless_interim() -> AsyncIterator[bytes]:
    for _ in range(200):
        yield b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 500
    yield b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize("answer", [long_header, many_headers, endless_interim])
async def test_an_oversized_answer_head_is_a_bad_gateway(
    start_proxy: StartProxy,
    figures: Figures,
    answer: Callable[[], AsyncIterator[bytes]],
) -> None:
    upstream = await RawUpstream(answer).start()
    try:
        p = await start_proxy(ship=False, providers={"openai": {"base_url": upstream.url}})
        rss0 = p.rss_mb()
        t = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.post(p.url + "/v1/chat/completions", json=CHAT) as r:
                status, body = r.status, await r.json()
        took = time.monotonic() - t
        growth = p.rss_mb() - rss0
        metrics = await p.metrics()
    finally:
        await upstream.stop()
    figures(f"{answer.__name__}: answer", f"{status} {body['error']['code']} in {took:.2f} s")
    figures(f"{answer.__name__}: RSS growth (MB)", f"{growth:.1f}")
    assert status == 502
    assert body["error"]["code"] == "upstream_bad_answer"
    assert "answer head over" in body["error"]["message"]
    assert metrics['atlasburn_limit_hits_total{limit="upstream_head"}'] == 1
    assert growth < 20


async def endless_error() -> AsyncIterator[bytes]:
    yield b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    yield b"Transfer-Encoding: chunked\r\n\r\n"
    for _ in range(64 * 16):  # 64 MiB of an error body, chunked
        yield b"10000\r\n" + b" " * 65536 + b"\r\n"
    yield b"0\r\n\r\n"


async def test_an_error_read_whole_is_bounded(start_proxy: StartProxy, figures: Figures) -> None:
    """The daemon reads a 400 to a stream it asked usage for whole (to see whether the provider
    refused ``stream_options``): only up to 4 MiB."""
    upstream = await RawUpstream(endless_error).start()
    try:
        p = await start_proxy(ship=False, providers={"openai": {"base_url": upstream.url}})
        rss0 = p.rss_mb()
        async with aiohttp.ClientSession() as s:
            async with s.post(p.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                status, body = r.status, await r.json()
        growth = p.rss_mb() - rss0
    finally:
        await upstream.stop()
    figures("a 64 MiB error to a stream asked for its usage", f"{status}, RSS +{growth:.1f} MB")
    assert (status, body["error"]["code"]) == (502, "upstream_bad_answer")
    assert "answer body over 4194304 bytes" in body["error"]["message"]
    assert growth < 30


def held_open(encoding: str) -> Callable[[], AsyncIterator[bytes]]:
    """An answer whose body inflates to 64 MiB, sent but for its last bytes, then held open."""
    import brotli

    raw = b'{"usage":{"prompt_tokens":1,"completion_tokens":1},"x":"' + b"A" * (64 << 20) + b'"}'
    packed = bytes(brotli.compress(raw, quality=5))[:-64]

    async def answer() -> AsyncIterator[bytes]:
        yield (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: " + encoding.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        yield b"%x\r\n%s\r\n" % (len(packed), packed)
        await asyncio.sleep(3600)

    return answer


async def test_answers_held_open_pin_no_more_than_they_brought(
    start_proxy: StartProxy, figures: Figures
) -> None:
    """Sixty answers of about 200 bytes of brotli, each inflating to 64 MiB and held open: what
    the meter keeps is bound to what arrived (1 MiB + 16 times it), not 16 MiB each."""
    upstream = await RawUpstream(held_open("br")).start()
    try:
        p = await start_proxy(ship=False, providers={"openai": {"base_url": upstream.url}})
        rss0 = p.rss_mb()
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> None:
                body = {**CHAT, "seed": i}
                async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                    await r.read()

            pending = [asyncio.ensure_future(one(i)) for i in range(60)]
            try:
                await asyncio.sleep(2.0)
                peak = p.rss_mb()
            finally:
                for f in pending:
                    f.cancel()
    finally:
        await upstream.stop()
    figures("60 answers held open: RSS before / with them (MB)", f"{rss0:.0f} / {peak:.0f}")
    assert peak - rss0 < 150
