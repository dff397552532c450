"""Cases 6 and 7: long, slow and abandoned streams. Long streams arrive whole with little added
time to first byte; long silences are not cut; a slow reader holds the provider back instead
of filling the daemon's memory; clients that leave close the upstream at once and still leave
an event."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Callable

import aiohttp

from ..conftest import cpu_wait, eventually
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider, long_stream_events
from .conftest import Figures, StartProxy

CHAT = {"model": "gpt-4o-mini", "stream": True}


def chat(n: int) -> dict[str, object]:
    return {**CHAT, "messages": [{"role": "user", "content": f"stream {n}"}]}


async def get_stream(
    s: aiohttp.ClientSession,
    url: str,
    body: dict[str, object],
    headers: dict[str, str],
    on_first: Callable[[], None] | None = None,
) -> tuple[float, bytes]:
    """(time to the first byte, the whole body); ``on_first`` is called at the first byte."""
    t0 = time.perf_counter()
    async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        first = await r.content.readany()
        ttfb = time.perf_counter() - t0
        if on_first is not None:
            on_first()
        return ttfb, first + await r.read()


async def test_long_streams_arrive_whole_with_little_added_ttfb(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """1,000 chunks 20 ms apart (20 s each), 10 at once through the daemon and 10 direct."""
    p = await start_proxy(telemetry={"flush_interval_ms": 1000})
    headers = {"x-fake-chunks": "1000", "x-fake-delay-ms": "20"}
    expected = b"".join(long_stream_events(1000))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        warm = {"x-fake-chunks": "1"}  # the first streams after start open connections
        await asyncio.gather(*(get_stream(s, p.url, chat(1000 + i), warm) for i in range(10)))
        waited = [p.cpu_wait()]

        def sample() -> None:
            waited.append(p.cpu_wait())

        via = [get_stream(s, p.url, chat(i), headers, sample) for i in range(10)]
        direct = [get_stream(s, fake.url, chat(100 + i), headers) for i in range(10)]
        results = await asyncio.gather(*via, *direct)
    # Time the daemon waited for a CPU until the last stream's first byte: a busy machine's.
    starved_ms = (max(waited) - waited[0]) * 1000
    assert all(body == expected for _, body in results)
    via_ttfb = sorted(t for t, _ in results[:10])
    direct_ttfb = sorted(t for t, _ in results[10:])
    added_p50 = (statistics.median(via_ttfb) - statistics.median(direct_ttfb)) * 1000
    added_max = (via_ttfb[-1] - direct_ttfb[-1]) * 1000
    figures("streams", "10 via the daemon, 10 direct, 1,000 chunks 20 ms apart")
    figures("added TTFB p50 (ms)", f"{added_p50:.2f}")
    figures("added TTFB p99 = max of 10 (ms)", f"{added_max:.2f}")
    figures("time the daemon waited for a CPU meanwhile (ms)", f"{starved_ms:.2f}")
    assert added_max < 20 + starved_ms


async def test_long_silence_is_not_cut(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """A gap of 120 s (3 s in the short version) after each of its four events: 480 s in all,
    past any 300 s limit, and nothing is cut."""
    gap_ms = 120_000 if long else 3_000
    p = await start_proxy()
    headers = {"x-fake-chunks": "2", "x-fake-delay-ms": str(gap_ms)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.monotonic()
        _, body = await get_stream(s, p.url, chat(1), headers)
        took = time.monotonic() - t0
    assert body == b"".join(long_stream_events(2))
    figures("stream with gaps", f"{took:.0f} s, whole")


async def test_slow_reader_holds_back_the_provider(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures, long: bool
) -> None:
    """Five clients read 1 KB/s from streams of 10 MB the provider would send at once: the
    daemon's memory stays flat (every write waits for the reader)."""
    seconds = 60 if long else 8
    p = await start_proxy()
    start = p.rss_mb()
    peak = start
    got = [0] * 5

    async def slow(i: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, read_bufsize=1024) as s:
            async with s.post(
                p.url + "/v1/chat/completions",
                json=chat(i),
                headers={"x-fake-bytes": str(10 * 1024 * 1024)},
            ) as r:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    got[i] += len(await r.content.read(1024))
                    await asyncio.sleep(1)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, p.rss_mb())
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*(slow(i) for i in range(5)))
    sampler.cancel()
    growth = peak - start
    figures("slow readers", f"5 x 1 KB/s for {seconds} s against 10 MB streams")
    figures("RSS growth (MB)", f"{growth:.1f}")
    assert all(n <= 1024 * (seconds + 1) for n in got)
    assert growth < 20


async def test_aborted_streams_close_upstream_and_leave_events(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures
) -> None:
    """100 clients leave an Anthropic stream after its first event."""
    p = await start_proxy()
    n = 100
    left_at: list[float] = []

    async def leave(i: int) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                p.url + "/v1/messages",
                json={
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 10,
                    "stream": True,
                    "messages": [{"role": "user", "content": f"leave {i}"}],
                },
                headers={"x-fake-delay-ms": "500"},
            ) as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")
                left_at.append(time.monotonic())
                waited.append(p.cpu_wait() + cpu_wait())
                r.connection.transport.abort()  # type: ignore[union-attr]

    waited: list[float] = []  # the daemon's and this process's waits for a CPU, as clients left
    await asyncio.gather(*(leave(i) for i in range(n)))
    await eventually(lambda: len(fake.stream_ends) == n, within=30)
    starved = p.cpu_wait() + cpu_wait() - max(waited)  # since the last client left (at most)
    ends = sorted(e.at for e in fake.stream_ends if e.how == "disconnected")
    assert len(ends) == n
    lag = max(ends) - max(left_at)
    # At once: within a second of the last client leaving, the time a busy machine kept the
    # daemon (or the fake provider, in this process) waiting for a CPU aside.
    assert lag < 1.0 + starved
    # One event each, with the usage seen before the client left (message_start's input).
    await eventually(lambda: len(ingest.delivered()) == n, within=10)
    events = ingest.delivered()
    assert all(e["tokens_in"] > 0 and e["status"] == 200 for e in events)
    metrics = await p.metrics()
    in_use = sum(v for k, v in metrics.items() if 'state="in_use"' in k)
    assert in_use == 0
    figures("aborted streams whose upstream closed", f"{len(ends)}/{n}")
    figures("last upstream close after the last client left (s)", f"{lag:.3f}")
    figures("events with partial usage", f"{len(events)}/{n}")
    figures("upstream connections in use afterwards", int(in_use))


async def test_sigterm_cuts_an_open_stream_at_the_grace(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    """``shutdown_grace_seconds`` is the time a stream still gets after SIGTERM, once."""
    grace = 3.0
    p = await start_proxy(ship=False, server={"shutdown_grace_seconds": grace})
    headers = {"x-fake-chunks": "600", "x-fake-delay-ms": "100"}  # a minute of stream
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/chat/completions", json=chat(0), headers=headers) as r:
            await r.content.readany()
            p.process.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                while await r.content.readany():
                    pass
            except aiohttp.ClientPayloadError:
                pass
            cut = time.monotonic() - signalled
    code = await p.process.stop(signal_it=False)
    figures(f"with shutdown_grace_seconds = {grace:g}, the stream was cut after (s)", f"{cut:.1f}")
    assert code == 0
    assert grace - 0.3 <= cut <= grace + 1.0
    assert "usage=partial" in p.process.log  # the cut stream still left its event
