"""Shared fixtures: a fake OpenAI provider on loopback and a daemon in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.app import Daemon
from proxy.config import parse_config
from proxy.events import Event

from .fakes.provider import FakeOpenAI
from .fakes.server import start


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    running = await start(fake.app())
    fake.url = running.url  # type: ignore[attr-defined]
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
async def start_daemon(fake_openai: FakeOpenAI) -> AsyncIterator[StartDaemon]:
    """Start a daemon whose openai (and anthropic, gemini) upstreams point at the fake."""
    running: list[RunningDaemon] = []

    async def _start(**overrides: Any) -> RunningDaemon:
        url = fake_openai.url  # type: ignore[attr-defined]
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
