"""``atlasburn-proxy report`` over a store the daemon filled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from .conftest import StartDaemon
from .fakes.provider import FakeProvider

ROOT = Path(__file__).parent.parent


def report(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "report", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_report(fake: FakeProvider, start_daemon: StartDaemon, tmp_path: Path) -> None:
    spool = tmp_path / "r" / "spool.sqlite3"
    d = await start_daemon(storage={"path": str(spool)})
    async with aiohttp.ClientSession() as s:
        for body in (
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}]},
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "b"}]},
            {"model": "text-embedding-3-small", "input": "c"},
        ):
            path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
            async with s.post(d.url + path, json=body) as r:
                assert r.status == 200
        async with s.post(
            d.url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini"},
            headers={"x-fake-status": "400"},
        ) as r:
            assert r.status == 400
        await d.daemon.kill.suspend("dumb_loop_detector", "test", 60, "local")
        async with s.post(d.url + "/v1/chat/completions", json={"model": "gpt-4o-mini"}) as r:
            assert r.status == 429
    await d.daemon.stop()

    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    chat_cost = 0.0001578  # 512 x 0.15 + 1024 x 0.075 + 7 x 0.60 per million (test_cost.py)
    out = json.loads(report(config, "--json", "--since", "1h"))
    assert out["rows"] == [
        {
            "model": "gpt-4o-mini",
            "requests": 4,
            "refused": 1,
            "errors": 1,
            "tokens_in": 3072,
            "tokens_out": 14,
            "cost_usd": round(2 * chat_cost, 10),
            "unpriced": 0,
            "unknown_cost": 0,
        },
        {
            "model": "text-embedding-3-small",
            "requests": 1,
            "refused": 0,
            "errors": 0,
            "tokens_in": 5,
            "tokens_out": 0,
            "cost_usd": 1e-07,
            "unpriced": 0,
            "unknown_cost": 0,
        },
    ]
    assert out["total"]["requests"] == 5 and out["total"]["refused"] == 1

    table = report(config, "--by", "endpoint", "--since", "all").splitlines()
    assert table[0] == "Spend since the beginning (all), by endpoint"
    assert table[1].split() == [
        "endpoint",
        "requests",
        "refused",
        "errors",
        "tokens",
        "in",
        "tokens",
        "out",
        "cost",
        "USD",
        "unpriced",
        "unknown",
        "cost",
    ]
    assert table[2].split() == [
        "/chat/completions",
        "4",
        "1",
        "1",
        "3,072",
        "14",
        "0.000316",
        "0",
        "0",
    ]
    assert table[3].split() == ["/embeddings", "1", "0", "0", "5", "0", "0.000000", "0", "0"]
    assert table[-1].split() == ["total", "5", "1", "1", "3,077", "14", "0.000316", "0", "0"]


def test_report_rejects_a_bad_since(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "report", "--since", "yesterday"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "--since: expected a duration like 30m, 24h, 7d or 'all', got 'yesterday'\n"
    )
