"""The cost of finding a loopback client's process (``proxy.attribution.process``).

    python -m bench.process_lookup [--connections 200] [--idle 500]

A real client process opens ``--connections`` connections to a listener here and keeps them
open; each one is then looked up, in µs (median and p99 over the connections):

- ``socket row /proc``: reading /proc/net/tcp{,6} and finding the client socket's row;
- ``socket row sock_diag``: the same answer (inode, uid) from netlink ``SOCK_DIAG_BY_FAMILY``
  asking for the exact 4-tuple (what ``ss`` uses), for comparison;
- then, as the daemon runs it (the socket from netlink):
- ``new process``: a whole lookup by a finder that has never seen the client (fd scan of every
  process of its uid, newest first, until the client's);
- ``same process``: a whole lookup of a new connection of a client found before (its fd
  directory is read first);
- ``cached``: the same connection again (the socket row, then the cache);
- ``ProcessFinder.lookup``: a ``same process`` lookup awaited through the finder's thread;
- the thread hop alone: ``run_in_executor`` on a one-worker pool against ``asyncio.to_thread``.

Twice: with the host as it is, then with ``--idle`` extra idle processes (``sleep``), each
holding a TCP connection of its own, started after the client (so a new client is found after
all of them) and of the same uid (so every one is read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy.attribution.process import ProcessFinder, SockDiag, _Finder, find_socket

CLIENT = (
    "import socket, sys\n"
    "conns = [socket.create_connection((sys.argv[1], int(sys.argv[2])))"
    " for _ in range(int(sys.argv[3]))]\n"
    "print('ok', flush=True)\n"
    "sys.stdin.read()\n"
)


def timed(fn: Callable[[], Any], runs: list[float]) -> Any:
    t = time.perf_counter_ns()
    out = fn()
    runs.append((time.perf_counter_ns() - t) / 1000)
    return out


def summary(runs: list[float]) -> str:
    runs = sorted(runs)
    p99 = runs[min(len(runs) - 1, int(len(runs) * 0.99))]
    return f"median {statistics.median(runs):8.1f} µs   p99 {p99:8.1f} µs   (n={len(runs)})"


async def measure(conns: list[tuple[tuple[str, int], tuple[str, int]]], client: int) -> None:
    print(f"  processes on the host: {sum(1 for n in os.listdir('/proc') if n.isdigit())}", end="")
    print(f", rows in /proc/net/tcp: {_Finder(netlink=False).tables()['tcp'].count(chr(10)) - 1}")
    finder = _Finder(netlink=False)
    diag = SockDiag()
    rows: list[float] = []
    diags: list[float] = []
    for peer, local in conns:
        row = timed(lambda: find_socket(finder.tables(), peer, local), rows)  # noqa: B023
        got = timed(lambda: diag.find(peer, local), diags)  # noqa: B023
        assert row is not None and got == row, (row, got)
    print(f"  socket row /proc       {summary(rows)}")
    print(f"  socket row sock_diag   {summary(diags)}")
    finder = _Finder()  # netlink, as the daemon runs it
    new: list[float] = []
    for peer, local in conns:
        fresh = _Finder()
        found = timed(lambda: fresh.find(peer, local), new)  # noqa: B023
        fresh.close()
        assert found is not None and found.pid == client, found
    print(f"  new process            {summary(new)}")
    same: list[float] = []
    cached: list[float] = []
    for peer, local in conns:
        finder.cache.clear()
        found = timed(lambda: finder.find(peer, local), same)  # noqa: B023
        assert found is not None and found.pid == client
    for peer, local in conns:
        timed(lambda: finder.find(peer, local), cached)  # noqa: B023
    print(f"  same process           {summary(same)}")
    print(f"  cached                 {summary(cached)}")
    pf = ProcessFinder()
    awaited: list[float] = []
    for peer, local in conns:
        pf._finder.cache.clear()
        t = time.perf_counter_ns()
        found = await pf.lookup(peer, local)
        awaited.append((time.perf_counter_ns() - t) / 1000)
        assert found is not None and found.pid == client
    pf.close()
    print(f"  ProcessFinder.lookup   {summary(awaited)}")
    loop = asyncio.get_running_loop()
    hop: list[float] = []
    to_thread: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        for _ in conns:
            t = time.perf_counter_ns()
            await loop.run_in_executor(pool, int)
            hop.append((time.perf_counter_ns() - t) / 1000)
            t = time.perf_counter_ns()
            await asyncio.to_thread(int)
            to_thread.append((time.perf_counter_ns() - t) / 1000)
    print(f"  hop run_in_executor(1) {summary(hop)}")
    print(f"  hop asyncio.to_thread  {summary(to_thread)}")
    diag.close()
    finder.close()


def start_idle(count: int) -> tuple[list[subprocess.Popen[bytes]], list[socket.socket]]:
    procs = []
    held = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        for _ in range(count):
            mine = socket.create_connection(server.getsockname())
            theirs, _ = server.accept()
            procs.append(subprocess.Popen(["sleep", "3600"], pass_fds=[mine.fileno()]))
            mine.close()
            held.append(theirs)
    return procs, held


def start_client(host: str, port: int, connections: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, host, str(port), str(connections)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--idle", type=int, default=500)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.listen(args.connections)
        host, port = listener.getsockname()
        client = start_client(host, port, args.connections)
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == b"ok\n"
        accepted = [listener.accept() for _ in range(args.connections)]
        conns = [(peer, conn.getsockname()) for conn, peer in accepted]
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, uid {os.geteuid()}")
        print("the host as it is:")
        await measure(conns, client.pid)
        procs, held = start_idle(args.idle)
        try:
            print(f"with {args.idle} extra idle processes, each holding a TCP connection:")
            await measure(conns, client.pid)
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            for s in held:
                s.close()
        client.stdin.close()
        client.wait()
        client.stdout.close()
        for conn, _ in accepted:
            conn.close()


if __name__ == "__main__":
    asyncio.run(main())
