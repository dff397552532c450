"""Cases 1, 2 and 3: the AtlasBurn API misbehaves. Traffic never notices, nothing is lost,
retries back off as promised, and one bad event cannot hold back the others."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import aiohttp

from ..conftest import eventually, eventually_async
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, Traffic


def starved(waited: list[tuple[float, float]], a: float, b: float) -> float:
    """At most how long the daemon waited for a CPU between ``a`` and ``b`` (monotonic), from
    samples (when, its total wait so far) taken around them."""
    before = max((w for t, w in waited if t <= a), default=waited[0][1])
    after = min((w for t, w in waited if t >= b), default=waited[-1][1])
    return max(0.0, after - before)


async def test_ingest_outage_loses_nothing_and_traffic_does_not_notice(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures, long: bool
) -> None:
    outage = 600.0 if long else 60.0
    cap = 8.0
    p = await start_proxy(
        storage={"max_spool_mb": 64},
        telemetry={"flush_interval_ms": 200, "max_backoff_seconds": cap, "batch_max_events": 200},
    )
    traffic = Traffic(p.url, rate=40).start()
    await asyncio.sleep(5)
    down_at = time.monotonic()
    ingest.down = True
    spool_peak = 0.0
    waited = [(down_at, p.cpu_wait())]  # (when, the daemon's time waiting for a CPU so far)
    while time.monotonic() - down_at < outage:
        await asyncio.sleep(1)
        spool_peak = max(spool_peak, (await p.metrics())["atlasburn_spool_bytes"])
        waited.append((time.monotonic(), p.cpu_wait()))
    up_at = time.monotonic()
    ingest.down = False
    await asyncio.sleep(5)
    await traffic.stop()
    served = traffic.served
    assert served == len(traffic.log)  # every proxied request succeeded

    await eventually(lambda: len(ingest.delivered_fingerprints()) >= served, within=60)
    drained = time.monotonic() - up_at
    delivered = ingest.delivered()
    assert len(ingest.delivered_fingerprints()) == served
    # Duplicates: at most the events of batches that were sent more than once and accepted
    # more than once (a 503 accepts nothing, so none here).
    accepted_keys = Counter(c.idempotency_key for c in ingest.calls if c.status == 200)
    allowed = sum(
        len(c.events)
        for c in ingest.calls
        if c.status == 200 and accepted_keys[c.idempotency_key] > 1
    )
    duplicates = len(delivered) - served
    assert duplicates <= allowed
    assert spool_peak <= 64 * 1024 * 1024

    async def spool_empty() -> bool:
        # The ingest has the last batch a moment before the daemon has read the answer.
        return (await p.metrics())["atlasburn_spool_pending_events"] == 0

    await eventually_async(spool_empty, within=30)

    # Backoff during the outage: each wait within [c/2, c] of c = min(cap, 1, 2, 4 ... s), the
    # time the daemon waited for a CPU meanwhile (a busy machine's, not the shipper's) aside.
    attempts = [c.at for c in ingest.calls if down_at <= c.at < up_at]
    waits = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    bad = []
    for k, (a, b) in enumerate(zip(attempts, attempts[1:], strict=False), start=1):
        ceiling = min(cap, 2.0 ** (k - 1))
        if not ceiling / 2 - 0.2 <= b - a <= ceiling + 0.5 + starved(waited, a, b):
            bad.append((k, round(b - a, 2), ceiling))
    assert bad == []
    assert max(waits) >= cap / 2 - 0.2  # the cap was reached

    before = traffic.p99(until=down_at)
    during = traffic.p99(since=down_at, until=up_at)
    figures("outage", f"{outage:.0f} s at 40 req/s; {served} requests, all 200")
    figures("delivered (distinct) / served", f"{len(ingest.delivered_fingerprints())}/{served}")
    figures("duplicates", f"{duplicates} (allowed {allowed})")
    figures("spool peak (MB)", f"{spool_peak / 1e6:.2f} (bound 67.1)")
    figures("all delivered, after recovery (s; traffic went on for 5 s of it)", f"{drained:.1f}")
    figures("retry waits during the outage (s)", [round(w, 1) for w in waits])
    figures("proxy p99 before / during the outage (ms)", f"{before:.1f} / {during:.1f}")
    assert during <= 3 * before + 10


async def test_retry_after_is_honored(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    ingest.plan = [("retry-after", 503, 3), ("retry-after", 429, 2)]
    p = await start_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 200
    waited = [(time.monotonic(), p.cpu_wait())]

    def sample() -> bool:
        waited.append((time.monotonic(), p.cpu_wait()))
        return len(ingest.delivered()) == 1

    await eventually(sample, within=15, every=0.1)
    t = [c.at for c in ingest.calls]
    waits = [t[1] - t[0], t[2] - t[1]]
    figures("waits after Retry-After 3 and 2 (s)", [round(w, 2) for w in waits])
    # Late only by as much as the daemon waited for a CPU meanwhile (a busy machine's time).
    assert 2.7 <= waits[0] <= 3.3 + starved(waited, t[0], t[1])
    assert 1.8 <= waits[1] <= 2.2 + starved(waited, t[1], t[2])


async def test_refused_key_is_loud_and_retried_once_a_minute(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures, long: bool
) -> None:
    watch = 130.0 if long else 15.0
    p = await start_proxy(atlasburn={"api_key": "abn_not_the_key_the_api_knows"})
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(p.url + "/v1/embeddings", json={"model": "m", "input": f"{i}"}) as r:
                assert r.status == 200  # traffic is not affected
    await asyncio.sleep(watch)
    calls = [c.at for c in ingest.calls]
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert calls and all(gap >= 59 for gap in gaps)
    assert len(calls) <= 1 + watch // 60
    loud = [line for line in p.process.lines if re.search(r"level=error.*HTTP 401", line)]
    assert len(loud) == 1, p.process.log
    figures(f"ingest calls in {watch:.0f} s with a refused key", len(calls))
    figures("error lines", len(loud))


async def test_one_poisoned_event_is_alone_within_three_refusals(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures
) -> None:
    ingest.refuse = lambda event: event["model"] == "poison-me"
    p = await start_proxy(telemetry={"flush_interval_ms": 1000})
    traffic = Traffic(p.url, rate=200).start()
    await asyncio.sleep(1.0)
    async with aiohttp.ClientSession() as s:  # one bad event among the others
        async with s.post(p.url + "/v1/embeddings", json={"model": "poison-me", "input": "x"}) as r:
            assert r.status == 200
    await asyncio.sleep(1.0)
    await traffic.stop()
    served = traffic.served
    await eventually(
        lambda: (
            len(ingest.delivered_fingerprints()) >= served
            and any(c.status == 422 and len(c.events) == 1 for c in ingest.calls)
        ),
        within=20,
    )
    assert all(e["model"] != "poison-me" for e in ingest.delivered())
    assert len(ingest.delivered_fingerprints()) == served
    refusals = [
        c
        for c in ingest.calls
        if c.status == 422 and any(e["model"] == "poison-me" for e in c.events)
    ]
    figures("requests", served + 1)
    figures("refused calls carrying the bad event (their sizes)", [len(c.events) for c in refusals])
    figures(
        "from the first refusal to the event alone (s)", f"{refusals[-1].at - refusals[0].at:.2f}"
    )
    assert 1 <= len(refusals) <= 3 and len(refusals[-1].events) == 1

    async def poisoned() -> bool:  # the daemon counts it once it has read the 422
        return (await p.metrics())["atlasburn_events_poisoned_total"] > 0

    await eventually_async(poisoned, within=30)
    assert (await p.metrics())["atlasburn_events_poisoned_total"] == 1
