"""Case 4: kill -9 under load, again and again. Every event committed before a kill arrives, at
most one batch more than once per kill, the spool stays sound, the daemon is ready again within
two seconds (of its own: not counting the time a busy machine kept it waiting for a CPU), and a
kill flag set before a kill is still set after it."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import aiohttp

from ..conftest import committed_fingerprints, eventually, eventually_async
from ..fakes.ingest import FakeIngest
from .conftest import (
    Figures,
    Proxy,
    StartProxy,
    Traffic,
    embedding_fingerprint,
    resume,
    suspend,
)

COMMIT_MS = 50
BATCH = 100


def ready_at(lines: list[str]) -> float:
    """When the daemon said it was ready, by its own log line's timestamp (not when this
    process, itself on a busy machine, got round to reading it)."""
    line = next(line for line in lines if "ready on" in line)
    stamp = line.split(" ", 1)[0].removeprefix("ts=")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_kill_9_again_and_again(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures, long: bool, tmp_path: Path
) -> None:
    kills = 100 if long else 20
    rng = random.Random(7)
    config = {
        "storage": {"commit_interval_ms": COMMIT_MS},
        "telemetry": {"flush_interval_ms": 100, "batch_max_events": BATCH},
    }
    must_arrive: set[str] = set()
    ready_times: list[float] = []  # start to ready, as the clock on the wall saw it
    own_times: list[float] = []  # the same without the time the daemon waited for a CPU
    nonce = 0
    settled_total = 0
    flag_checked = False
    for k in range(kills):
        t = time.time()
        p = await start_proxy(**config)
        ready = ready_at(p.process.lines)
        ready_times.append(ready - t)
        own_times.append(ready - t - p.cpu_wait())
        if k == kills // 2 + 1:  # the flag set before the last kill survived it
            async with aiohttp.ClientSession() as s:
                async with s.post(p.url + "/v1/embeddings", json={"model": "m", "input": "?"}) as r:
                    assert r.status == 429
                    assert r.headers["AtlasBurn-Guardrail"] == "operator"
            assert await resume(p.url, ingest.api_key) == 200
            flag_checked = True
        waited = p.cpu_wait()
        traffic = Traffic(p.url, rate=150, nonce=nonce).start()
        await asyncio.sleep(rng.uniform(0.3, 1.2))

        async def has_committed(p: Proxy = p) -> bool:  # a busy machine may need longer
            return (await p.metrics())["atlasburn_events_committed_total"] > 0

        await eventually_async(has_committed, within=30)
        if k == kills // 2:
            assert await suspend(p.url, ingest.api_key, 3600) == 200
        waited = p.cpu_wait() - waited
        killed_at = time.monotonic()
        p.process.proc.send_signal(signal.SIGKILL)
        await p.process.proc.wait()
        await traffic.stop()
        nonce += 1_000_000
        # What the kill found committed (read from a copy of the spool): all of it must arrive.
        committed = committed_fingerprints(p.spool, tmp_path / "copy")
        assert committed - must_arrive  # this run's commits are there
        # Answered more than one commit interval (plus a loaded commit's time) before the kill,
        # not counting the time the daemon waited for a CPU meanwhile: committed.
        before = killed_at - (COMMIT_MS + 400) / 1000 - waited
        settled = {embedding_fingerprint(n) for n, at in traffic.done.items() if at < before}
        assert settled <= committed
        settled_total += len(settled)
        must_arrive |= committed
    assert flag_checked
    p = await start_proxy(**config)
    want = must_arrive
    await eventually(lambda: want <= ingest.delivered_fingerprints(), within=60)
    await p.stop()
    counts = Counter(e["fingerprint"] for e in ingest.delivered())
    duplicates = sum(n - 1 for n in counts.values())
    db = sqlite3.connect(p.spool)
    integrity = db.execute("PRAGMA integrity_check").fetchall()
    db.close()
    figures("kills", kills)
    arrived = len(want & ingest.delivered_fingerprints())
    figures("committed events that must arrive / arrived", f"{len(want)}/{arrived}")
    figures("of them answered a commit interval + 400 ms before a kill", settled_total)
    figures("duplicates", f"{duplicates} (allowed {kills * BATCH}: one batch per kill)")
    figures(
        "ready after start (s): max / median",
        f"{max(ready_times):.2f} / {sorted(ready_times)[len(ready_times) // 2]:.2f}",
    )
    figures(
        "the same without the time it waited for a CPU (s): max / median",
        f"{max(own_times):.2f} / {sorted(own_times)[len(own_times) // 2]:.2f}",
    )
    figures("integrity_check", integrity[0][0])
    assert duplicates <= kills * BATCH
    assert integrity == [("ok",)]
    # Ready within two seconds of its own: a busy machine's run queue is not the daemon's.
    assert max(own_times) < 2.0
