"""``kill -9`` of the daemon (a real process) under traffic loses no committed event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp

from proxy.adapters import ADAPTERS
from proxy.fingerprint import fingerprint

from .conftest import committed_fingerprints, cpu_wait, eventually, eventually_async
from .fakes.ingest import FakeIngest
from .fakes.provider import FakeProvider
from .process import spawn_daemon

COMMIT_MS = 100


def body(i: int) -> bytes:
    return json.dumps({"model": "text-embedding-3-small", "input": f"nonce {i}"}).encode()


def fp(raw: bytes) -> str:
    meta = ADAPTERS["openai"].describe("/v1/embeddings", json.loads(raw))
    return fingerprint("openai", meta.endpoint, meta.canonical, raw)


async def traffic(url: str, start: int, done: dict[str, float], stop: asyncio.Event) -> None:
    """Requests one after another; ``done`` gets each finished one's fingerprint and time."""
    i = start
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            raw = body(i)
            i += 1
            try:
                async with s.post(
                    url + "/v1/embeddings", data=raw, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    if r.status == 200:
                        done[fp(raw)] = time.monotonic()
            except aiohttp.ClientError:
                return  # the daemon is gone


async def committed_at_least(url: str, n: int) -> bool:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("atlasburn_events_committed_total "))
    return float(line.split()[1]) >= n


async def test_kill_9_loses_no_committed_event(
    fake: FakeProvider, ingest: FakeIngest, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[storage]\npath = "{spool}"\ncommit_interval_ms = {COMMIT_MS}\n'
        f'[atlasburn]\napi_base = "{ingest.url}"\napi_key = "{ingest.api_key}"\n'
        f"[telemetry]\nflush_interval_ms = 50\nmax_backoff_seconds = 0.2\n"
        f'[providers.openai]\nbase_url = "{fake.url}"\n'
    )
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path)}
    must_arrive: set[str] = set()
    ingest.down = True  # nothing is shipped before a crash: all must come from the spool
    for round_ in range(3):
        d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
        proc, url = d.proc, d.url
        done: dict[str, float] = {}
        stop = asyncio.Event()
        waited = cpu_wait(proc.pid)
        clients = [
            asyncio.ensure_future(traffic(url, (round_ * 4 + k) * 100_000, done, stop))
            for k in range(4)
        ]
        # Until the daemon says it has committed 20 events (by count: a busy machine is slower).
        await eventually_async(lambda u=url: committed_at_least(u, 20), within=60)
        waited = cpu_wait(proc.pid) - waited
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        stop.set()
        await asyncio.gather(*clients)
        # What the kill found committed (read from a copy of the spool) must all arrive ...
        committed = committed_fingerprints(spool, tmp_path / "copy")
        assert len(committed - must_arrive) >= 20
        # ... and it holds everything finished more than one commit interval before the kill,
        # plus the time one group commit (with its fsync) may take on a loaded machine, plus the
        # time the daemon waited for a CPU meanwhile.
        before = killed_at - (COMMIT_MS + 400) / 1000 - waited
        assert {f for f, t in done.items() if t < before} <= committed
        must_arrive |= committed
    ingest.down = False
    d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    proc, url = d.proc, d.url
    try:
        await eventually(lambda: must_arrive <= ingest.delivered_fingerprints(), within=20)
    finally:
        assert await d.stop() == 0, d.log
    db = sqlite3.connect(spool)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
