"""The benchmark: direct vs a minimal pass-through vs atlasburn-proxy, side by side in one run.

    python -m bench                 # the quick run (about 2 minutes)
    python -m bench --full          # the real sizes (100k-request soak; about 10 minutes)
    python -m bench --only chat-c64 --no-loop-detector
    python -m bench --fleet --only chat-c1 chat-c64 propagation   # fleet mode (bench/fleet.py)
    python -m bench --only agent-c16 --rounds 5   # the agent-loop layer on and off (bench/agent.py)
    python -m bench --layers --only chat-c1 body100k-c16 agent200k-c1 agent1m-c1 --rounds 3
    python -m bench --layers --colocate --only chat-c1 agent200k-c1 agent1m-c1 --rounds 3

``--layers`` (bench/layers.py): also ``atlasburn-proxy+layers``, the daemon with every layer on
(fleet mode against a local redis-server, the loop detectors, attribution with process lookup,
a budget matching the app; every client sends attribution headers and a key), in the same
interleaved rounds as the default daemon, and a table of each daemon against the pass-through
with issue 19's targets. ``--colocate``: the proxies under test pinned to the client's CPU (the
provider, the ingest and Redis are there too): one CPU for all, as a sidecar shares its pod's;
the scenarios' names get ``-colo``. The agent scenarios ``agent200k-c1``, ``agent200k-c16``,
``agent1m-c1`` and ``agent1m-c16`` send a 200 KB and a 1 MB conversation with tool calls in the
history (``bench/agent_body.py``, ``size``).

Each target is measured with the same closed-loop client (aiohttp + uvloop; every answer checked
byte for byte; every request carries a unique nonce so the loop detector never fires). The proxy
under test is pinned to CPU 0 (CPU 1 with ``--colocate``), the fake provider and the client to
CPU 1, and the proxy's CPU time per request is read from /proc. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import uvloop

from . import TIMING_HEAD, by_scenario, markdown, procs, timing_cells, wrk
from .agent import NO_AGENT_CONFIG, NO_AGENT_TARGET, agent_table
from .agent_body import AgentBody
from .attribution import (
    HEADERS,
    NO_ATTRIBUTION_CONFIG,
    NO_ATTRIBUTION_TARGET,
    attribution_table,
)
from .fleet import (
    FLEET_TARGET,
    SPEND_CAP,
    RedisServer,
    RedisStats,
    fleet_config,
    fleet_spend,
    fleet_table,
    propagation,
    propagation_table,
    wait_connected,
)
from .layers import LAYERS_TARGET, layers_config, targets_table
from .procs import (
    OTHER_CPU,
    ROOT,
    cpu_seconds,
    free_port,
    rss_mb,
    spawn,
    spawn_daemon,
    wait_port,
    write_daemon_config,
)
from .servers import chat_answer, stream_events


@dataclass
class Scenario:
    name: str
    concurrency: int
    requests: int
    stream: bool = False
    body_bytes: int = 0
    chunks: int = 50
    delay_ms: float = 2.0
    note: str = ""
    rounds: int = 1  # interleaved rounds (direct, pass-through, daemon, direct, ...)
    answer_bytes: int = 0  # the provider's JSON answer padded to about this size
    agent: bool = False  # the body: the 100-message agent conversation (bench/agent_body.py)
    agent_bytes: int = 0  # the body: an agent conversation of about this size (agent_body.py)
    headers: bool = False  # attribution headers and a key on every request (--layers)
    attribution: bool = False  # attribution headers; also the daemon without attribution


def scenarios(full: bool) -> list[Scenario]:
    return [
        Scenario("chat-c1", 1, 3000 if full else 1500, note="small chat completion", rounds=3),
        Scenario("chat-c64", 64, 30000 if full else 12000, note="small chat completion", rounds=3),
        Scenario("stream-c32", 32, 1600 if full else 640, stream=True, note="50 chunks 2 ms apart"),
        Scenario(
            "body100k-c16",
            16,
            4000 if full else 1600,
            body_bytes=100_000,
            note="100 KB request body",
            rounds=3,
        ),
        Scenario(
            "agent-c16",
            16,
            12000 if full else 4000,
            agent=True,
            note="100-message agent conversation (45 tool calls), the agent-loop layer on and off",
            rounds=3,
        ),
        *(
            Scenario(
                f"agent{label}-c{c}",
                c,
                n * (3 if full else 1),
                agent_bytes=size,
                note=f"{label[:-1]} {label[-1].upper()}B agent conversation (tool calls in the "
                "history)",
                rounds=3,
            )
            for label, size, c, n in (
                ("200k", 200_000, 1, 600),
                ("200k", 200_000, 16, 1600),
                ("1m", 1_000_000, 1, 200),
                ("1m", 1_000_000, 16, 400),
            )
        ),
        Scenario(
            "attribution-c64",
            64,
            30000 if full else 12000,
            attribution=True,
            note="small chat completion with attribution headers and a key, attribution on and off",
            rounds=3,
        ),
        Scenario(
            "slow-streams-c1000",
            1000,
            1000,
            stream=True,
            chunks=20,
            delay_ms=100,
            note="1,000 concurrent slow streams",
        ),
        Scenario("soak-c32", 32, 100_000 if full else 20_000, note="soak (RSS growth)"),
    ]


@dataclass
class Result:
    target: str
    scenario: Scenario
    seconds: float
    latencies: list[float]
    ttfb: list[float] = field(default_factory=list)
    cpu_us: float | None = None
    rss_mb: float | None = None
    rss_start_mb: float | None = None
    rss_mid_mb: float | None = None  # soak: after its first 10%
    events: int | None = None
    served: int = 0  # requests the target served, warm-up included
    rounds: list[tuple[float, float | None]] = field(default_factory=list)  # (req/s, CPU µs)
    redis: RedisStats | None = None  # the fleet's daemon: what Redis did meanwhile

    @property
    def rps(self) -> float:
        if self.rounds:
            return statistics.median(r for r, _ in self.rounds)
        return len(self.latencies) / self.seconds

    def merge(self, other: Result) -> None:
        """Another round of the same target: latencies pooled; req/s and CPU per request are
        the medians of the rounds (one noisy round on a shared machine does not decide)."""
        if not self.rounds:
            self.rounds.append((len(self.latencies) / self.seconds, self.cpu_us))
        self.rounds.append((len(other.latencies) / other.seconds, other.cpu_us))
        self.latencies += other.latencies
        self.ttfb += other.ttfb
        self.seconds += other.seconds
        if other.rss_mb is not None:
            self.rss_mb = max(self.rss_mb or 0.0, other.rss_mb)
        if other.redis is not None:
            self.redis = other.redis if self.redis is None else self.redis.merge(other.redis)
        cpus = [c for _, c in self.rounds if c is not None]
        self.cpu_us = statistics.median(cpus) if cpus else None

    @property
    def p50_ms(self) -> float:
        return self.pct(0.5)

    @property
    def p90_ms(self) -> float:
        return self.pct(0.9)

    @property
    def p99_ms(self) -> float:
        return self.pct(0.99)

    def pct(self, q: float, xs: list[float] | None = None) -> float:
        data = sorted(self.latencies if xs is None else xs)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000 if data else 0.0


def commit_of(ref: str) -> str:
    """The commit ``ref`` names in this repository; SystemExit saying so if none."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        sys.exit(f"python -m bench --baseline {ref}: no such commit in {ROOT}")
    return found.stdout.strip()


@dataclass(frozen=True)
class Baseline:
    """``--baseline REF ...``: the daemon's code at a git commit, run beside this tree's."""

    target: str  # "atlasburn-proxy@<REF>"
    source: Path  # a directory holding that commit's proxy/ package

    @classmethod
    def extract(cls, ref: str, tmp: Path) -> Baseline:
        """``ref``'s proxy/ package in ``tmp`` (once: a directory named by the commit, so a ref
        with a slash, ``origin/main``, is one name). A ref that names no commit: SystemExit."""
        source = tmp / f"baseline-{commit_of(ref)[:12]}"
        if not source.exists():
            source.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", ref, "proxy"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        return cls(f"atlasburn-proxy@{ref}", source)


class Targets:
    """The fake provider, the ingest, the pass-through and the daemon, for one scenario shape;
    with ``redis`` and ``fleet``, also the daemon in fleet mode (its own ingest), and the spend
    cap on in both daemons; with ``redis`` and ``layers``, also the daemon with every layer on
    (bench/layers.py; its own ingest); for an agent scenario, also the daemon without the
    agent-loop detector (its own ingest)."""

    def __init__(
        self,
        scenario: Scenario,
        loop_detector: bool,
        tmp: Path,
        redis: RedisServer | None = None,
        fleet: bool = True,
        layers: bool = False,
        baselines: Sequence[Baseline] = (),
    ) -> None:
        self.scenario = scenario
        self.baselines = baselines
        self.loop_detector = loop_detector
        self.tmp = tmp
        self.redis = redis if fleet else None  # the fleet's daemon's Redis (its stats)
        self.layers_redis = redis if layers else None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.ingests: dict[str, str] = {}  # daemon -> its fake ingest
        self.names: tuple[str, ...] = ("direct", "pass-through", "atlasburn-proxy")
        if scenario.agent:
            self.names += (NO_AGENT_TARGET,)
        if scenario.attribution:
            self.names += (NO_ATTRIBUTION_TARGET,)
        if self.redis is not None:
            self.names += (FLEET_TARGET,)
        if self.layers_redis is not None:
            self.names += (LAYERS_TARGET,)
        self.names += tuple(b.target for b in baselines)

    async def __aenter__(self) -> Targets:
        try:
            return await self._start()
        except BaseException:
            # A target that never came up (a daemon that cannot reach Redis, a baseline that
            # will not start): what was started is stopped, not left running.
            await self.__aexit__()
            raise

    async def _start(self) -> Targets:
        s = self.scenario
        server = self.redis or self.layers_redis
        if server is not None:
            await server.reset()  # each scenario starts from an empty Redis
        p_port, i_port, t_port, d_port = (free_port() for _ in range(4))
        self.procs["provider"] = spawn(
            OTHER_CPU,
            "-m",
            "bench.servers",
            "provider",
            "--port",
            str(p_port),
            "--chunks",
            str(s.chunks),
            "--delay-ms",
            str(s.delay_ms),
            "--answer-bytes",
            str(s.answer_bytes),
        )
        self.procs["ingest"] = spawn(
            OTHER_CPU, "-m", "bench.servers", "ingest", "--port", str(i_port)
        )
        ports = [p_port, i_port, t_port, d_port]
        provider = f"http://127.0.0.1:{p_port}"
        self.urls["direct"] = provider
        self.procs["pass-through"] = spawn(
            procs.PROXY_CPU,
            "-m",
            "bench.servers",
            "passthrough",
            "--port",
            str(t_port),
            "--upstream",
            provider,
        )
        self.urls["pass-through"] = f"http://127.0.0.1:{t_port}"
        spend = "" if self.redis is None else SPEND_CAP
        config = write_daemon_config(
            self.tmp / s.name / "daemon.toml",
            d_port,
            provider,
            f"http://127.0.0.1:{i_port}",
            self.loop_detector,
            spend,
        )
        self.procs["atlasburn-proxy"] = spawn_daemon(config, self.tmp / "state")
        self.urls["atlasburn-proxy"] = f"http://127.0.0.1:{d_port}"
        self.ingests["atlasburn-proxy"] = f"http://127.0.0.1:{i_port}"
        # (target, file and state name, extra config, source tree: None for this one)
        others: list[tuple[str, str, str, Path | None]] = []
        if s.agent:
            others.append((NO_AGENT_TARGET, "no-agent-loop", spend + NO_AGENT_CONFIG, None))
        if s.attribution:
            others.append(
                (NO_ATTRIBUTION_TARGET, "no-attribution", spend + NO_ATTRIBUTION_CONFIG, None)
            )
        if self.redis is not None:
            others.append((FLEET_TARGET, "fleet", spend + fleet_config(self.redis.url), None))
        if self.layers_redis is not None:
            others.append((LAYERS_TARGET, "layers", layers_config(self.layers_redis.url), None))
        for b in self.baselines:
            others.append((b.target, b.source.name, spend, b.source))
        for target, label, extra, source in others:
            port, ingest_port = free_port(), free_port()
            self.procs[f"{label}-ingest"] = spawn(
                OTHER_CPU, "-m", "bench.servers", "ingest", "--port", str(ingest_port)
            )
            config = write_daemon_config(
                self.tmp / s.name / f"{label}.toml",
                port,
                provider,
                f"http://127.0.0.1:{ingest_port}",
                self.loop_detector,
                extra,
            )
            self.procs[target] = spawn_daemon(config, self.tmp / f"state-{label}", source)
            self.urls[target] = f"http://127.0.0.1:{port}"
            self.ingests[target] = f"http://127.0.0.1:{ingest_port}"
            ports += [port, ingest_port]
        for port in ports:
            await wait_port(port)
        if self.redis is not None:
            await wait_connected(self.urls[FLEET_TARGET])
        if self.layers_redis is not None:
            await wait_connected(self.urls[LAYERS_TARGET])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=30)

    async def events(self, daemon: str = "atlasburn-proxy") -> int:
        async with aiohttp.ClientSession() as s:
            async with s.get(self.ingests[daemon] + "/count") as r:
                return int((await r.json())["distinct"])


async def load(url: str, s: Scenario, start_nonce: int) -> tuple[float, list[float], list[float]]:
    """Closed loop: ``concurrency`` workers, ``requests`` in all; every answer checked."""
    expected = (
        b"".join(stream_events(s.chunks, usage=False)) if s.stream else chat_answer(s.answer_bytes)
    )
    pad = "x" * max(0, s.body_bytes - 200)
    agent = AgentBody(s.agent_bytes) if s.agent or s.agent_bytes else None
    latencies: list[float] = []
    ttfbs: list[float] = []
    counter = iter(range(start_nonce, start_nonce + s.requests))
    headers = {
        "Content-Type": "application/json",
        **(HEADERS if s.attribution or s.headers else {}),
    }
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)

    async def worker(session: aiohttp.ClientSession) -> None:
        for nonce in counter:
            if agent is not None:
                raw = agent.request(nonce)
            else:
                body: dict[str, object] = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"nonce {nonce} {pad}"}],
                }
                if s.stream:
                    body["stream"] = True
                raw = json.dumps(body, separators=(",", ":")).encode()
            t0 = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=raw, headers=headers) as r:
                if s.stream:
                    first = await r.content.readany()
                    ttfbs.append(time.perf_counter() - t0)
                    data = first + await r.read()
                else:
                    data = await r.read()
                if r.status != 200 or data != expected:
                    raise RuntimeError(f"{url}: wrong answer ({r.status}, {len(data)} bytes)")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(s.concurrency)))
        elapsed = time.perf_counter() - t0
    return elapsed, latencies, ttfbs


async def sample_rss(pid: int, peak: list[float]) -> None:
    """Keep ``peak[0]`` at the highest RSS seen."""
    while True:
        peak[0] = max(peak[0], rss_mb(pid))
        await asyncio.sleep(0.05)


async def run_scenario(targets: Targets) -> list[Result]:
    """Warm every target up, then the scenario's interleaved rounds; each target's result."""
    s = targets.scenario
    results: dict[str, Result] = {}
    async with targets:
        names = targets.names
        nonce = 0
        warmed = 0
        for name in names:
            slow = s.chunks * s.delay_ms > 500  # a warm-up of long streams needs few
            warm = replace(
                s, concurrency=min(s.concurrency, 8), requests=8 if slow else min(200, s.requests)
            )
            await load(targets.urls[name], warm, 10**9 + nonce)
            warmed = warm.requests
            nonce += warm.requests
        for i in range(s.rounds):
            # The daemons take turns (rotated each round): none is always the one that runs
            # right after the pass-through.
            daemons = names[2:]
            k = i % len(daemons)
            order = (*names[:2], *daemons[k:], *daemons[:k])
            for name in order:
                result = await measure(s, name, targets, nonce)
                nonce += s.requests
                if name in results:
                    results[name].merge(result)
                else:
                    results[name] = result
        proxied = s.requests * s.rounds + warmed
        for daemon in names[2:]:
            deadline = time.monotonic() + 30
            while (events := await targets.events(daemon)) < proxied:  # noqa: ASYNC110
                if time.monotonic() > deadline:  # (the ingest is another process)
                    break
                await asyncio.sleep(0.2)
            results[daemon].events = events
            results[daemon].served = proxied
    return [results[name] for name in names]


async def measure(s: Scenario, name: str, targets: Targets, nonce: int) -> Result:
    """One round of scenario ``s`` against one target."""
    url = targets.urls[name]
    proc = targets.procs.get(name)
    rss0 = rss_mb(proc.pid) if proc else None
    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
    peak = [0.0]
    redis = targets.redis if name == FLEET_TARGET else None
    redis0 = await redis.stats() if redis is not None else None
    sampler = asyncio.ensure_future(sample_rss(proc.pid, peak)) if proc else None
    mid = None
    if s.name.startswith("soak") and proc is not None:
        # Growth is measured over the last 90%: the first 10% fill caches and pools.
        first = replace(s, requests=s.requests // 10)
        t = time.perf_counter()
        _, lat1, _ = await load(url, first, nonce)
        mid = rss_mb(proc.pid)
        rest = replace(s, requests=s.requests - first.requests)
        _, lat2, ttfb = await load(url, rest, nonce + first.requests)
        seconds, latencies = time.perf_counter() - t, lat1 + lat2
    else:
        seconds, latencies, ttfb = await load(url, s, nonce)
    if sampler is not None:
        sampler.cancel()
    result = Result(name, s, seconds, latencies, ttfb)
    if redis is not None and redis0 is not None:
        result.redis = (await redis.stats()).minus(redis0)
    if proc is not None:
        result.cpu_us = (cpu_seconds(proc.pid) - cpu0) / s.requests * 1e6
        result.rss_mb = max(peak[0], rss_mb(proc.pid))
        result.rss_start_mb = rss0
        result.rss_mid_mb = mid
    return result


def table(results: list[Result], idle_rss: float | None) -> str:
    rows = [[*TIMING_HEAD, "RSS MB", "TTFB p50", "+TTFB", "events"]]
    for name, group in by_scenario(results).items():
        direct, passthrough = group["direct"], group["pass-through"]
        for target, r in group.items():
            ttfb = f"{r.pct(0.5, r.ttfb):.2f}" if r.ttfb else ""
            add_ttfb = (
                f"{r.pct(0.5, r.ttfb) - direct.pct(0.5, direct.ttfb):+.2f}"
                if r.ttfb and target != "direct"
                else ""
            )
            rows.append(
                [
                    *timing_cells(name, target, r, direct, passthrough),
                    "" if r.rss_mb is None else f"{r.rss_mb:.0f}",
                    ttfb,
                    add_ttfb,
                    "" if r.events is None else f"{r.events}/{r.served}",
                ]
            )
    out = markdown(rows)
    soak = [
        r for r in results if r.scenario.name.startswith("soak") and r.target == "atlasburn-proxy"
    ]
    for r in soak:
        if r.rss_start_mb and r.rss_mb and r.rss_mid_mb:
            growth = (r.rss_mb - r.rss_mid_mb) / r.rss_mid_mb * 100
            out += (
                f"\n\nsoak: atlasburn-proxy RSS {r.rss_start_mb:.1f} MB before, "
                f"{r.rss_mid_mb:.1f} MB after the first 10%, {r.rss_mb:.1f} MB peak after "
                f"{r.scenario.requests:,} requests: {growth:+.1f}% over the last 90%"
            )
    if idle_rss is not None:
        out += f"\nidle: atlasburn-proxy RSS {idle_rss:.1f} MB after start"
    return out


async def idle_rss(tmp: Path) -> float:
    port = free_port()
    env = {**os.environ, "STATE_DIRECTORY": str(tmp / "idle")}
    proc = spawn(procs.PROXY_CPU, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", env=env)
    try:
        await wait_port(port)
        await asyncio.sleep(1.0)
        return rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def run_wrk_scenario(
    s: Scenario, loop_detector: bool, tmp: Path, seconds: float
) -> list[tuple[str, str, wrk.WrkRound, str]]:
    """Scenario ``s`` (not streaming) with wrk as the client: interleaved rounds per target."""
    names = ("direct", "pass-through", "atlasburn-proxy")
    rounds: dict[str, list[wrk.WrkRound]] = {name: [] for name in names}
    completed = 0
    async with Targets(s, loop_detector, tmp) as targets:
        for name in names:  # warm-up with the Python client
            warm = replace(s, concurrency=8, requests=200)
            await load(targets.urls[name], warm, 0)
        for r in range(s.rounds):
            for name in names:
                proc = targets.procs.get(name)
                cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                n, secs, p50, p90, p99 = await wrk.run(
                    targets.urls[name],
                    s.concurrency,
                    s.body_bytes,
                    s.answer_bytes,
                    seconds,
                    10**6 * (len(names) * r + names.index(name) + 1),
                    tmp,
                    OTHER_CPU,
                )
                cpu = (cpu_seconds(proc.pid) - cpu0) / n * 1e6 if proc else None
                rounds[name].append(wrk.WrkRound(n, secs, p50, p90, p99, cpu))
                if name == "atlasburn-proxy":
                    completed += n
        daemon = targets.urls["atlasburn-proxy"]
        deadline = time.monotonic() + 30
        while True:  # every event the daemon recorded reaches the ingest
            recorded, received = await wrk.committed_events(daemon), await targets.events()
            if received >= recorded or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    events = (
        f"the ingest received {received:,} of the {recorded:,} events the daemon recorded "
        f"(wrk completed {completed:,} requests + 200 warm-up; a request cut when wrk stops is "
        "recorded too)"
    )
    return [
        (s.name, name, wrk.median_round(rounds[name]), events if name == names[-1] else "")
        for name in names
    ]


async def main(args: argparse.Namespace) -> None:
    taken: dict[str, str] = {}  # commit -> the ref that named it
    for ref in args.baseline or ():  # before anything starts
        commit = commit_of(ref)
        if commit in taken:  # one state directory, ingest and name per commit
            sys.exit(f"python -m bench --baseline: {ref} and {taken[commit]} name one commit")
        taken[commit] = ref
    os.sched_setaffinity(0, {int(OTHER_CPU)})  # the client shares CPU 1 with the provider
    chosen = [s for s in scenarios(args.full) if not args.only or s.name in args.only]
    if args.colocate:
        procs.colocate()  # the proxies under test on CPU 1 too
        chosen = [replace(s, name=s.name + "-colo") for s in chosen]
    if args.layers:
        chosen = [replace(s, headers=True) for s in chosen]
    if args.answer_bytes:
        chosen = [s if s.stream else replace(s, answer_bytes=args.answer_bytes) for s in chosen]
    if args.rounds:
        chosen = [replace(s, rounds=args.rounds) for s in chosen]
    if (args.fleet or args.layers) and shutil.which("redis-server") is None:
        sys.exit(
            "python -m bench --fleet and --layers need redis-server (Debian: apt-get install "
            "redis-server)"
        )
    if args.wrk:
        if args.baseline:
            sys.exit("python -m bench --baseline runs with the Python client (not --wrk)")
        if args.fleet or args.layers:
            sys.exit("python -m bench --fleet and --layers run with the Python client (not --wrk)")
        if not wrk.available():
            sys.exit("python -m bench --wrk needs wrk (Debian: apt-get install wrk)")
        rows: list[tuple[str, str, wrk.WrkRound, str]] = []
        with tempfile.TemporaryDirectory() as tmp:
            for s in chosen:
                skip = s.stream or s.name.startswith("soak") or s.agent or s.agent_bytes
                if skip or s.attribution:
                    continue  # wrk mode: the non-streaming request/answer scenarios
                print(
                    f"... {s.name} with wrk: {s.note}, concurrency {s.concurrency}, "
                    f"{s.rounds} x {args.wrk_seconds:g} s per target",
                    file=sys.stderr,
                    flush=True,
                )
                rows += await run_wrk_scenario(
                    s, not args.no_loop_detector, Path(tmp), args.wrk_seconds
                )
        print(wrk.table(rows))
        return
    results: list[Result] = []
    notes: dict[str, str] = {}
    spread = None
    with tempfile.TemporaryDirectory() as tmp:
        redis = await RedisServer(Path(tmp)).start() if args.fleet or args.layers else None
        try:
            idle = await idle_rss(Path(tmp))
            for s in chosen:
                print(
                    f"... {s.name}: {s.note}, concurrency {s.concurrency}, {s.requests:,} "
                    f"requests{' (and the daemon in fleet mode)' if args.fleet else ''}"
                    f"{' (and the daemon with every layer on)' if args.layers else ''}"
                    f"{' (and the daemon without the agent-loop layer)' if s.agent else ''}"
                    f"{' (and the daemon without attribution)' if s.attribution else ''}",
                    file=sys.stderr,
                    flush=True,
                )
                targets = Targets(
                    s,
                    not args.no_loop_detector,
                    Path(tmp),
                    redis,
                    args.fleet,
                    args.layers,
                    [Baseline.extract(ref, Path(tmp)) for ref in args.baseline or ()],
                )
                results += await run_scenario(targets)
                if args.fleet and redis is not None:
                    spent, stats = await fleet_spend(redis), await redis.stats()
                    notes[s.name] = (
                        f"afterwards Redis held {stats.keys:,} keys in"
                        f" {stats.used_memory / 2**20:.1f} MB, and the fleet's spend hash"
                        f" ${spent:.4f} for the last hour"
                    )
            if (
                redis is not None
                and args.fleet
                and args.propagation
                and (not args.only or "propagation" in args.only)
            ):
                print(
                    f"... propagation: suspend on A, poll B; {args.propagation} times",
                    file=sys.stderr,
                    flush=True,
                )
                await redis.reset()
                spread = await propagation(Path(tmp), redis, args.propagation)
        finally:
            if redis is not None:
                redis.stop()
    if results:
        print(table(results, idle))
    attributed = attribution_table(results)
    if attributed:
        print("\nattribution on against off (same rounds, interleaved, keep-alive clients):\n")
        print(attributed)
    agents = agent_table(results)
    if agents:
        print("\nthe agent-loop detector on against off (same rounds, interleaved):\n")
        print(agents)
    if args.layers and results:
        print(
            "\neach daemon against the pass-through, issue 19's targets (same rounds, "
            f"interleaved{'; one CPU for all' if args.colocate else ''}):\n"
        )
        print(targets_table(results))
    if args.fleet and results:
        print("\nfleet mode against standalone (the spend cap on in both):\n")
        print(fleet_table(results, notes))
    if spread is not None:
        print("\nsuspension propagation between two daemons in fleet mode:\n")
        print(propagation_table(spread))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--full", action="store_true", help="the real sizes (slow)")
    parser.add_argument("--only", nargs="*", help="scenario names")
    parser.add_argument("--no-loop-detector", action="store_true")
    parser.add_argument(
        "--wrk", action="store_true", help="the non-streaming scenarios with wrk as the client"
    )
    parser.add_argument("--wrk-seconds", type=float, default=10.0, help="per target and round")
    parser.add_argument(
        "--answer-bytes", type=int, default=0, help="pad the provider's JSON answer to this size"
    )
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds per scenario")
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="also the daemon in fleet mode against a local redis-server, and the suspension "
        "propagation (select it alone with --only propagation)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also the daemon with every layer on (fleet mode against a local redis-server, "
        "the loop detectors, attribution with process lookup, a budget; bench/layers.py), and "
        "each daemon against the pass-through with issue 19's targets",
    )
    parser.add_argument(
        "--colocate",
        action="store_true",
        help="the proxies under test on the client's CPU (with the provider): one CPU for all",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        nargs="+",
        help="also the daemon of each git commit REF (its proxy/ package, the default config), "
        "in the same rounds: a change measured side by side with what it changes",
    )
    parser.add_argument(
        "--propagation", type=int, default=100, help="suspensions measured with --fleet (0: none)"
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
