"""Issue 13 F4: the access log says what is true about usage.

``usage=`` on each access line says how the event's tokens were obtained. A guardrail refusal,
an error the daemon made before any answer (502: the provider is down) and a client that left
before any answer (499) metered nothing: ``usage=none``. An answer with usage is ``reported``; a
stream cut after it began is ``partial``.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from ..conftest import eventually
from ..fakes.ingest import FakeIngest
from .conftest import Figures, StartProxy, free_port, suspend

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def access_fields(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(provider, status, usage, refused_by) of every access line, in order."""
    out = []
    for line in lines:
        if "logger=atlasburn.access" not in line:
            continue
        fields = dict(re.findall(r" (provider|status|usage|refused_by)=(\S*)", line))
        out.append((fields["provider"], fields["status"], fields["usage"], fields["refused_by"]))
    return out


async def test_usage_in_the_access_log_says_what_was_metered(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    proxy = await start_proxy(ship=False, providers={"down": {"kind": "openai", "base_url": down}})
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            await r.read()
        async with s.post(proxy.url + "/down/v1/chat/completions", json=CHAT) as r:
            assert r.status == 502
            await r.read()
        async with s.post(
            proxy.url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-fault": "cut"},
        ) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        with pytest.raises(asyncio.TimeoutError):
            await s.post(
                proxy.url + "/v1/embeddings",
                json={"model": "text-embedding-3-small", "input": "left early"},
                headers={"x-fake-fault": "hang"},
                timeout=aiohttp.ClientTimeout(total=0.5),
            )
        # Recorded once the daemon sees the client gone (access lines are written in batches).
        await eventually(lambda: any(" status=499 " in line for line in proxy.process.lines))
        assert await suspend(proxy.url, ingest.api_key, 600) == 200
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429
            await r.read()
    await proxy.stop()
    seen = access_fields(proxy.process.lines)
    figures("access lines (provider, status, usage, refused_by)", seen)
    assert seen == [
        ("openai", "200", "reported", ""),
        ("down", "502", "none", ""),
        ("openai", "200", "partial", ""),
        ("openai", "499", "none", ""),
        ("openai", "429", "none", "operator"),
    ]


async def test_access_lines_say_who_without_the_key(start_proxy: StartProxy) -> None:
    """An access line names the app and the key's id (attribution), never the key."""
    key = "sk-test-fake-canary-Q7vZ2mX9kR4tW1y"
    proxy = await start_proxy(ship=False)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/@ci-bot/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert r.status == 200
            await r.read()
    await proxy.stop()
    [line] = [line for line in proxy.process.lines if "logger=atlasburn.access" in line]
    assert re.search(r" app=ci-bot key_id=key_[0-9a-f]{16}$", line.rstrip()), line
    assert not any(key[:8] in line for line in proxy.process.lines)
