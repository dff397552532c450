"""The fleet's part of the benchmark (``python -m bench --fleet``): a local Redis, the daemon in
fleet mode beside the standalone daemon, and how fast a suspension reaches another daemon.

- ``RedisServer``: ``redis-server`` on a free loopback port, persistence off, pinned to the CPU
  of the provider and the client (it is a service the daemon talks to, not the daemon), stopped
  by its PID. ``RedisStats`` reads ``INFO``: commands (those run inside a script included), the
  calls per command, Redis's CPU time and memory.
- With ``--fleet`` every request scenario also runs ``atlasburn-proxy+fleet``: the same daemon
  with ``[fleet] redis_url`` set. Both daemons run with the spend cap on (a cap never reached),
  so that the fleet's daemon flushes spend to Redis as well as sending every answered request's
  occurrence (each request carries a unique nonce: a distinct fingerprint, never a loop).
  ``fleet_table`` sets the two daemons side by side.
- ``propagation``: two daemons in fleet mode, A and B. A suspension posted to A's local API;
  B is polled with chat requests until one is refused (429); then the suspension is cleared on
  A and B polled until it answers again. Repeated, with a random pause between, so the samples
  fall at every phase of the daemons' background work.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as redis

from . import by_scenario, markdown
from .procs import API_KEY, OTHER_CPU, free_port, spawn, spawn_daemon, wait_port
from .procs import write_daemon_config as write_config

KEY_PREFIX = "bench:"
ORG = "org_local"
# Far above what a bench run spends: spend is counted and flushed, never refused.
SPEND_CAP = "[guardrails.spend_cap]\nenabled = true\nmax_usd_per_hour = 1000000.0\n"


def fleet_config(url: str) -> str:
    return f'[fleet]\nredis_url = "{url}"\nkey_prefix = "{KEY_PREFIX}"\n'


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 (no RDB, no AOF); ``stop`` ends it by PID."""

    def __init__(self, tmp: Path, cpu: str = OTHER_CPU) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp / f"redis-{self.port}"
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> RedisServer:
        self.proc = self._spawn()
        await wait_port(self.port)
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.dir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            ["taskset", "-c", self.cpu, "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    async def stats(self) -> RedisStats:
        async with self.client() as c:
            info = await c.info("all")
        calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.startswith("cmdstat_")
        }
        return RedisStats(
            commands=int(info["total_commands_processed"]),
            cpu=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            calls=calls,
            used_memory=int(info["used_memory"]),
            keys=sum(int(v["keys"]) for k, v in info.items() if re.fullmatch(r"db\d+", k)),
            at=time.perf_counter(),
        )

    async def reset(self) -> None:
        """Empty Redis and zero its counters (between runs)."""
        async with self.client() as c:
            await c.flushall()
            await c.config_resetstat()


@dataclass
class RedisStats:
    commands: int  # total_commands_processed: what clients sent and what scripts ran
    cpu: float  # seconds, user + sys
    calls: dict[str, int]  # per command, from INFO commandstats
    used_memory: int
    keys: int
    at: float

    def minus(self, before: RedisStats) -> RedisStats:
        """The counters' growth since ``before`` (memory and keys: as now)."""
        return RedisStats(
            commands=self.commands - before.commands,
            cpu=self.cpu - before.cpu,
            calls={k: v - before.calls.get(k, 0) for k, v in self.calls.items()},
            used_memory=self.used_memory,
            keys=self.keys,
            at=self.at - before.at,
        )

    def merge(self, other: RedisStats) -> RedisStats:
        """Two deltas added (two rounds)."""
        calls = dict(self.calls)
        for k, v in other.calls.items():
            calls[k] = calls.get(k, 0) + v
        return RedisStats(
            self.commands + other.commands,
            self.cpu + other.cpu,
            calls,
            max(self.used_memory, other.used_memory),
            max(self.keys, other.keys),
            self.at + other.at,
        )


async def metric(url: str, name: str) -> float | None:
    """One value from the daemon's /metrics (None when absent)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


async def wait_connected(url: str, seconds: float = 10.0) -> None:
    """Until the daemon at ``url`` says it is connected to Redis."""
    deadline = time.monotonic() + seconds
    while await metric(url, "atlasburn_fleet_connected") != 1.0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: not connected to Redis after {seconds:g}s")
        await asyncio.sleep(0.05)


async def fleet_spend(server: RedisServer) -> float:
    """The fleet's spend in the last hour, as the daemons flushed it to Redis (USD)."""
    async with server.client() as c:
        value = await c.hget(f"{KEY_PREFIX}spend:{ORG}", "hour")
    return float(value or 0)


def fleet_table(results: list[Any], notes: dict[str, str]) -> str:
    """The standalone daemon and the fleet's side by side, per scenario (``results``: the
    bench's Results; ``notes``: a line per scenario, printed under the table)."""
    head = [
        "scenario", "standalone req/s", "fleet req/s", "fleet/standalone", "rounds",
        "standalone p50 ms", "fleet p50 ms", "+p50 ms", "CPU µs/req", "Redis cmds/req",
        "EVALSHA/req", "Redis CPU µs/req",
    ]  # fmt: skip
    rows = [head]
    for name, group in by_scenario(results).items():
        alone, fleet = group.get("atlasburn-proxy"), group.get(FLEET_TARGET)
        if alone is None or fleet is None:
            continue
        ratios = [
            f / a
            for (a, _), (f, _) in zip(
                alone.rounds or [(alone.rps, None)],
                fleet.rounds or [(fleet.rps, None)],
                strict=True,
            )
        ]
        stats: RedisStats | None = fleet.redis
        n = len(fleet.latencies)
        rows.append(
            [
                name,
                f"{alone.rps:,.0f}",
                f"{fleet.rps:,.0f}",
                f"{fleet.rps / alone.rps:.3f}",
                " ".join(f"{x:.2f}" for x in ratios),
                f"{alone.p50_ms:.3f}",
                f"{fleet.p50_ms:.3f}",
                f"{fleet.p50_ms - alone.p50_ms:+.3f}",
                f"{alone.cpu_us:,.0f} → {fleet.cpu_us:,.0f}"
                if alone.cpu_us and fleet.cpu_us
                else "",
                f"{stats.commands / n:.2f}" if stats else "",
                f"{stats.calls.get('evalsha', 0) / n:.2f}" if stats else "",
                f"{stats.cpu / n * 1e6:.1f}" if stats else "",
            ]
        )
    out = markdown(rows)
    lines = [f"{name}: {note}" for name, note in notes.items()]
    return out + ("\n\n" + "\n".join(lines) if lines else "")


FLEET_TARGET = "atlasburn-proxy+fleet"


# ---------------------------------------------------------------------- propagation


@dataclass
class Propagation:
    suspend_ms: list[float]  # from the POST sent to A until B's first 429 came back
    sent_ms: list[float]  # from the POST sent to A until that refused request was sent to B
    published_ms: list[float]  # from the POST sent to A until the flag was heard on the channel
    answered_ms: list[float]  # A's answer to the POST
    clear_ms: list[float]  # from the DELETE sent to A until B's first 200 came back
    poll_ms: list[float]  # one poll of B (a chat request): the resolution
    missed: int  # B never refused within the timeout


async def propagation(tmp: Path, server: RedisServer, repeats: int) -> Propagation:
    """Suspend on A, poll B until it refuses; clear on A, poll B until it serves; ``repeats``
    times. Two fleet daemons, a fake provider, ``server`` shared."""
    p_port, a_port, b_port = (free_port() for _ in range(3))
    procs = [
        spawn(OTHER_CPU, "-m", "bench.servers", "provider", "--port", str(p_port)),
    ]
    provider = f"http://127.0.0.1:{p_port}"
    extra = SPEND_CAP + fleet_config(server.url)
    urls = []
    for label, port in (("a", a_port), ("b", b_port)):
        where = tmp / "propagation"
        config = write_config(where / f"{label}.toml", port, provider, None, True, extra)
        procs.append(spawn_daemon(config, where / f"state-{label}"))
        urls.append(f"http://127.0.0.1:{port}")
    a, b = urls
    result = Propagation([], [], [], [], [], [], 0)
    try:
        for port in (p_port, a_port, b_port):
            await wait_port(port)
        for url in urls:
            await wait_connected(url)
        # A listener of the fleet's channel in the bench: when the flag was published.
        heard: list[tuple[float, str]] = []
        async with server.client() as client, client.pubsub() as pubsub:
            await pubsub.subscribe(f"{KEY_PREFIX}fleet:{ORG}")
            listener = asyncio.ensure_future(_listen(pubsub, heard))
            try:
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0)
                ) as session:
                    await _measure(session, a, b, repeats, result, heard)
            finally:
                listener.cancel()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    return result


async def _listen(pubsub: Any, heard: list[tuple[float, str]]) -> None:
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            state = json.loads(message["data"]).get("state")
            heard.append((time.perf_counter(), str(state)))


async def _measure(
    session: aiohttp.ClientSession,
    a: str,
    b: str,
    repeats: int,
    result: Propagation,
    heard: list[tuple[float, str]],
) -> None:
    headers = {"AtlasBurn-API-Key": API_KEY, "Content-Type": "application/json"}
    suspend = json.dumps(
        {"org_id": ORG, "action": "suspend", "layer": "bench", "ttl_seconds": 60, "reason": "bench"}
    )
    clear = json.dumps({"org_id": ORG, "reason": "bench"})
    nonce = iter(range(10**9))

    async def poll_b() -> tuple[int, float]:
        """B's answer to a chat request, and when the request was sent."""
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n{next(nonce)}"}]}
        )
        t = time.perf_counter()
        async with session.post(
            b + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            await r.read()
            result.poll_ms.append((time.perf_counter() - t) * 1000)
            return r.status, t

    async def until(status: int, t0: float, give_up: float = 2.0) -> tuple[float, float] | None:
        """Poll B until it answers ``status``: (ms from t0 until that answer came back, ms
        from t0 until that request was sent); None after ``give_up`` seconds."""
        while True:
            got, sent = await poll_b()
            elapsed = time.perf_counter() - t0
            if got == status:
                return elapsed * 1000, (sent - t0) * 1000
            if got not in (200, 429):
                raise RuntimeError(f"B answered {got}")
            if elapsed > give_up:
                return None

    async def call(method: str, data: str) -> float:
        t = time.perf_counter()
        async with session.request(
            method, a + "/api/guardrails/enforce", data=data, headers=headers
        ) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"A: {method} enforce answered {r.status}")
        return (time.perf_counter() - t) * 1000

    for _ in range(20):  # warm-up: connections open, both daemons serving
        if (await poll_b())[0] != 200:
            raise RuntimeError("B refuses before the first suspension")
    for _ in range(repeats):
        await asyncio.sleep(random.uniform(0.01, 0.06))
        t0 = time.perf_counter()
        posted = asyncio.ensure_future(call("POST", suspend))
        seen = await until(429, t0)
        result.answered_ms.append(await posted)
        if seen is None:
            result.missed += 1
        else:
            result.suspend_ms.append(seen[0])
            result.sent_ms.append(seen[1])
            published = [t for t, state in heard if t >= t0 and state == "suspended"]
            if published:
                result.published_ms.append((published[0] - t0) * 1000)
        await asyncio.sleep(random.uniform(0.01, 0.06))
        t0 = time.perf_counter()
        deleted = asyncio.ensure_future(call("DELETE", clear))
        seen = await until(200, t0)
        await deleted
        if seen is None:
            raise RuntimeError("B still refuses 2 s after the clear on A")
        result.clear_ms.append(seen[0])


def propagation_table(p: Propagation) -> str:
    def pct(xs: list[float], q: float) -> float:
        data = sorted(xs)
        return data[min(len(data) - 1, int(q * len(data)))]

    rows = [["from A to B", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"]]
    for label, xs in (
        ("suspend: POST to A → B's first 429 back", p.suspend_ms),
        ("suspend: POST to A → that request sent to B", p.sent_ms),
        ("suspend: POST to A → flag published by A", p.published_ms),
        ("clear: DELETE to A → B's first 200 back", p.clear_ms),
        ("A's answer to the POST", p.answered_ms),
    ):
        if xs:
            rows.append(
                [label, str(len(xs)), *(f"{pct(xs, q):.2f}" for q in (0.5, 0.9, 0.99)),
                 f"{max(xs):.2f}"]
            )  # fmt: skip
    return (
        markdown(rows)
        + "\n\nB is polled back to back: B had the flag before the first refused request was"
        " sent (its kill check comes a moment later), and had not before the one sent one poll"
        f" earlier; one poll (a chat request) takes {statistics.median(p.poll_ms):.2f} ms"
        f" (median). Suspensions B never refused within 2 s: {p.missed}."
    )
