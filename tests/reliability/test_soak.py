"""Case 15: a soak with the AtlasBurn API flapping. 30 minutes with ``--long`` (the API down
for 2 of every 4 minutes); 80 s in the short version (down 10 s of every 20). Memory does not
creep, descriptors and sockets do not leak, and the spool empties after every outage."""

from __future__ import annotations

import asyncio
import time

from ..conftest import eventually
from ..fakes.ingest import FakeIngest
from .conftest import Figures, StartProxy, Traffic


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


async def test_soak_with_a_flapping_api(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures, long: bool
) -> None:
    total, period = (1800.0, 240.0) if long else (80.0, 20.0)
    p = await start_proxy(telemetry={"flush_interval_ms": 200, "max_backoff_seconds": 2.0})
    traffic = Traffic(p.url, rate=100).start()
    await asyncio.sleep(5)  # warm: pools, caches
    start = time.monotonic()
    fds0 = p.open_fds()
    samples: list[tuple[float, float]] = []
    drained_after: list[float] = []
    while time.monotonic() - start < total:
        phase_start = time.monotonic()
        ingest.down = True
        while time.monotonic() - phase_start < period / 2:
            samples.append((time.monotonic() - start, p.rss_mb()))
            await asyncio.sleep(1)
        ingest.down = False
        up_at = time.monotonic()
        # The backlog of the outage drains while traffic goes on.
        await eventually(
            lambda: len(ingest.delivered_fingerprints()) >= traffic.served - 300, within=period
        )
        drained_after.append(time.monotonic() - up_at)
        while time.monotonic() - phase_start < period:
            samples.append((time.monotonic() - start, p.rss_mb()))
            await asyncio.sleep(1)
    await traffic.stop()
    await eventually(lambda: len(ingest.delivered_fingerprints()) == traffic.served, within=30)
    await asyncio.sleep(1)
    metrics = await p.metrics()
    late = [s for s in samples if s[0] >= total / 2]  # after the first half: steady state
    mb_per_10_min = slope(late) * 600
    fds1 = p.open_fds()
    await asyncio.sleep(1)  # the /metrics call's own connection has just been closed
    close_wait = p.close_wait()
    figures("duration / requests", f"{total:.0f} s / {traffic.served}")
    figures(
        "RSS (MB): first / last / slope over the second half per 10 min",
        f"{samples[0][1]:.1f} / {samples[-1][1]:.1f} / {mb_per_10_min:+.2f}",
    )
    figures("open fds: start / end", f"{fds0} / {fds1}")
    figures("CLOSE_WAIT sockets at the end", close_wait)
    figures("backlog drained after each outage (s)", [round(x, 1) for x in drained_after])
    assert traffic.served == len(traffic.log)
    assert metrics["atlasburn_spool_pending_events"] == 0
    assert close_wait == 0
    assert fds1 <= fds0 + 5
    if long:
        assert mb_per_10_min < 1.0
    else:  # too short for a slope to mean much: bound the growth instead
        assert samples[-1][1] - min(y for _, y in late) < 5.0
