"""The failing inputs found by trying the daemon as a new user would (tests/fixtures/cases/, from
issue 16): each case's requests go through a daemon to a provider answering the case's exact
bytes, and the last recorded event must hold the case's expected values (costs to 1e-12 USD).

A case not fixed yet is marked ``xfail(strict=True)`` with the part of issue 16 it waits for: it
runs, and the day it passes the mark must go.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import Daemon
from proxy.config import parse_config
from proxy.events import Event

from .fakes.cases import CASES, Case, CaseProvider
from .fakes.server import start

WAITING: dict[str, str] = {}

NAMES = sorted(p.name for p in CASES.iterdir() if p.is_dir())


def marked(name: str) -> Any:
    if name in WAITING:
        return pytest.param(name, marks=pytest.mark.xfail(reason=WAITING[name], strict=True))
    return name


class Running:
    def __init__(self, daemon: Daemon, events: list[Event]) -> None:
        self.daemon = daemon
        self.events = events


@pytest.fixture
async def case_daemon(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Case, Running]]:
    case = Case.load(request.param)
    provider = CaseProvider(case)
    if (case.folder / "make_upstream.py").exists():  # a body too large to ship
        made = tmp_path / "upstream_response.json"
        script = [sys.executable, str(case.folder / "make_upstream.py"), str(made)]
        await asyncio.to_thread(subprocess.run, script, check=True)
        provider.made["upstream_response.json"] = made
    upstream = await start(provider.app())
    url = upstream.url
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 2},
            "attribution": {"process": False},  # (see conftest.start_daemon)
            "storage": {"path": str(tmp_path / "state" / "spool.sqlite3")},
            "providers": {
                "openai": {"base_url": url},
                "anthropic": {"base_url": url},
                "gemini": {"base_url": url},
                "azure": {"kind": "azure", "base_url": url},
            },
        },
        env={},
    )
    events: list[Event] = []
    daemon = Daemon(config, record=events.append)
    await daemon.start()
    try:
        yield case, Running(daemon, events)
    finally:
        await daemon.stop()
        await upstream.stop()


@pytest.mark.parametrize("case_daemon", [marked(n) for n in NAMES], indirect=True)
async def test_case_records_its_expected_event(case_daemon: tuple[Case, Running]) -> None:
    case, running = case_daemon
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for step in case.steps:
            if "websocket" in step:
                ws = step["websocket"]
                try:
                    async with session.ws_connect(
                        running.daemon.url + ws["path"], headers=ws["headers"]
                    ) as socket:
                        status = 101
                        await socket.close()
                except aiohttp.WSServerHandshakeError as exc:
                    status = exc.status
                assert status == case.expected["status"]
                continue
            sent = step["request"]
            async with session.post(
                running.daemon.url + sent["path"],
                data=case.file(sent["body_file"]),
                headers=sent["headers"],
            ) as answer:
                await answer.read()
    event = running.events[-1]
    for key, value in case.expected.items():
        got = getattr(event, key)
        if key == "cost_usd":
            assert abs(got - value) <= 1e-12, (key, got, value)
        else:
            assert got == value, (key, got, value)
