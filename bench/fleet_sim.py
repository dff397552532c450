"""A fleet of N daemons simulated in one process against one real Redis.

    python -m bench.fleet_sim                                # N = 1, 10, 50, 100, 200; 10 s each
    python -m bench.fleet_sim --members 10 100 --seconds 5 --rate 20
    python -m bench.fleet_sim --repeat-share 0 --fleet-loops 2   # a fixed number of loops

Each member is what a daemon runs, without HTTP: a ``KillSwitch``, a ``LoopGuard``, a
``SpendCap`` (on, with a cap never reached) and the ``Fleet`` that keeps them in step through
Redis, each member with its own connections. One ticker drives them, round robin, at ``--rate``
requests per second each, calling what the relay calls for a request the provider answers:
``kill.check()``, ``loop.check(fp, headers)`` (and, for a fingerprint the fleet holds two short
of the threshold, ``await loop.check_fleet(fp, headers)``: a read from Redis), then
``loop.record(fp)`` and ``spend.add(usd)``. (The relay also holds each answer until Redis has
counted its occurrence; a member has no answer to hold.)

Fingerprints are distinct, except a share of requests (``--repeat-share``) that repeat one:
a repeated fingerprint is sent ``threshold - 1`` times in all, by whichever members come next,
so the fleet's count reaches ``threshold - 1`` and never trips; Redis publishes it to every
member at ``threshold - 2`` and ``threshold - 1``. With that share fixed, the number of
fingerprints about to trip grows with the fleet's traffic; ``--fleet-loops L`` instead starts L
repeated fingerprints per second across the whole fleet, whatever N (a fleet with a fixed
number of looping agents).

Per N, after a second of warm-up, over ``--seconds``: Redis commands per second (INFO's
``total_commands_processed``, which counts the commands scripts run too), EVALSHA, SCRIPT
EXISTS, ZCOUNT and PUBLISH per second, Redis's CPU, messages each member received per second
(and the repeated fingerprints completed per second), Redis's memory and keys at the end (and
the memory a full window would hold at this rate), and this process's CPU per request, from
which a run of the same members without a fleet (``--baseline-seconds``) is subtracted: the
fleet's own cost. Redis runs on CPU 0 and the simulation on CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import markdown
from bench.fleet import RedisServer, RedisStats
from proxy.config import FleetConfig, LoopDetectorConfig, Secret, SpendCapConfig
from proxy.guardrails import KillSwitch, LoopGuard, SpendCap
from proxy.guardrails.fleet import Fleet

ORG = "org_local"
HEADERS: dict[str, str] = {}
TICK_SECONDS = 0.01


class Member:
    """One simulated daemon: its guardrails, and (with ``url``) its fleet sync."""

    def __init__(
        self, loop_config: LoopDetectorConfig, hourly_cap: float, url: str | None, prefix: str
    ) -> None:
        self.kill = KillSwitch(ORG, None)
        self.loop = LoopGuard(loop_config, self.kill)
        self.spend = SpendCap(SpendCapConfig(enabled=True, max_usd_per_hour=hourly_cap))
        self.fleet = (
            None
            if url is None
            else Fleet(
                FleetConfig(redis_url=Secret(url), key_prefix=prefix),
                ORG,
                self.kill,
                self.loop,
                self.spend,
            )
        )
        self.refused = 0

    def request(self, fp: str, usd: float) -> Coroutine[Any, Any, None] | None:
        """What the relay does for a request the provider answers (2xx); for a fingerprint
        the fleet holds two short of the threshold, the rest as a coroutine (the relay asks
        Redis for its count before letting it through)."""
        if self.kill.check() is not None or self.loop.check(fp, HEADERS) is not None:
            self.refused += 1
            return None
        if self.fleet is not None and self.fleet.warm(fp):
            return self._warm(fp, usd)
        self._answered(fp, usd)
        return None

    async def _warm(self, fp: str, usd: float) -> None:
        if await self.loop.check_fleet(fp, HEADERS) is not None:
            self.refused += 1
        else:
            self._answered(fp, usd)

    def _answered(self, fp: str, usd: float) -> None:
        # The relay holds the answer until the returned future is done (bounded): a member
        # has no answer to hold.
        self.loop.record(fp)
        self.spend.add(usd)


@dataclass
class Run:
    members: int
    seconds: float
    requests: int
    cpu: float  # this process, seconds
    late_ms: float  # the ticker's worst lateness: did the simulation keep up?
    redis: RedisStats | None = None
    key_bytes: float = 0.0  # MEMORY USAGE of a loop key, mean of a sample
    received: int = 0  # messages, all members
    sent: int = 0
    groups: int = 0  # repeated fingerprints completed (each reached threshold - 1)
    hot: float = 0.0  # fingerprints about to trip each member remembers, mean
    refused: int = 0
    dropped: int = 0
    reconnects: int = 0
    disconnected: int = 0


class Traffic:
    """The requests: distinct fingerprints, and repeated ones, each sent ``threshold - 1``
    times; ``repeat`` is the probability that a request is one of those."""

    def __init__(self, threshold: int, repeat: float) -> None:
        self.threshold = threshold
        self.repeat = repeat
        self.pending: deque[tuple[str, int]] = deque()  # (fingerprint, occurrences to send)
        self.groups = 0

    def next(self) -> str:
        if random.random() >= self.repeat:
            return _fp()
        fp, left = self.pending.popleft() if self.pending else (_fp(), self.threshold - 1)
        if left > 1:
            self.pending.appendleft((fp, left - 1))
        else:
            self.groups += 1
        return fp


def _fp() -> str:
    return "sha256:" + random.getrandbits(256).to_bytes(32, "big").hex()


async def drive(
    members: list[Member], rate: float, seconds: float, traffic: Traffic, usd: float
) -> tuple[int, float]:
    """``rate`` requests per second per member, round robin, for ``seconds``; (requests, the
    ticker's worst lateness in ms)."""
    n = len(members)
    issued = 0
    waiting: set[asyncio.Task[None]] = set()
    late = 0.0
    start = time.perf_counter()
    tick = 0
    while True:
        tick += 1
        now = time.perf_counter()
        elapsed = now - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate * n)
        while issued < due:
            rest = members[issued % n].request(traffic.next(), usd)
            if rest is not None:
                task = asyncio.ensure_future(rest)
                waiting.add(task)
                task.add_done_callback(waiting.discard)
            issued += 1
        wake = start + tick * TICK_SECONDS
        late = max(late, (time.perf_counter() - wake) * 1000)
        await asyncio.sleep(max(0.0, wake - time.perf_counter()))
    if waiting:
        await asyncio.gather(*waiting)
    return issued, late


async def simulate(args: argparse.Namespace, n: int, server: RedisServer | None) -> Run:
    """One run of ``n`` members (with a fleet when ``server`` is given)."""
    loop_config = LoopDetectorConfig(threshold=args.threshold, window_seconds=args.window)
    url = server.url if server is not None else None
    members = [Member(loop_config, 1e9, url, f"sim{n}:") for _ in range(n)]
    repeat = args.repeat_share + args.fleet_loops * (args.threshold - 1) / (n * args.rate)
    traffic = Traffic(args.threshold, min(repeat, 1.0))
    if server is not None:
        await server.reset()
        for m in members:
            assert m.fleet is not None
            m.fleet.start()
        deadline = time.monotonic() + 20
        while not all(m.fleet is not None and m.fleet.connected for m in members):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} members: not all connected to Redis after 20 s")
            await asyncio.sleep(0.05)
    try:
        await drive(members, args.rate, 1.0, traffic, args.usd)  # warm-up: scripts loaded
        seconds = args.seconds if server is not None else args.baseline_seconds
        before = await server.stats() if server is not None else None
        received0 = sum(m.fleet.messages_received for m in members if m.fleet)
        sent0 = sum(m.fleet.messages_sent for m in members if m.fleet)
        groups0, refused0 = traffic.groups, sum(m.refused for m in members)
        cpu0, t0 = time.process_time(), time.perf_counter()
        requests, late = await drive(members, args.rate, seconds, traffic, args.usd)
        run = Run(n, time.perf_counter() - t0, requests, time.process_time() - cpu0, late)
        if server is not None and before is not None:
            run.redis = (await server.stats()).minus(before)
            run.key_bytes = await key_bytes(server, f"sim{n}:loop:*")
        run.received = sum(m.fleet.messages_received for m in members if m.fleet) - received0
        run.sent = sum(m.fleet.messages_sent for m in members if m.fleet) - sent0
        run.groups = traffic.groups - groups0
        run.refused = sum(m.refused for m in members) - refused0
        fleets = [m.fleet for m in members if m.fleet is not None]
        if fleets:
            run.hot = sum(f.state()["atlasburn_fleet_hot_fingerprints"] for f in fleets) / n
            run.dropped = sum(f.dropped_occurrences for f in fleets)
            run.reconnects = sum(f.reconnects for f in fleets)
            run.disconnected = sum(not f.connected for f in fleets)
    finally:
        for m in members:
            if m.fleet is not None:
                await m.fleet.stop()
    return run


async def key_bytes(server: RedisServer, pattern: str, sample: int = 500) -> float:
    """The mean ``MEMORY USAGE`` of up to ``sample`` keys matching ``pattern`` (the key, its
    value and its entry in the keyspace; not its entry in the expiry table, 24 bytes more)."""
    sizes: list[int] = []
    async with server.client() as c:
        async for key in c.scan_iter(match=pattern, count=1000):
            sizes.append(int(await c.memory_usage(key, samples=0) or 0))
            if len(sizes) >= sample:
                break
    return sum(sizes) / len(sizes) if sizes else 0.0


def table(runs: list[tuple[Run, Run | None]], args: argparse.Namespace) -> str:
    head = [
        "members", "req/s", "Redis cmds/s", "cmds/req", "EVALSHA/s", "SCRIPT EXISTS/s",
        "ZCOUNT/s", "Redis CPU %", "repeated fps/s", "PUBLISH/s", "msgs/member/s", "hot/member",
        "Redis MB", "keys", "B/key", f"MB at {args.window:g}s window", "CPU µs/req",
        "fleet CPU µs/req", "late ms",
    ]  # fmt: skip
    rows = [head]
    for run, base in runs:
        r = run.redis
        assert r is not None
        secs = run.seconds
        steady = run.members * args.rate * args.window * (run.key_bytes + 24) / 2**20
        cpu = run.cpu / run.requests * 1e6
        base_cpu = base.cpu / base.requests * 1e6 if base is not None else None
        rows.append(
            [
                str(run.members),
                f"{run.requests / secs:,.0f}",
                f"{r.commands / secs:,.0f}",
                f"{r.commands / run.requests:.2f}",
                f"{r.calls.get('evalsha', 0) / secs:,.0f}",
                f"{r.calls.get('script|exists', 0) / secs:,.0f}",
                f"{r.calls.get('zcount', 0) / secs:,.1f}",
                f"{r.cpu / secs * 100:.1f}",
                f"{run.groups / secs:.2f}",
                f"{r.calls.get('publish', 0) / secs:.2f}",
                f"{run.received / run.members / secs:.2f}",
                f"{run.hot:,.0f}",
                f"{r.used_memory / 2**20:.1f}",
                f"{r.keys:,}",
                f"{run.key_bytes:.0f}",
                f"{steady:,.1f}",
                f"{cpu:.0f}",
                "" if base_cpu is None else f"{cpu - base_cpu:.0f}",
                f"{run.late_ms:.0f}",
            ]
        )
    out = markdown(rows)
    problems = [
        f"N={run.members}: {run.refused} refused, {run.dropped} occurrences dropped,"
        f" {run.reconnects} reconnects, {run.disconnected} disconnected at the end"
        for run, _ in runs
        if run.refused or run.dropped or run.reconnects or run.disconnected
    ]
    return out + ("\n\n" + "\n".join(problems) if problems else "")


async def main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {1})
    runs: list[tuple[Run, Run | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = await RedisServer(Path(tmp), cpu="0").start()
        try:
            for n in args.members:
                print(f"... {n} members, {args.seconds:g} s", file=sys.stderr, flush=True)
                run = await simulate(args, n, server)
                base = await simulate(args, n, None) if args.baseline_seconds > 0 else None
                runs.append((run, base))
        finally:
            server.stop()
    share = (
        f"{args.fleet_loops:g} repeated fingerprints started per second across the fleet"
        if args.fleet_loops
        else f"{args.repeat_share:.1%} of requests repeat a fingerprint"
    )
    print(
        f"{args.rate:g} requests/s per member, {args.seconds:g} s per N; {share}"
        f" (each sent {args.threshold - 1} times: threshold {args.threshold},"
        f" window {args.window:g} s); spend ${args.usd} per request\n"
    )
    print(table(runs, args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per member")
    parser.add_argument("--seconds", type=float, default=10.0, help="per N")
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=3.0,
        help="the same members without a fleet, for the fleet's CPU per request (0: none)",
    )
    parser.add_argument(
        "--repeat-share", type=float, default=0.01, help="share of requests that repeat one"
    )
    parser.add_argument(
        "--fleet-loops",
        type=float,
        default=0.0,
        help="repeated fingerprints started per second across the fleet (with --repeat-share 0)",
    )
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--usd", type=float, default=0.0002, help="spend per request")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
