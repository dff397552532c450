"""Start an aiohttp application on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web


class Running:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner
        self.port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(
    app: web.Application,
    *,
    shutdown_timeout: float = 0.5,
    on_connection: Callable[[], None] | None = None,
) -> Running:
    """``on_connection`` is called for every TCP connection accepted."""
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        auto_decompress=False,  # request bodies are kept as they arrived (as sent by the daemon)
    )
    await runner.setup()
    if on_connection is not None:
        assert runner.server is not None
        made = runner.server.connection_made

        def counted(handler: Any, transport: Any) -> None:
            on_connection()
            made(handler, transport)

        runner.server.connection_made = counted  # type: ignore[method-assign]
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Running(runner)
