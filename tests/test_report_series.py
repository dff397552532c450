"""``report --by hour|day`` (a time series), ``--by fingerprint`` (whole, with provider and
model), and ``report`` on a store that does not exist (issue 18, the command line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .conftest import StartDaemon
from .fakes.ingest import ingest_event
from .fakes.provider import FakeProvider
from .test_report_since import ingested

ROOT = Path(__file__).parent.parent
LOOP = "sha256:" + f"{1:064x}"
OTHER = "sha256:" + f"{2:064x}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture
async def store(fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path) -> Path:
    """A config whose store holds four events on both sides of a midnight (UTC), fingerprint
    ``LOOP`` three times (openai gpt-4o-mini), ``OTHER`` once (anthropic claude-haiku-4-5)."""
    spool = tmp_path / "r" / "spool.sqlite3"
    await ingested(
        start_daemon,
        spool,
        [
            ingest_event(1, ts="2026-11-27T23:59:59.999Z", cost_usd=0.25, tokens_in=10),
            ingest_event(1, ts="2026-11-28T00:00:00Z", cost_usd=0.25, tokens_in=20),
            ingest_event(
                2,
                ts="2026-11-28T00:30:00.5Z",
                provider="anthropic",
                model="claude-haiku-4-5",
                endpoint="/messages",
                cost_usd=0.5,
                tokens_in=40,
            ),
            ingest_event(1, ts="2026-11-28T13:00:00.000Z", cost_usd=0.125, tokens_in=80),
        ],
    )
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    return config


def rows(config: Path, by: str) -> list[tuple[object, ...]]:
    done = cli("report", "--config", str(config), "--since", "all", "--by", by, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["total"]["requests"] == 4 and out["total"]["cost_usd"] == 1.125
    return [tuple(row.values()) for row in out["rows"]]


async def test_by_hour_and_day_are_time_series_oldest_first(store: Path) -> None:
    # bucket, requests, refused, errors, tokens in, tokens out, cost, unpriced, unknown cost
    assert rows(store, "hour") == [
        ("2026-11-27T23:00Z", 1, 0, 0, 10, 20, 0.25, 0, 0),
        ("2026-11-28T00:00Z", 2, 0, 0, 60, 40, 0.75, 0, 0),
        ("2026-11-28T13:00Z", 1, 0, 0, 80, 20, 0.125, 0, 0),
    ]
    assert rows(store, "day") == [
        ("2026-11-27", 1, 0, 0, 10, 20, 0.25, 0, 0),
        ("2026-11-28", 3, 0, 0, 140, 60, 0.875, 0, 0),
    ]
    done = cli("report", "--config", str(store), "--since", "all", "--by", "day")
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines()]
    assert table[2:] == [
        ["2026-11-27", "1", "0", "0", "10", "20", "0.250000", "0", "0"],
        ["2026-11-28", "3", "0", "0", "140", "60", "0.875000", "0", "0"],
        ["-" * 10, "-" * 8, "-" * 7, "-" * 6, "-" * 9, "-" * 10, "-" * 8, "-" * 8, "-" * 12],
        ["total", "4", "0", "0", "150", "80", "1.125000", "0", "0"],
    ]


async def test_by_fingerprint_shows_it_whole_with_provider_and_model(store: Path) -> None:
    done = cli("report", "--config", str(store), "--since", "all", "--by", "fingerprint", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["rows"] == [
        {
            "fingerprint": LOOP,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "requests": 3,
            "refused": 0,
            "errors": 0,
            "tokens_in": 110,
            "tokens_out": 60,
            "cost_usd": 0.625,
            "unpriced": 0,
            "unknown_cost": 0,
        },
        {
            "fingerprint": OTHER,
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "requests": 1,
            "refused": 0,
            "errors": 0,
            "tokens_in": 40,
            "tokens_out": 20,
            "cost_usd": 0.5,
            "unpriced": 0,
            "unknown_cost": 0,
        },
    ]
    done = cli("report", "--config", str(store), "--since", "all", "--by", "fingerprint")
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines()]
    assert table[1][:3] == ["fingerprint", "provider", "model"]
    assert table[2] == [
        *(LOOP, "openai", "gpt-4o-mini"),
        *("3", "0", "0", "110", "60", "0.625000", "0", "0"),
    ]
    assert table[3][:3] == [OTHER, "anthropic", "claude-haiku-4-5"]
    assert table[-1] == ["total", "4", "0", "0", "150", "80", "1.125000", "0", "0"]


async def test_report_says_which_store_it_reads(store: Path) -> None:
    done = cli("report", "--config", str(store), "--since", "all")
    spool = store.parent / "r" / "spool.sqlite3"
    assert (done.returncode, done.stderr) == (0, f"report: store {spool}\n")


def test_report_on_a_store_that_does_not_exist_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "none.sqlite3"}"\n')
    done = cli("report", "--config", str(config), "--json")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"report: no store at {tmp_path / 'none.sqlite3'} (storage.path): the daemon has not run"
        " with this config; pass the --config it runs with\n"
    )


async def test_a_loop_is_allowed_straight_from_the_report(
    fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A loop trips; its 429 and ``report --by fingerprint`` name the same fingerprint; put in
    ``allow_fingerprints`` as printed, the same requests pass."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "poll"}]}
    spool = tmp_path / "loop" / "spool.sqlite3"
    d = await start_daemon(storage={"path": str(spool)})
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(4):
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                statuses.append(r.status)
                message = (await r.json()).get("error", {}).get("message", "")
    await d.daemon.stop()
    assert statuses == [200, 200, 200, 429]
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    done = cli("report", "--config", str(config), "--by", "fingerprint", "--json")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["rows"]
    fp = row["fingerprint"]
    assert (row["provider"], row["model"], row["requests"], row["refused"]) == (
        "openai",
        "gpt-4o-mini",
        4,
        1,
    )
    assert f'add "{fp}" to guardrails.dumb_loop_detector.allow_fingerprints' in message

    allowed = await start_daemon(
        storage={"path": str(tmp_path / "allowed" / "spool.sqlite3")},
        guardrails={"dumb_loop_detector": {"allow_fingerprints": [fp]}},
    )
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(6):
            async with s.post(allowed.url + "/v1/chat/completions", json=body) as r:
                statuses.append(r.status)
    assert statuses == [200] * 6
