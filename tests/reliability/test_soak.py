"""Case 15: a soak with the AtlasBurn API flapping. 30 minutes with ``--long`` (the API down
for 2 of every 4 minutes); 80 s in the short version (down 10 s of every 20). Memory does not
creep, descriptors and sockets do not leak, and the spool empties after every outage."""

from __future__ import annotations

import asyncio
import time

from ..conftest import cpu_wait, eventually, eventually_async
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, Traffic, embedding_fingerprint, port_of

IN_FLIGHT = 16


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


async def test_soak_with_a_flapping_api(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures, long: bool
) -> None:
    total, period = (1800.0, 240.0) if long else (80.0, 20.0)
    p = await start_proxy(telemetry={"flush_interval_ms": 200, "max_backoff_seconds": 2.0})
    port = port_of(p.url)
    # At most 16 requests wait for an answer at once: on a busy machine the rate drops instead
    # of hundreds of requests piling up, whose buffers the memory bound would count.
    traffic = Traffic(p.url, rate=100, max_in_flight=IN_FLIGHT).start()
    await eventually(lambda: traffic.served >= 500, within=120)  # warm: pools, caches
    files0 = p.other_fds()
    start = time.monotonic()
    samples: list[tuple[float, float]] = []
    drained_after: list[float] = []
    starved: list[float] = []
    fingerprints: dict[int, str] = {}

    def answered_before(t: float) -> set[str]:
        for n, at in list(traffic.done.items()):
            if at < t and n not in fingerprints:
                fingerprints[n] = embedding_fingerprint(n)
        return {fingerprints[n] for n, at in list(traffic.done.items()) if at < t}

    while time.monotonic() - start < total:
        phase_start = time.monotonic()
        ingest.down = True
        while time.monotonic() - phase_start < period / 2:
            samples.append((time.monotonic() - start, p.rss_mb()))
            await asyncio.sleep(1)
        ingest.down = False
        up_at, waited = time.monotonic(), p.cpu_wait() + cpu_wait()
        # The outage's backlog (every request answered before the API came back) drains while
        # traffic goes on, within a period but for the time the daemon (or this process, which
        # hosts the fake API) waited for a CPU; the next outage waits for it.
        backlog = answered_before(up_at)
        await eventually(lambda b=backlog: b <= ingest.delivered_fingerprints(), 120, every=0.2)
        drained_after.append(time.monotonic() - up_at)
        starved.append(p.cpu_wait() + cpu_wait() - waited)
        while time.monotonic() - phase_start < period:
            samples.append((time.monotonic() - start, p.rss_mb()))
            await asyncio.sleep(1)
    await traffic.stop()
    served = answered_before(float("inf"))
    await eventually(lambda: ingest.delivered_fingerprints() == served, within=120, every=0.2)

    async def spool_empty() -> bool:
        # The ingest has the last batch a moment before the daemon has read the answer.
        return (await p.metrics())["atlasburn_spool_pending_events"] == 0

    await eventually_async(spool_empty, within=30)

    # Descriptors: once the clients are gone (and the daemon has closed their connections: no
    # CLOSE_WAIT), every TCP socket left is an upstream connection its pool accounts for, or
    # one to the ingest, and nothing else (files, pipes) was opened meanwhile.
    def clients_gone() -> bool:
        return not [s for s in p.tcp() if s[0] == port and s[2] != "0A"]

    await eventually(clients_gone, within=30, every=0.1)
    metrics = await p.metrics()
    await eventually(clients_gone, within=30, every=0.1)  # /metrics' own connection, too
    pooled = sum(v for k, v in metrics.items() if k.startswith("atlasburn_upstream_connections{"))
    sockets = p.tcp()
    upstream = [s for s in sockets if s[1] == port_of(fake.url)]
    to_ingest = [s for s in sockets if s[1] == port_of(ingest.url)]
    others = [s for s in sockets if s not in upstream and s not in to_ingest and s[2] != "0A"]
    files1 = p.other_fds()
    close_wait = p.close_wait()
    late = [s for s in samples if s[0] >= total / 2]  # after the first half: steady state
    mb_per_10_min = slope(late) * 600
    figures("duration / requests", f"{time.monotonic() - start:.0f} s / {len(served)}")
    figures(
        "RSS (MB): first / last / slope over the second half per 10 min",
        f"{samples[0][1]:.1f} / {samples[-1][1]:.1f} / {mb_per_10_min:+.2f}",
    )
    figures(
        "descriptors at the end: upstream (pool's count) / to the ingest / other sockets",
        f"{len(upstream)} ({pooled:.0f}) / {len(to_ingest)} / {len(others)}",
    )
    figures("descriptors but TCP sockets: after warm-up / end", f"{files0} / {files1}")
    figures("CLOSE_WAIT sockets at the end", close_wait)
    figures("backlog drained after each outage (s)", [round(x, 1) for x in drained_after])
    figures("of which waiting for a CPU (s)", [round(x, 1) for x in starved])
    assert len(served) == traffic.served == len(traffic.log)  # every request succeeded
    assert close_wait == 0
    assert all(d - w < period for d, w in zip(drained_after, starved, strict=True))
    # No upstream socket the pool has lost track of, and no more than were ever needed at once:
    # 16 requests in flight, and as many the client has its answer to but the daemon has yet to
    # hand its connection back (it does so right after the last byte).
    assert len(upstream) == pooled <= 2 * IN_FLIGHT
    assert len(to_ingest) <= 2 and others == []
    assert files1 == files0
    if long:
        assert mb_per_10_min < 1.0
    else:  # too short for a slope to mean much: bound the growth instead
        assert samples[-1][1] - min(y for _, y in late) < 5.0
