"""Newer genai-prices data taken by a running daemon (issue 16.8.3), from a real loopback server.

The data file served here is genai-prices' own schema (the JSON array its ``UpdatePrices``
fetches), with gpt-4o-mini at a price no provider lists (0.30 in, 0.10 cached, 1.20 out per
million tokens) so that a cost at that rate can only come from the fetched file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.app import PRICE_DATA, RELAY
from proxy.config import PriceDataConfig
from proxy.price_data import PriceRefresher
from proxy.pricing import Catalog

from .conftest import StartDaemon, eventually
from .fakes.server import start

M = Decimal(1_000_000)
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# The fake's chat completion: 1536 prompt tokens of which 1024 cached, 7 completion tokens.
PACKAGED = (512 * Decimal("0.15") + 1024 * Decimal("0.075") + 7 * Decimal("0.60")) / M
FETCHED = (512 * Decimal("0.30") + 1024 * Decimal("0.10") + 7 * Decimal("1.20")) / M


def data_file() -> bytes:
    def provider(pid: str, pattern: str, model: str) -> dict[str, Any]:
        return {
            "id": pid,
            "name": pid,
            "api_pattern": pattern,
            "models": [
                {
                    "id": model,
                    "match": {"starts_with": model},
                    "prices": {"input_mtok": 0.30, "cache_read_mtok": 0.10, "output_mtok": 1.20},
                }
            ],
        }

    return orjson.dumps(
        [
            provider("openai", r"https://api\.openai\.com", "gpt-4o-mini"),
            provider("anthropic", r"https://api\.anthropic\.com", "claude-sonnet-4-6"),
            provider("google", r"https://generativelanguage\.googleapis\.com", "gemini-2.5-flash"),
        ]
    )


class DataServer:
    """Serves ``body`` at /data.json once ``gate`` is set (a hanging server until then)."""

    def __init__(self) -> None:
        self.body = data_file()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fetches = 0
        self.url = ""

    def app(self) -> web.Application:
        async def data(request: web.Request) -> web.Response:
            self.fetches += 1
            await self.gate.wait()
            return web.Response(body=self.body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/data.json", data)
        return app


@pytest.fixture
async def server() -> AsyncIterator[DataServer]:
    srv = DataServer()
    running = await start(srv.app())
    srv.url = running.url + "/data.json"
    yield srv
    srv.gate.set()
    await running.stop()


async def chat(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json=CHAT_BODY) as r:
            assert r.status == 200
            await r.read()


async def test_a_running_daemon_takes_newer_data(
    server: DataServer, start_daemon: StartDaemon
) -> None:
    server.gate.clear()  # the first fetch hangs: start-up must not wait for it
    running = await asyncio.wait_for(
        start_daemon(price_data={"refresh_url": server.url, "refresh_interval_seconds": 1.0}),
        timeout=10,
    )
    await eventually(lambda: server.fetches == 1)
    await chat(running.url)
    assert running.events[0].cost_usd == float(PACKAGED)
    server.gate.set()
    refresher = running.daemon.app[PRICE_DATA]
    await eventually(lambda: refresher.catalog is not None)
    await chat(running.url)
    assert abs(running.events[1].cost_usd - float(FETCHED)) < 1e-12
    assert running.events[1].cost_usd == float(FETCHED)
    rates = running.daemon.app[RELAY].pricer.rates("openai", "gpt-4o-mini")
    assert rates is not None
    assert rates.source.startswith("genai-prices ")
    assert " (data fetched " in rates.source and f" from {server.url}, sha256 " in rates.source


def refresher_for(url: str, **config: Any) -> tuple[PriceRefresher, list[Catalog]]:
    used: list[Catalog] = []
    return PriceRefresher(PriceDataConfig(refresh_url=url, **config), used.append), used


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"<html>rate limited</html>", "not JSON"),
        (b'{"providers": []}', "wrong schema"),
        (b'[{"id": 1}]', "wrong schema"),
        (b'[{"id": "openai", "name": "OpenAI", "api_pattern": "x", "models": []}]', "wrong schema"),
        (b"[" + b" " * 2048 + b"]", "too large"),
    ],
)
async def test_a_bad_file_keeps_the_data_in_use_and_is_logged_once(
    server: DataServer, caplog: pytest.LogCaptureFixture, body: bytes, kind: str
) -> None:
    refresher, used = refresher_for(server.url, max_bytes=1024)
    assert await refresher.refresh() is True  # a good file first
    good = refresher.catalog
    server.body = body
    with caplog.at_level(logging.WARNING, logger="proxy.price_data"):
        assert await refresher.refresh() is False
        assert await refresher.refresh() is False
    assert refresher.catalog is good
    assert used == [good]
    assert refresher.failures_total == 2
    [record] = caplog.records
    assert f"({kind}: " in record.getMessage()
    assert "still pricing from data fetched " in record.getMessage()


async def test_a_hanging_server_times_out_and_keeps_the_packaged_data(
    server: DataServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.gate.clear()
    refresher, used = refresher_for(server.url, timeout_seconds=0.3)
    with caplog.at_level(logging.WARNING, logger="proxy.price_data"):
        assert await asyncio.wait_for(refresher.refresh(), timeout=5) is False
    assert (refresher.catalog, used) == (None, [])
    [record] = caplog.records
    assert "(timeout: " in record.getMessage()
    assert "still pricing from packaged data" in record.getMessage()
