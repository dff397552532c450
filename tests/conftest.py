"""Shared fixtures: a fake OpenAI provider on loopback and a daemon in front of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from proxy.app import Daemon
from proxy.config import parse_config
from proxy.events import Event

from .fakes.ingest import FakeIngest
from .fakes.provider import FakeProvider
from .fakes.server import start

# Property tests measure nothing about speed: on a busy two-core machine one example may take
# longer than hypothesis's 200 ms deadline, which is no failure.
settings.register_profile("atlasburn", deadline=None)
settings.load_profile("atlasburn")

# Daemons started as real processes; whatever a failing test leaves running is killed after it.
SPAWNED: list[asyncio.subprocess.Process] = []

# Figures the reliability suite measured (test, what, value), printed after the run.
FIGURES: list[tuple[str, str, str]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run the reliability suite for real durations (minutes each; by hand, not in CI)",
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for test, what, value in FIGURES:
            terminalreporter.write_line(f"{test}: {what} = {value}")


@pytest.fixture(autouse=True)
async def _no_leftover_processes() -> AsyncIterator[None]:
    yield
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def assert_same_upstream_request(fake: FakeProvider) -> None:
    """The last two requests the fake saw (direct, then through the daemon) are the same:
    method, path, body, and every header but those each hop sets for itself."""
    direct, via = fake.requests[-2], fake.requests[-1]
    assert (via.method, via.path, via.query, via.body) == (
        direct.method,
        direct.path,
        direct.query,
        direct.body,
    )
    per_hop = {"host", "content-length", "connection"}
    assert [(k.lower(), v) for k, v in via.headers if k.lower() not in per_hop] == [
        (k.lower(), v) for k, v in direct.headers if k.lower() not in per_hop
    ]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, to fill the disk for real (needs root to mount). Private (mode 0700): a
    tmpfs is world-writable (1777) by default, which the daemon refuses as a state directory."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full; the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider()
    running = await start(fake.app(), on_connection=fake.connected)
    fake.url = running.url
    yield fake
    await running.stop()


@dataclass
class RunningDaemon:
    daemon: Daemon
    events: list[Event] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.daemon.url


StartDaemon = Callable[..., Awaitable[RunningDaemon]]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
async def start_daemon(fake: FakeProvider, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start a daemon whose openai (and anthropic, gemini) upstreams point at the fake."""
    running: list[RunningDaemon] = []

    async def _start(**overrides: Any) -> RunningDaemon:
        url = fake.url
        data = merge(
            {
                "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 2},
                "storage": {"path": str(tmp_path / f"state{len(running)}" / "spool.sqlite3")},
                # The test process is every client here: its own pid is the last one a process
                # lookup reads, and an event waits for its connection's lookup. Process
                # attribution is tested on its own (test_attribution.py, reliability/).
                "attribution": {"process": False},
                "providers": {
                    "openai": {"base_url": url},
                    "anthropic": {"base_url": url},
                    "gemini": {"base_url": url},
                },
            },
            overrides,
        )
        events: list[Event] = []
        daemon = Daemon(parse_config(data, env={}), record=events.append)
        holder = RunningDaemon(daemon, events)
        await daemon.start()
        running.append(holder)
        return holder

    yield _start
    for holder in running:
        await holder.daemon.stop()


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> RunningDaemon:
    return await start_daemon()


@pytest.fixture
async def ingest() -> AsyncIterator[FakeIngest]:
    fake = FakeIngest()
    running = await start(fake.app())
    fake.url = running.url
    yield fake
    await running.stop()


def shipping(ingest: FakeIngest, **telemetry: Any) -> dict[str, Any]:
    """Config overrides for a daemon that ships to the fake ingest, quickly."""
    return {
        "atlasburn": {"api_base": ingest.url, "api_key": ingest.api_key},
        "storage": {"commit_interval_ms": 20},
        "telemetry": {
            "flush_interval_ms": 50,
            "max_backoff_seconds": 0.2,
            "poll_interval_seconds": 0.1,
            "shutdown_flush_seconds": 2,
            **telemetry,
        },
    }


async def eventually(check: Callable[[], bool], within: float = 5.0, every: float = 0.01) -> None:
    """Wait until ``check()`` holds (a test of background work), or fail after ``within`` s;
    ``check`` runs every ``every`` s (more for one that costs: it competes with the daemon)."""
    import asyncio
    import time

    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(every)


async def eventually_async(
    check: Callable[[], Awaitable[bool]], within: float = 5.0, every: float = 0.1
) -> None:
    """``eventually`` for a check that awaits (e.g. reads a daemon's /metrics)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(every)


def committed_fingerprints(spool: Path, scratch: Path) -> set[str]:
    """The fingerprints of every event committed to ``spool`` (a daemon's, after it was killed):
    read from a copy of the file and its WAL, so the spool is left exactly as the daemon will
    find it when it starts again."""
    import shutil
    import sqlite3

    scratch.mkdir(exist_ok=True)
    copy = scratch / spool.name
    for suffix in ("", "-wal"):
        source = Path(f"{spool}{suffix}")
        target = Path(f"{copy}{suffix}")
        target.unlink(missing_ok=True)
        if source.exists():
            shutil.copyfile(source, target)
    Path(f"{copy}-shm").unlink(missing_ok=True)
    db = sqlite3.connect(copy)
    try:
        return {
            json.loads(body)["fingerprint"] for (body,) in db.execute("SELECT body FROM events")
        }
    finally:
        db.close()


def cpu_wait(pid: int | str = "self") -> float:
    """Seconds the threads of process ``pid`` (this one by default) have spent runnable but
    waiting for a CPU, from /proc/<pid>/task/*/schedstat: time a busy machine took from it.
    A bound on how long something takes may leave that out (and only that: time spent
    computing, or blocked, still counts)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9
