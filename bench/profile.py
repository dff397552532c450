"""Where the daemon's time goes under one bench scenario: py-spy samples and per-thread CPU.

    python -m bench.profile chat-c1 --colocate     # small chat, concurrency 1, one CPU for all
    python -m bench.profile body100k-c16           # the 100 KB body at concurrency 16
    python -m bench.profile agent1m-c1 --seconds 30

It starts what ``python -m bench --layers`` starts for the scenario (the fake provider, a local
redis-server, the daemon with every layer on: ``atlasburn-proxy+layers``, bench/layers.py; the
pass-through and the default daemon too, idle; ``--default``: the default daemon profiled
instead), warms the daemon up, then drives it with the
bench's closed-loop client (attribution headers and a key on every request) while
``py-spy record`` samples it (``--rate`` Hz; ``--nonblocking``, the daemon never paused, but
with ``--native``, C frames too, which pauses it at every sample and halves its throughput;
idle threads not counted; the py-spy executable beside this Python, ``pip install py-spy``).
Before that, as long, the same load with nothing attached, for the per-thread figures.

It prints:

- the daemon's own functions (proxy/, less its entry points) most often on the stack
  (inclusive: a sample counts once for every function on its stack) and the functions of any
  code most often at the top of it (self: C code called from a function counts as the
  function's; the event loop's own C code as ``Runner.run``), as shares of all samples;
- per thread, without py-spy: its CPU time (utime + stime, ``/proc/<pid>/task/<tid>/stat``
  fields 14 and 15, in clock ticks of ``SC_CLK_TCK``; proc(5)) over the run, in all and per
  request, its name (the Python thread's, from ``py-spy dump``; the kernel's ``comm``
  otherwise), and per request how many times it blocked and was woken again
  (``voluntary_ctxt_switches`` of ``/proc/<pid>/task/<tid>/status``: which threads wake per
  request) and how many times the kernel took its CPU away (``nonvoluntary_ctxt_switches``:
  preempted, many when one CPU is shared); and the commands Redis ran per request (``INFO``,
  those inside scripts included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import uvloop

from . import markdown, procs
from .__main__ import Scenario, Targets, load, scenarios
from .fleet import RedisServer
from .layers import LAYERS_TARGET
from .procs import HZ, OTHER_CPU


@dataclass
class ThreadStat:
    name: str  # the kernel's comm
    cpu: float  # seconds, utime + stime
    woken: int  # voluntary context switches: it blocked (and was woken again)
    preempted: int  # nonvoluntary context switches: the kernel took its CPU away


def threads(pid: int) -> dict[int, ThreadStat]:
    """tid -> its CPU time and context switches so far (threads that ended meanwhile are not
    listed)."""
    out: dict[int, ThreadStat] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        switches = {
            key: int(value)
            for key, _, value in (line.partition(":") for line in status.splitlines())
            if key.endswith("ctxt_switches")
        }
        out[int(task.name)] = ThreadStat(
            comm,
            (int(fields[11]) + int(fields[12])) / HZ,
            switches["voluntary_ctxt_switches"],
            switches["nonvoluntary_ctxt_switches"],
        )
    return out


def python_names(spy: str, pid: int) -> dict[int, str]:
    """tid -> the Python thread's name (``py-spy dump``: ``Thread 1234 (idle): "MainThread"``)."""
    dump = subprocess.run(
        [spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True
    ).stdout
    return {int(t): name for t, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.M)}


# The daemon's entry points, on the stack of every sample of the main thread: not listed as
# inclusive, where they would head the list with no news.
ENTRY = ("main (", "run (", "_run_loop (", "<module> (")


def top(raw: str, n: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """py-spy's raw (collapsed) output: the samples, the ``n`` functions of the daemon's own
    code (proxy/) most often on a stack (inclusive) and the ``n`` functions of any code most
    often at its top (self), with their sample counts."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        total += k
        for f in set(frames):
            if " (proxy/" in short(f) and not f.startswith(ENTRY):
                inclusive[f] += k
        if frames:
            leaf[frames[-1]] += k
    return total, inclusive.most_common(n), leaf.most_common(n)


def short(frame: str) -> str:
    """``name (path/to/module.py)`` with the path from ``site-packages/`` or the repo on."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for cut in ("site-packages/", str(procs.ROOT) + "/", "lib/python3.11/"):
        if cut in where:
            where = where.split(cut, 1)[1]
    return f"{name} ({where})"


async def run(s: Scenario, seconds: float, rate: int, n: int, native: bool, target: str) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("python -m bench.profile needs py-spy: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        redis = await RedisServer(Path(tmp)).start()
        try:
            async with Targets(s, True, Path(tmp), redis, fleet=False, layers=True) as targets:
                url, pid = targets.urls[target], targets.procs[target].pid
                await load(url, replace(s, requests=min(200, s.requests)), 10**9)
                # First the threads, with nothing attached; then py-spy, as long.
                before, redis0 = threads(pid), await redis.stats()
                served, elapsed = await drive(url, s, seconds, 0)
                after, redis1 = threads(pid), await redis.stats()
                out = Path(tmp) / "profile.txt"
                args = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                        "--rate", str(rate), "--format", "raw", "--nolineno",
                        "--output", str(out)]  # fmt: skip
                # py-spy samples C frames only with the process paused at each sample.
                args += ["--native"] if native else ["--nonblocking"]
                cpu0 = procs.cpu_seconds(pid)
                spying = await asyncio.create_subprocess_exec(
                    *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                spied, spied_for = await drive(url, s, seconds, 10**8)
                cpu = procs.cpu_seconds(pid) - cpu0
                _, err = await spying.communicate()
                if spying.returncode:
                    sys.exit(f"py-spy failed: {err.decode()}")
                names = python_names(spy, pid)
                raw = out.read_text()
        finally:
            redis.stop()
    total, inclusive, leaf = top(raw, n)
    busy = sum(a.cpu - _cpu(before, tid) for tid, a in after.items())
    commands = (redis1.commands - redis0.commands) / served
    print(
        f"{s.name}{' (one CPU for all)' if procs.PROXY_CPU == OTHER_CPU else ''}: "
        f"{target}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n\n"
        f"py-spy: {spied:,} requests in {spied_for:.1f} s ({spied / spied_for:,.0f}/s), process "
        f"CPU {cpu * 1e6 / spied:,.0f} µs/request, {total:,} samples at {rate} Hz (idle "
        "excluded)\n"
    )
    rows = [["proxy/ function (inclusive)", "share", "any function (self)", "share"]]
    for (f1, k1), (f2, k2) in zip(inclusive, leaf, strict=False):
        rows.append([short(f1), f"{k1 / total:.1%}", short(f2), f"{k2 / total:.1%}"])
    print(markdown(rows))
    print(
        f"\nthreads, without py-spy: {served:,} requests in {elapsed:.1f} s "
        f"({served / elapsed:,.0f}/s), process CPU {busy * 1e6 / served:,.0f} µs/request; Redis "
        f"ran {commands:.2f} commands per request\n"
    )
    rows = [["thread", "tid", "CPU ms", "CPU µs/req", "woken/req", "preempted/req"]]
    for tid, a in sorted(after.items(), key=lambda kv: -(kv[1].cpu - _cpu(before, kv[0]))):
        b = before.get(tid, ThreadStat(a.name, 0.0, 0, 0))
        rows.append(
            [
                names.get(tid, a.name),
                str(tid),
                f"{(a.cpu - b.cpu) * 1e3:,.0f}",
                f"{(a.cpu - b.cpu) * 1e6 / served:,.1f}",
                f"{(a.woken - b.woken) / served:.2f}",
                f"{(a.preempted - b.preempted) / served:.2f}",
            ]
        )
    print()
    print(markdown(rows))


async def drive(url: str, s: Scenario, seconds: float, nonce: int) -> tuple[int, float]:
    """The scenario's load, in its own batches of requests, until ``seconds`` have passed: the
    requests served and the seconds it took."""
    served, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, latencies, _ = await load(url, s, nonce + served)
        served += len(latencies)
    return served, time.perf_counter() - t0


def _cpu(stats: dict[int, ThreadStat], tid: int) -> float:
    return stats[tid].cpu if tid in stats else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("scenario", help="a scenario of python -m bench (chat-c1, agent1m-c1, ...)")
    parser.add_argument("--colocate", action="store_true", help="one CPU for all (as the bench)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--default",
        action="store_true",
        help=f"profile atlasburn-proxy (the default config), not {LAYERS_TARGET}",
    )
    args = parser.parse_args()
    found = [s for s in scenarios(False) if s.name == args.scenario]
    if not found:
        sys.exit(f"no scenario {args.scenario!r}")
    os.sched_setaffinity(0, {int(OTHER_CPU)})
    if args.colocate:
        procs.colocate()
    s = replace(found[0], headers=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        target = "atlasburn-proxy" if args.default else LAYERS_TARGET
        runner.run(run(s, args.seconds, args.rate, args.top, args.native, target))


if __name__ == "__main__":
    main()
