"""The CPU a fleet daemon spends on one answered occurrence, alone (issue 19):

    python -m bench.fleet_ack              # 10,000 occurrences, three runs
    python -m bench.fleet_ack --count 30000 --runs 5

One process on ``PROXY_CPU`` runs a ``Fleet`` (bench/fleet.py's ``RedisServer`` on
``OTHER_CPU``) and, one after another, what the relay does for each answered request in a
fleet: ``LoopGuard.record`` (the occurrence queued, the writer woken) and
``Relay._fleet_counted`` (the answer held until Redis has counted it). Each occurrence has its
own fingerprint, as the bench's requests do (and each run its own key prefix). It prints the
process's CPU time (utime + stime, ``time.process_time``) and the wall time per occurrence,
after 500 for warm-up: the part of a request's CPU that fleet mode adds at concurrency 1,
without the HTTP around it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from proxy.config import FleetConfig, LoopDetectorConfig, Secret, SpendCapConfig
from proxy.guardrails import KillSwitch, LoopGuard, SpendCap
from proxy.guardrails.fleet import Fleet
from proxy.relay import Relay

from . import procs
from .fleet import RedisServer


class _Exchange:
    ack: Any = None


class _Relay:
    """What ``Relay._fleet_counted`` reads of its relay."""

    def __init__(self, loop: LoopGuard) -> None:
        self.loop = loop


async def run(url: str, count: int) -> tuple[float, float]:
    """CPU and wall seconds per occurrence."""
    kill = KillSwitch("org_bench", None)
    loop = LoopGuard(LoopDetectorConfig(), kill)
    fleet = Fleet(
        FleetConfig(Secret(url), f"bench{random.getrandbits(32):08x}:"),
        "org_bench",
        kill,
        loop,
        SpendCap(SpendCapConfig()),
    )
    fleet.start()
    try:
        for _ in range(500):
            if fleet.connected:
                break
            await asyncio.sleep(0.02)  # noqa: ASYNC110 (the fleet has no event for it)
        relay: Any = _Relay(loop)
        ex: Any = _Exchange()
        n = 0
        for todo in (500, count):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(todo):
                n += 1
                ex.ack = loop.record(f"sha256:{n:064x}")
                await Relay._fleet_counted(relay, ex)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        if not fleet.connected:
            raise SystemExit("the fleet lost Redis during the run")
        return cpu / count, wall / count
    finally:
        await fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_ack")
    parser.add_argument("--count", type=int, default=10_000, help="occurrences a run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        uvloop.run(server.start())
        try:
            os.sched_setaffinity(0, {int(procs.PROXY_CPU)})
            cpus = []
            for _ in range(args.runs):
                cpu, wall = uvloop.run(run(server.url, args.count))
                cpus.append(cpu)
                print(f"{args.count} occurrences: {cpu * 1e6:.1f} µs CPU, {wall * 1e6:.1f} µs wall")
            print(f"median: {sorted(cpus)[len(cpus) // 2] * 1e6:.1f} µs CPU per occurrence")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
