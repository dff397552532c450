"""Case 5: the disk fills up. Traffic goes on; the events that cannot be kept are counted, one
for one; once there is room again, the rest are written and shipped."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..conftest import eventually, eventually_async, fill
from ..fakes.ingest import FakeIngest
from .conftest import Figures, StartProxy, Traffic

ERRORS = "atlasburn_store_write_errors_total"


async def test_disk_full_counts_every_lost_event_and_recovers(
    start_proxy: StartProxy, ingest: FakeIngest, small_fs: Path, figures: Figures, long: bool
) -> None:
    ingest.down = True  # nothing leaves the spool: it must hold everything itself
    p = await start_proxy(
        spool=small_fs / "spool.sqlite3",
        storage={"max_pending_events": 200, "commit_interval_ms": 50},
        telemetry={"max_backoff_seconds": 0.5},
    )
    traffic = Traffic(p.url, rate=100).start()
    await asyncio.sleep(2)
    filler = fill(small_fs)
    await asyncio.sleep(30 if long else 6)

    async def full() -> bool:  # on a busy machine 6 s may not be enough traffic to get there
        metrics = await p.metrics()
        return min(metrics["atlasburn_events_dropped_total"], metrics[ERRORS]) > 0

    await eventually_async(full, within=60)
    await traffic.stop()
    served = traffic.served
    assert served == len(traffic.log)  # every request succeeded with the disk full
    metrics = await p.metrics()
    dropped = int(metrics["atlasburn_events_dropped_total"])
    errors = int(metrics[ERRORS])
    assert dropped > 0 and errors > 0  # the disk really was full
    filler.unlink()
    ingest.down = False
    await eventually(lambda: len(ingest.delivered_fingerprints()) + dropped >= served, within=30)
    delivered = len(ingest.delivered_fingerprints())
    figures("requests while the disk was full, all 200", served)
    figures("delivered + dropped (counted) = served", f"{delivered} + {dropped} = {served}")
    figures("failed commits while full", errors)
    assert delivered + dropped == served
