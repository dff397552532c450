"""Store throughput: how many events per second the spool commits (WAL, synchronous=FULL, one
transaction and one fsync per group commit).

    python -m bench.store_throughput [--events 200000] [--commit-ms 100]

Events are enqueued as fast as the event loop allows (the hot path's cost), and the run ends when
the last one is committed. It prints enqueue cost per event, committed events per second, and
the transactions it took.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from proxy.adapters.base import UsageSource
from proxy.config import StorageConfig
from proxy.events import Event
from proxy.store import Store


def make(i: int) -> Event:
    return Event(
        ts="2026-11-29T01:55:24.123Z",
        provider="openai",
        model="gpt-4o-mini",
        endpoint="/chat/completions",
        status=200,
        tokens_in=1536,
        tokens_out=7,
        cost_usd=0.0001578,
        latency_ms=412,
        fingerprint="sha256:" + f"{i:064x}",
        stream=True,
        usage_source=UsageSource.REQUESTED,
        priced=True,
    )


async def main(n: int, commit_ms: int) -> None:
    events = [make(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        config = StorageConfig(
            path=Path(tmp) / "bench.sqlite3", commit_interval_ms=commit_ms, max_pending_events=n + 1
        )
        store = await Store.open(config, ship=True)
        store.start()
        t0 = time.perf_counter()
        chunk = 1000
        for start in range(0, n, chunk):
            for e in events[start : start + chunk]:
                store.enqueue(e)
            await asyncio.sleep(0)  # let the writer run, as traffic would
        enqueued = time.perf_counter() - t0
        while store.committed_total < n:  # noqa: ASYNC110 - polling a counter is the measure
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        await store.close()
    print(f"{n} events, commit interval {commit_ms} ms, synchronous=FULL")
    print(f"enqueue (hot path): {enqueued / n * 1e6:.2f} µs per event")
    print(f"committed: {n / elapsed:,.0f} events/s ({elapsed:.2f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--commit-ms", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.commit_ms))
