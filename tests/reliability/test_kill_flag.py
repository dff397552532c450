"""Case 14: the kill flag. Setting and clearing it takes effect on the next request; the 429 says
how long is left; it expires on time with the AtlasBurn API unreachable; and a restart lets no
request through while it is set."""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp

from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, free_port, resume, suspend


async def call(url: str, n: int) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": f"k {n}"}
        ) as r:
            await r.read()
            return r.status, dict(r.headers)


async def test_set_and_clear_take_effect_on_the_next_request(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    p = await start_proxy()
    assert (await call(p.url, 0))[0] == 200
    asked = time.monotonic()
    assert await suspend(p.url, ingest.api_key, 30) == 200
    status, headers = await call(p.url, 1)
    elapsed = time.monotonic() - asked  # the flag was set and read within this
    assert status == 429
    retry_after = int(headers["Retry-After"])
    assert math.ceil(30 - elapsed) <= retry_after <= 30
    assert 30_000 - elapsed * 1000 - 1 <= int(headers["retry-after-ms"]) <= 30_000
    assert await resume(p.url, ingest.api_key) == 200
    assert (await call(p.url, 2))[0] == 200
    figures("Retry-After for a 30 s suspension", retry_after)


async def test_expiry_lands_on_time_with_the_api_unreachable(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: every call fails
    p = await start_proxy(atlasburn={"api_base": nowhere})
    asked = time.monotonic()
    assert await suspend(p.url, ingest.api_key, 3) == 200
    # The flag was set between asking and the answer: it expires between these two.
    earliest, latest = asked + 3, time.monotonic() + 3
    n = 0
    while True:
        n += 1
        sent = time.monotonic()
        status, _ = await call(p.url, n)
        answered = time.monotonic()
        if status == 200:
            break
        assert status == 429
        # On time, whatever the machine's load: a request sent after the expiry passes.
        assert sent < latest
        await asyncio.sleep(0.05)
    assert answered >= earliest  # and none passed before it
    late = answered - latest
    figures("requests pass again after the expiry (s)", f"{late:.2f}")


async def test_restart_lets_nothing_through_while_suspended(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures
) -> None:
    p = await start_proxy()
    assert await suspend(p.url, ingest.api_key, 600) == 200
    assert await p.stop() == 0
    before = len(fake.requests)
    p = await start_proxy()
    statuses = await asyncio.gather(*(call(p.url, 100 + i) for i in range(50)))
    through = sum(1 for status, _ in statuses if status != 429)
    figures("requests through after a restart while suspended", f"{through}/50")
    assert through == 0 and len(fake.requests) == before
