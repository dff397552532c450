"""Issue 13 F2: events posted to the local /api/ingest count at their own time, once.

The loop detector used to count an ingested event when it arrived: four events of one
fingerprint an hour apart, or one event posted four times (an ingest retry), suspended the org
"seen 4 times in 60s". Now an ingested event counts at its ``ts``, only inside the window, and a
repeat of the same event counts once; four distinct events inside the window still trip it, in
whatever order they arrive.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import eventually
from ..fakes.ingest import FakeIngest, ingest_event
from .conftest import Figures, StartProxy


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def spooled(spool: Path, fingerprint: str) -> int:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM events WHERE json_extract(CAST(body AS TEXT), '$.fingerprint')"
            " = ?",
            (fingerprint,),
        ).fetchone()
    finally:
        db.close()
    return int(n)


async def test_ingested_events_count_at_their_own_time_once(
    start_proxy: StartProxy, ingest: FakeIngest, figures: Figures
) -> None:
    proxy = await start_proxy(ship=False)
    key = {"AtlasBurn-API-Key": ingest.api_key}

    async with aiohttp.ClientSession() as s:

        async def post(event: dict[str, Any]) -> str:
            async with s.post(proxy.url + "/api/ingest", json=event, headers=key) as r:
                answer = await r.json()
                assert (r.status, answer["accepted"]) == (200, 1), answer
                return str(answer["guardrail_status"])

        async def state() -> dict[str, Any]:
            async with s.get(
                proxy.url + "/api/guardrails/enforce?org_id=org_local", headers=key
            ) as r:
                answer: dict[str, Any] = await r.json()
                return answer

        now = time.time()
        # An hour apart: at most one of them is inside any 60 s window. (An hour ahead of this
        # host's clock is refused: more than 5 minutes ahead.)
        hourly = [
            await post(ingest_event(1, ts=iso(now + hours * 3600))) for hours in (-3, -2, -1, 0)
        ]
        # The same event posted four times: an ingest retry.
        retried = [await post(ingest_event(2, ts=iso(now))) for _ in range(4)]
        between = await state()
        # Four distinct events of one fingerprint inside the window, out of order; one of them
        # 2 s ahead of this host's clock (a small lead counts as now).
        ages = (10.0, 50.0, -2.0, 30.0)
        looping = [await post(ingest_event(3, ts=iso(time.time() - age))) for age in ages]
        after = await state()

    figures("guardrail_status: four events an hour apart", hourly)
    figures("guardrail_status: one event posted four times", retried)
    figures("guardrail_status: four events in the window, ages 10, 50, -2, 30 s", looping)
    assert hourly == ["ok"] * 4
    assert retried == ["ok"] * 4
    assert between["state"] == "ok"
    assert looping == ["ok", "ok", "ok", "suspended"]
    assert (after["state"], after["layer"], after["reason"]) == (
        "suspended",
        "dumb_loop_detector",
        f"fingerprint sha256:{3:064x} seen 4 times in 60s",
    )
    # A repeat is counted once, and still spooled as it arrived.
    await eventually(lambda: spooled(proxy.spool, f"sha256:{2:064x}") == 4)
    figures("spooled copies of the event posted four times", 4)
