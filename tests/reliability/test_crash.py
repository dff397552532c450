"""Case 4: kill -9 under load, again and again. Every event committed before a kill arrives, at
most one batch more than once per kill, the spool stays sound, the daemon is ready again within
two seconds, and a kill flag set before a kill is still set after it."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections import Counter

import aiohttp

from ..conftest import eventually
from ..fakes.ingest import FakeIngest
from .conftest import Figures, StartProxy, Traffic, embedding_fingerprint, resume, suspend

COMMIT_MS = 50
BATCH = 100


async def test_kill_9_again_and_again(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures, long: bool
) -> None:
    kills = 100 if long else 20
    rng = random.Random(7)
    config = {
        "storage": {"commit_interval_ms": COMMIT_MS},
        "telemetry": {"flush_interval_ms": 100, "batch_max_events": BATCH},
    }
    must_arrive: set[int] = set()
    ready_times = []
    nonce = 0
    flag_checked = False
    for k in range(kills):
        t = time.monotonic()
        p = await start_proxy(**config)
        ready_times.append(time.monotonic() - t)
        if k == kills // 2 + 1:  # the flag set before the last kill survived it
            async with aiohttp.ClientSession() as s:
                async with s.post(p.url + "/v1/embeddings", json={"model": "m", "input": "?"}) as r:
                    assert r.status == 429
                    assert r.headers["AtlasBurn-Guardrail"] == "operator"
            assert await resume(p.url, ingest.api_key) == 200
            flag_checked = True
        traffic = Traffic(p.url, rate=150, nonce=nonce).start()
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        if k == kills // 2:
            assert await suspend(p.url, ingest.api_key, 3600) == 200
        killed_at = time.monotonic()
        p.process.proc.send_signal(signal.SIGKILL)
        await p.process.proc.wait()
        await traffic.stop()
        nonce += 1_000_000
        # Answered more than one commit interval (plus a loaded commit's time) before the kill:
        # committed, so it must arrive.
        settled = {n for n, at in traffic.done.items() if at < killed_at - (COMMIT_MS + 400) / 1000}
        must_arrive |= settled
    assert flag_checked
    p = await start_proxy(**config)
    want = {embedding_fingerprint(n) for n in must_arrive}
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
    figures("duplicates", f"{duplicates} (allowed {kills * BATCH}: one batch per kill)")
    figures(
        "ready after start (s): max / median",
        f"{max(ready_times):.2f} / {sorted(ready_times)[len(ready_times) // 2]:.2f}",
    )
    figures("integrity_check", integrity[0][0])
    assert duplicates <= kills * BATCH
    assert integrity == [("ok",)]
    assert max(ready_times) < 2.0
