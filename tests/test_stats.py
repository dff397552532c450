"""``stats.snapshot``: the status page's numbers, from a real store, at a fixed clock; the same
rows as ``report`` (one query layer)."""

from __future__ import annotations

import calendar
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from proxy import report, stats
from proxy.adapters.base import UsageSource
from proxy.attribution import Attributes
from proxy.config import StorageConfig
from proxy.events import Event
from proxy.store import Store

NOW = calendar.timegm(time.strptime("2026-11-29T12:02:30", "%Y-%m-%dT%H:%M:%S"))


def at(hms: str, model: str, cost: float, fp: int, app: str | None = None, **kw: Any) -> Event:
    fields: dict[str, Any] = {
        "ts": f"2026-11-29T{hms}Z",
        "provider": "anthropic" if model.startswith("claude") else "openai",
        "model": model,
        "endpoint": "/chat/completions",
        "status": 200,
        "tokens_in": 10,
        "tokens_out": 2,
        "cost_usd": cost,
        "latency_ms": 5,
        "fingerprint": "sha256:" + f"{fp:064x}",
        "stream": False,
        "usage_source": UsageSource.REPORTED,
        "priced": True,
        "attributes": Attributes(app=app) if app else None,
    }
    return Event(**{**fields, **kw})


EVENTS = [
    at("10:00:00", "gpt-4o-mini", 4.0, 9),  # before the day's last hour
    at("11:04:59.999", "gpt-4o-mini", 8.0, 8, "billing"),  # one ms before the first bucket
    at("11:05:00", "gpt-4o-mini", 0.5, 1, "billing"),
    at("11:50:10.5", "claude-sonnet-4-5", 1.0, 2),
    at("12:01:00.123", "gpt-4o-mini", 0.25, 1, "billing"),
    at("12:01:30", "gpt-4o-mini", 0.25, 1, "search"),
    at("12:02:00", "gpt-4o-mini", 0.0, 1, "billing", status=429, refused_by="manual"),
    at("12:02:01", "gpt-4o-mini", 0.0, 1, "billing", status=429, refused_by="spend_cap"),
    at("12:02:02", "gpt-4o-mini", 0.0, 3, "billing", status=429, refused_by="manual"),
    at("12:02:03", "gpt-4o-mini", 0.0, 4, usage_unknown=True, usage_source=UsageSource.NONE),
]


async def filled(path: Path, events: list[Event]) -> Path:
    store = await Store.open(StorageConfig(path=path, commit_interval_ms=20), ship=False)
    store.start()
    for e in events:
        store.enqueue(e)
    await store.close()
    return path


async def test_the_last_hour(tmp_path: Path) -> None:
    path = await filled(tmp_path / "s" / "spool.sqlite3", EVENTS)
    snap = stats.snapshot(path, "hour", now=NOW)
    first = NOW - 150 - 11 * 300  # 11:05:00, the first of 12 five-minute buckets
    assert snap["buckets"] == [first + 300 * i for i in range(12)]
    assert (snap["range"], snap["step_seconds"]) == ("hour", 300)
    assert snap["totals"] == {
        "requests": 8,
        "refused": 3,
        "errors": 0,
        "tokens_in": 80,
        "tokens_out": 16,
        "cost_usd": 2.0,
        "unpriced": 0,
        "unknown_cost": 1,
    }
    since = NOW - first
    assert snap["by_model"] == [r.as_dict("name") for r in report.query(path, "model", since, NOW)]
    assert [(r["name"], r["requests"], r["cost_usd"]) for r in snap["by_model"]] == [
        ("gpt-4o-mini", 7, 1.0),  # (a tie on spend: more requests first)
        ("claude-sonnet-4-5", 1, 1.0),
    ]
    assert [(r["name"], r["requests"], r["refused"], r["cost_usd"]) for r in snap["by_app"]] == [
        ("(none)", 2, 0, 1.0),
        ("billing", 5, 3, 0.75),
        ("search", 1, 0, 0.25),
    ]
    zero = [0.0] * 12
    assert snap["series"] == {
        "requests": [1] + [0] * 8 + [1, 0, 6],
        "by_model": [
            {"name": "claude-sonnet-4-5", "cost_usd": zero[:9] + [1.0, 0.0, 0.0]},
            {"name": "gpt-4o-mini", "cost_usd": [0.5] + zero[:10] + [0.5]},
        ],
        "by_app": [
            {"name": "(none)", "cost_usd": zero[:9] + [1.0, 0.0, 0.0]},
            {"name": "billing", "cost_usd": [0.5] + zero[:10] + [0.25]},
            {"name": "search", "cost_usd": zero[:11] + [0.25]},
        ],
    }
    assert snap["refusals"] == [
        {"layer": "manual", "requests": 2},
        {"layer": "spend_cap", "requests": 1},
    ]
    assert snap["fingerprints"] == [
        {
            "fingerprint": "sha256:" + f"{1:064x}",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "app": "billing",
            "requests": 4,
            "refused": 2,
            "cost_usd": 0.75,
            "last_ts": "2026-11-29T12:02:01Z",
        }
    ]


async def test_rows_stored_before_the_range_are_not_read(tmp_path: Path) -> None:
    """Each row's ``created`` is when it was stored, a little after its ts: the snapshot skips
    the rows stored more than 5 minutes before its first bucket (they cannot hold an event of
    it) and reads the same numbers."""
    path = await filled(tmp_path / "s" / "spool.sqlite3", EVENTS)
    everything = stats.snapshot(path, "hour", now=NOW)
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE events SET created ="
        " strftime('%s', substr(json_extract(CAST(body AS TEXT), '$.ts'), 1, 19)) + 1"
    )
    db.commit()
    # 10:00:00 stored at 10:00:01, before 11:00:00 (the first bucket, 11:05, less 5 minutes)
    assert stats.first_id(db, NOW - 150 - 11 * 300) == 2
    assert stats.first_id(db, NOW + 3600) == 11  # (after the last row)
    assert stats.first_id(db, 0) == 1
    db.close()
    assert stats.snapshot(path, "hour", now=NOW) == everything
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE id <= 2")  # retention: ids with gaps
    db.commit()
    assert stats.first_id(db, NOW - 150 - 11 * 300) == 3
    db.close()


async def test_day_and_week_buckets(tmp_path: Path) -> None:
    path = await filled(tmp_path / "s" / "spool.sqlite3", EVENTS)
    day = stats.snapshot(path, "day", now=NOW)
    noon = NOW - 150
    assert day["buckets"] == [noon - 3600 * (23 - i) for i in range(24)]
    assert day["series"]["requests"][-4:] == [0, 1, 3, 6]  # 09:00, 10:00, 11:00, 12:00
    assert day["totals"]["cost_usd"] == 14.0
    week = stats.snapshot(path, "week", now=NOW)
    assert len(week["buckets"]) == 7
    assert week["buckets"][-1] == calendar.timegm(time.strptime("2026-11-29", "%Y-%m-%d"))
    assert week["series"]["requests"] == [0] * 6 + [10]


async def test_more_than_eight_names_add_up_to_other(tmp_path: Path) -> None:
    events = [at("12:00:00", f"model-{i}", float(i), i) for i in range(1, 11)]
    path = await filled(tmp_path / "s" / "spool.sqlite3", events)
    series = stats.snapshot(path, "hour", now=NOW)["series"]["by_model"]
    assert [(s["name"], s["cost_usd"][-1]) for s in series] == [
        ("model-10", 10.0),
        ("model-9", 9.0),
        ("model-8", 8.0),
        ("model-7", 7.0),
        ("model-6", 6.0),
        ("model-5", 5.0),
        ("model-4", 4.0),
        ("(other)", 6.0),  # 3 + 2 + 1
    ]


async def test_a_slow_read_is_cut_short(tmp_path: Path) -> None:
    events = [at("12:00:00", "gpt-4o-mini", 0.001, i) for i in range(3000)]
    path = await filled(tmp_path / "s" / "spool.sqlite3", events)
    with pytest.raises(stats.StatsTimeout, match=r"^the store took over 0.0s to answer$"):
        stats.snapshot(path, "hour", now=NOW, max_seconds=0.0)
    assert stats.snapshot(path, "hour", now=NOW)["totals"]["requests"] == 3000
