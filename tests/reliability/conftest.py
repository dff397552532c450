"""The reliability suite: the daemon as a real process (``python -m proxy run``) on loopback, in
front of the fake provider and the fake ingest, under faults, load and hostile input.

Every case runs in a short version by default (what CI runs) and for real durations with
``--long`` (by hand). Each case records the figures it measured with ``figures(what, value)``;
they are printed after the run under "reliability figures".
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import FIGURES, SPAWNED, cpu_wait
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from ..process import DaemonProcess, spawn_daemon

pytestmark = pytest.mark.reliability


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def long(request: pytest.FixtureRequest) -> bool:
    """True with ``--long``: run for the real durations."""
    return bool(request.config.getoption("--long"))


Figures = Callable[[str, object], None]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    def record(what: str, value: object) -> None:
        FIGURES.append((request.node.name, what, str(value)))

    return record


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """A nested dict as TOML (strings, numbers, booleans, lists of strings; tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            if "." in k:
                name = f'{prefix}."{k}"' if prefix else f'"{k}"'
            out += toml(v, name)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Proxy:
    """One daemon process and what the suite reads from the outside: /proc, /metrics, files."""

    def __init__(self, process: DaemonProcess, spool: Path) -> None:
        self.process = process
        self.url = process.url
        self.spool = spool

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close_wait(self) -> int:
        return len(self.close_wait_ports())

    def close_wait_ports(self) -> list[tuple[int, int]]:
        """(local, remote) ports of this process's sockets in CLOSE_WAIT (the peer closed, we
        did not)."""
        return [(local, remote) for local, remote, state in self.tcp() if state == "08"]

    def tcp(self) -> list[tuple[int, int, str]]:
        """This process's TCP sockets: (local port, remote port, state as in /proc/net/tcp:
        "01" established, "08" CLOSE_WAIT, "0A" listening, ...)."""
        inodes = self._socket_inodes()
        found = []
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    local = int(fields[1].rsplit(":", 1)[1], 16)
                    remote = int(fields[2].rsplit(":", 1)[1], 16)
                    found.append((local, remote, fields[3]))
        return found

    def other_fds(self) -> int:
        """Open descriptors that are not TCP sockets: files (the spool, its -wal and -shm),
        pipes, the event loop's own."""
        tcp = self._tcp_inodes()
        return sum(1 for target in self._fd_targets() if target not in tcp)

    def cpu_wait(self) -> float:
        """Seconds the daemon's threads have spent waiting for a CPU (``cpu_wait``)."""
        return cpu_wait(self.pid)

    def _fd_targets(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except OSError:
                continue
        return out

    def _socket_inodes(self) -> set[str]:
        return {t[8:-1] for t in self._fd_targets() if t.startswith("socket:[")}

    def _tcp_inodes(self) -> set[str]:
        """fd targets (``socket:[inode]``) of this process's TCP sockets."""
        inodes = self._socket_inodes()
        tcp = set()
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.pid}/net/{table}")
            if path.exists():
                for line in path.read_text().splitlines()[1:]:
                    inode = line.split()[9]
                    if inode in inodes:
                        tcp.add(f"socket:[{inode}]")
        return tcp

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed ``name{label="v",...}`` (labels sorted)."""
        async with aiohttp.ClientSession() as s:
            async with s.get(self.url + "/metrics") as r:
                text = await r.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    async def stop(self) -> int:
        return await self.process.stop()


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(
    fake: FakeProvider, ingest: FakeIngest, tmp_path: Path
) -> AsyncIterator[StartProxy]:
    """Start the daemon as a process: its providers point at the fake, it ships to the fake
    ingest (unless ``ship=False``), and ``overrides`` merge over that config."""
    running: list[Proxy] = []

    async def _start(
        ship: bool = True, spool: Path | None = None, nofile: int | None = None, **overrides: Any
    ) -> Proxy:
        spool = spool or tmp_path / "state" / "spool.sqlite3"
        base: dict[str, Any] = {
            "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 5},
            "storage": {"path": str(spool), "commit_interval_ms": 50},
            "telemetry": {"flush_interval_ms": 100, "max_backoff_seconds": 1.0},
            "providers": {
                "openai": {"base_url": fake.url},
                "anthropic": {"base_url": fake.url},
                "gemini": {"base_url": fake.url},
            },
            "atlasburn": {"api_key": ingest.api_key},
        }
        if ship:
            base["atlasburn"]["api_base"] = ingest.url
        config = tmp_path / f"config{len(running)}.toml"
        config.write_text(toml(merge(base, overrides)))
        env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}
        process = await spawn_daemon("--config", str(config), env=env, nofile=nofile)
        proxy = Proxy(process, spool)
        running.append(proxy)
        return proxy

    yield _start
    for proxy in running:
        if proxy.process.proc.returncode is None:
            await proxy.stop()


async def raw_request(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a new connection to 127.0.0.1:port; everything the server answers
    until it closes (or ``wait`` seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Traffic:
    """Steady traffic: ``rate`` requests a second (small embeddings, each with its own nonce, so
    each has its own fingerprint), until ``stop()``; every answer's (time, status, latency).

    ``max_in_flight`` bounds the requests waiting for an answer: past it the next one waits (the
    rate drops), so that a machine too busy to answer 100 a second does not pile up hundreds of
    open requests, whose buffers a memory bound would then count."""

    def __init__(
        self,
        url: str,
        rate: float,
        nonce: int = 0,
        path: str = "/v1/embeddings",
        max_in_flight: int | None = None,
    ) -> None:
        self.url = url + path
        self.rate = rate
        self.nonce = nonce
        self.log: list[tuple[float, int, float]] = []
        self.done: dict[int, float] = {}  # nonce -> when its 200 answer was read
        self._stop = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    def start(self) -> Traffic:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[None]] = set()
        async with aiohttp.ClientSession() as s:
            t0 = loop.time()
            k = 0
            while not self._stop.is_set():
                if self._slots is not None:
                    await self._slots.acquire()
                k += 1
                pending.add(asyncio.ensure_future(self._one(s, self.nonce + k)))
                pending = {f for f in pending if not f.done()}
                delay = t0 + k / self.rate - loop.time()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, s: aiohttp.ClientSession, nonce: int) -> None:
        t = time.monotonic()
        try:
            async with s.post(
                self.url, json={"model": "text-embedding-3-small", "input": f"nonce {nonce}"}
            ) as r:
                await r.read()
                status = r.status
        except aiohttp.ClientError:
            status = 0
        finally:
            if self._slots is not None:
                self._slots.release()
        end = time.monotonic()
        self.log.append((t, status, end - t))
        if status == 200:
            self.done[nonce] = end

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def served(self) -> int:
        return sum(1 for _, status, _ in self.log if status == 200)

    def p99(self, since: float = 0.0, until: float = float("inf")) -> float:
        xs = sorted(lat for t, _, lat in self.log if since <= t < until)
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000 if xs else 0.0


def embedding_fingerprint(nonce: int) -> str:
    """The fingerprint the daemon gives Traffic's request ``nonce`` (DESIGN.md's definition)."""
    from proxy.adapters import ADAPTERS
    from proxy.fingerprint import fingerprint

    body = {"model": "text-embedding-3-small", "input": f"nonce {nonce}"}
    meta = ADAPTERS["openai"].describe("/v1/embeddings", body)
    return fingerprint("openai", meta.endpoint, meta.canonical, b"")


async def enforce(url: str, key: str, method: str, **body: object) -> int:
    """A call to the daemon's /api/guardrails/enforce for the default org; its status."""
    async with aiohttp.ClientSession() as s:
        async with s.request(
            method,
            url + "/api/guardrails/enforce",
            json={"org_id": "org_local", "reason": "reliability test", **body},
            headers={"AtlasBurn-API-Key": key},
        ) as r:
            return r.status


async def guardrail_state(url: str, key: str) -> tuple[int, dict[str, Any]]:
    """``GET /api/guardrails/enforce`` for the default org with ``key``: (status, answer)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(
            url + "/api/guardrails/enforce",
            params={"org_id": "org_local"},
            headers={"AtlasBurn-API-Key": key},
        ) as r:
            return r.status, await r.json()


async def suspend(url: str, key: str, ttl_seconds: float) -> int:
    return await enforce(
        url, key, "POST", action="suspend", layer="operator", ttl_seconds=ttl_seconds
    )


async def resume(url: str, key: str) -> int:
    return await enforce(url, key, "DELETE")


class RedisServer:
    """A real ``redis-server`` of the suite's own, on a free loopback port, persistence off
    (no RDB, no AOF): ``stop`` then ``start`` gives an empty one on the same port, the way a
    restarted cache comes back. Stopped by its PID, never by name."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        """A redis-py asyncio client (bytes in, bytes out); the caller closes it."""
        import redis.asyncio

        return redis.asyncio.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    async def start(self, within: float = 10.0) -> None:
        """Start it and return once it answers PING."""
        import redis.asyncio
        from redis.exceptions import RedisError

        assert self.proc is None or self.proc.returncode is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            os.environ.get("REDIS_SERVER", "redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        SPAWNED.append(self.proc)
        deadline = time.monotonic() + within
        while True:
            client = redis.asyncio.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
            try:
                if await client.ping():
                    return
            except (RedisError, OSError):
                if self.proc.returncode is not None:
                    raise AssertionError(f"redis-server exited ({self.proc.returncode})") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis-server silent after {within}s") from None
                await asyncio.sleep(0.02)
            finally:
                await client.aclose()

    async def stop(self) -> None:
        """SIGTERM to its PID, and wait until it has exited (its port is free again)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def restart(self) -> None:
        """Stop it and start an empty one on the same port."""
        await self.stop()
        await self.start()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A running ``redis-server`` (see ``RedisServer``), stopped after the test."""
    if shutil.which(os.environ.get("REDIS_SERVER", "redis-server")) is None:
        pytest.fail("redis-server is not installed (scripts/system-deps installs it)")
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()
