"""Shared fixtures: a fake OpenAI provider on loopback and a daemon in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.app import Daemon
from proxy.config import parse_config
from proxy.events import Event

from .fakes.provider import FakeProvider
from .fakes.server import start


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
async def fake() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider()
    running = await start(fake.app())
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
async def start_daemon(fake: FakeProvider) -> AsyncIterator[StartDaemon]:
    """Start a daemon whose openai (and anthropic, gemini) upstreams point at the fake."""
    running: list[RunningDaemon] = []

    async def _start(**overrides: Any) -> RunningDaemon:
        url = fake.url
        data = merge(
            {
                "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 2},
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
