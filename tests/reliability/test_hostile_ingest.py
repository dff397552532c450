"""Attack review H2: one event posted to the local /api/ingest stopped the spool.

``latency_ms: 1e30`` was accepted, became an integer past 64 bits, and the store's writer died
encoding it: the API answered 500 for every later event, nothing more was spooled, and SIGTERM
hung (aiosqlite's thread kept the process alive). Now the event is rejected by its field, the
spool goes on, and the daemon stops at once.
"""

from __future__ import annotations

import time

import aiohttp

from ..conftest import eventually
from ..fakes.ingest import FakeIngest, ingest_event
from .conftest import Figures, StartProxy
from .test_ingest_time import spooled

# The exact body of the review.
ATTACK = (
    b'{"ts":"2026-11-29T01:55:24.123Z","provider":"openai","model":"m",'
    b'"endpoint":"/chat/completions","status":200,"tokens_in":1,"tokens_out":1,"cost_usd":0,'
    b'"latency_ms":1e30,"fingerprint":"sha256:' + b"c" * 64 + b'","stream":false}'
)


async def test_an_unencodable_event_is_refused_and_the_spool_goes_on(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    proxy = await start_proxy(ship=False)
    headers = {"AtlasBurn-API-Key": ingest.api_key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/api/ingest", data=ATTACK, headers=headers) as r:
            refused = (r.status, await r.json())
        answers = []
        for n in range(1, 6):
            async with s.post(
                proxy.url + "/api/ingest", data=ATTACK.replace(b"1e30", b"812"), headers=headers
            ) as r:
                answers.append(r.status)
            async with s.post(
                proxy.url + "/api/ingest", json=ingest_event(n), headers=headers
            ) as r:
                answers.append(r.status)
    figures("answer to the attack body", refused)
    assert refused == (
        200,
        {
            "accepted": 0,
            "rejected": 1,
            "guardrail_status": "ok",
            "errors": [
                {
                    "index": 0,
                    "error": "latency_ms: expected a whole number of milliseconds from 0 to"
                    " 2592000000, got 1e+30",
                }
            ],
        },
    )
    assert answers == [200] * 10
    await eventually(lambda: spooled(proxy.spool, "sha256:" + "c" * 64) == 5)
    await eventually(lambda: spooled(proxy.spool, f"sha256:{5:064x}") == 1)
    started = time.monotonic()
    code = await proxy.stop()
    figures("seconds from SIGTERM to exit", round(time.monotonic() - started, 2))
    assert code == 0, proxy.process.log
    assert time.monotonic() - started < 10
    assert "Traceback" not in proxy.process.log, proxy.process.log
