"""``report --since`` selects events by their own time, not by when they reached the store
(issue 13 F3): an event ingested now whose ``ts`` is a day old is not in the last 10 minutes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from proxy import report

from .conftest import StartDaemon, eventually
from .fakes.ingest import ingest_event
from .fakes.provider import FakeProvider

ROOT = Path(__file__).parent.parent
KEY = "abn_test_report_since_key"


def ts(epoch: float, digits: int = 3) -> str:
    """``epoch`` as an event ts with ``digits`` fractional digits (0: none)."""
    base = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (base[: 20 + digits] if digits else base[:19]) + "Z"


def run_report(config: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "report", "--config", str(config), "--json", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


async def ingested(start_daemon: StartDaemon, spool: Path, events: list[dict[str, Any]]) -> None:
    """A daemon that took ``events`` on its local /api/ingest, stopped once they are stored."""
    d = await start_daemon(storage={"path": str(spool)}, atlasburn={"api_key": KEY})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            d.url + "/api/ingest", json={"events": events}, headers={"AtlasBurn-API-Key": KEY}
        ) as r:
            assert (await r.json())["accepted"] == len(events)
    store = d.daemon.store
    await eventually(lambda: store.committed_total == len(events))
    await d.daemon.stop()


async def test_since_selects_events_by_their_ts(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    spool = tmp_path / "r" / "spool.sqlite3"
    now = time.time()
    await ingested(
        start_daemon,
        spool,
        [
            ingest_event(1, model="day-old", ts=ts(now - 86400)),
            ingest_event(2, model="recent", ts=ts(now - 300)),
            ingest_event(3, model="recent-plain", ts=ts(now - 300, 0)),
            ingest_event(4, model="recent-micro", ts=ts(now - 300, 6)),
            ingest_event(5, model="eleven-minutes", ts=ts(now - 660, 0)),
        ],
    )
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    last_10m = run_report(config, "--since", "10m")
    last_2d = run_report(config, "--since", "2d")
    assert sorted(row["model"] for row in last_10m["rows"]) == [
        "recent",
        "recent-micro",
        "recent-plain",
    ]
    assert last_10m["total"]["requests"] == 3
    assert sorted(row["model"] for row in last_2d["rows"]) == [
        "day-old",
        "eleven-minutes",
        "recent",
        "recent-micro",
        "recent-plain",
    ]


async def test_since_is_exact_to_the_second_with_and_without_fractions(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """ISO timestamps of one format compare as text, but ``...:05Z`` sorts after ``...:05.5Z``
    though it is earlier: the cutoff is a whole second, so every form of a ts compares right."""
    spool = tmp_path / "r" / "spool.sqlite3"
    cutoff = float(int(time.time()) - 100)  # a whole second: "...:SS"
    await ingested(
        start_daemon,
        spool,
        [
            ingest_event(1, model="second-before-999999", ts=ts(cutoff - 1 + 0.999999, 6)),
            ingest_event(2, model="second-before-plain", ts=ts(cutoff - 1, 0)),
            ingest_event(3, model="at-plain", ts=ts(cutoff, 0)),
            ingest_event(4, model="at-000", ts=ts(cutoff, 3)),
            ingest_event(5, model="at-5", ts=ts(cutoff + 0.5, 1)),
            ingest_event(6, model="next-plain", ts=ts(cutoff + 1, 0)),
        ],
    )
    now = cutoff + 100
    for since in (100.0, 99.5, 99.000001):  # cutoffs within the same second: that second
        rows = report.query(spool, "model", since, now=now)
        assert sorted(r.key for r in rows) == ["at-000", "at-5", "at-plain", "next-plain"], since
    rows = report.query(spool, "model", 100.5, now=now)  # the second before, whole
    assert len(rows) == 6
    assert report.render(rows, "model", "100s", 100.0, now=now).splitlines()[0] == (
        f"Spend since {ts(cutoff, 0)} (100s), by model"
    )
