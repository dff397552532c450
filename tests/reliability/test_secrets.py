"""Case 12: secrets stay secret. Canary keys in every auth header the providers use, in
``?key=``, in bodies (held and streamed), in error paths and in a malformed request, with debug
logging on: none of them shows up in the daemon's output, its store and WAL, what it ships, or
/metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import eventually
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from ..process import spawn_daemon
from .conftest import Figures, port_of, raw_request

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_no_secret_in_logs_store_or_metrics(
    fake: FakeProvider, ingest: FakeIngest, tmp_path: Path, figures: Figures
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLASBURN_")}
    env["STATE_DIRECTORY"] = str(tmp_path / "state")
    canaries = {
        "openai": "sk-canary-openai-0001",
        "anthropic": "sk-ant-canary-0002",
        "azure": "canary-azure-0003",
        "gemini_header": "canary-gemini-0004",
        "gemini_query": "canary-gemini-query-0005",
        "local": "abn_canary_local_0006",
        "body": "canary-in-body-0007",
        "proxy_auth": "canary-proxy-auth-0009",
        "oversized_header": "canary-oversized-0010",
        "streamed_body": "canary-streamed-body-0011",
    }
    ingest.api_key = canaries["local"]
    spool = tmp_path / "spool.sqlite3"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[logging]\nlevel = "debug"\n[storage]\npath = "{spool}"\n'
        "[server]\nmax_buffered_body_bytes = 10000\n"
        f'[atlasburn]\napi_base = "{ingest.url}"\napi_key = "{canaries["local"]}"\n'
        f"[telemetry]\nflush_interval_ms = 50\n"
        f'[providers.openai]\nbase_url = "{fake.url}"\n'
        f'[providers.anthropic]\nbase_url = "{fake.url}"\n'
        f'[providers.gemini]\nbase_url = "{fake.url}"\n'
        f'[providers.azure]\nkind = "azure"\nbase_url = "{fake.url}"\n'
        '[providers.down]\nkind = "gemini"\nbase_url = "http://127.0.0.1:9"\n'
    )
    d = await spawn_daemon("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    gem = "/v1beta/models/gemini-2.5-flash:generateContent"
    calls: list[tuple[str, dict[str, str], Any]] = [
        (
            "/v1/chat/completions",
            {"Authorization": f"Bearer {canaries['openai']}"},
            {**CHAT, "user": canaries["body"]},
        ),
        (
            "/anthropic/v1/messages",
            {"x-api-key": canaries["anthropic"]},
            {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []},
        ),
        (
            "/azure/openai/deployments/d/chat/completions?api-version=1",
            {"api-key": canaries["azure"]},
            {"messages": []},
        ),
        ("/gemini" + gem, {"x-goog-api-key": canaries["gemini_header"]}, {"contents": []}),
        ("/gemini" + gem + f"?key={canaries['gemini_query']}", {}, {"contents": []}),
        ("/down" + gem + f"?key={canaries['gemini_query']}", {}, {"contents": []}),  # 502 path
        (
            "/v1/chat/completions",
            {"Authorization": f"Bearer {canaries['openai']}", "x-fake-status": "401"},
            CHAT,
        ),  # provider error path
    ]
    async with aiohttp.ClientSession() as s:
        for path, headers, body in calls:
            async with s.post(d.url + path, json=body, headers=headers) as r:
                await r.read()
        # A body too large to hold (streamed), with a key in it and in the usual header.
        big = {**CHAT, "messages": [{"role": "user", "content": canaries["streamed_body"] * 900}]}
        async with s.post(
            d.url + "/v1/chat/completions",
            json=big,
            headers={
                "Authorization": f"Bearer {canaries['openai']}",
                "Proxy-Authorization": f"Basic {canaries['proxy_auth']}",
            },
        ) as r:
            assert r.status == 200
        async with s.post(
            d.url + "/api/ingest",
            data=b"{bad",
            headers={"AtlasBurn-API-Key": "abn_canary_wrong_0008"},
        ) as r:
            assert r.status == 401
        async with s.get(d.url + "/metrics") as r:
            scraped = await r.text()
    # A request head too large, with a canary in it: 431, and the canary stays out of the log.
    oversized = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
        + canaries["oversized_header"].encode()
        + b"x" * 9000
        + b"\r\n\r\n"
    )
    assert (await raw_request(port_of(d.url), oversized)).split(b" ", 2)[1] == b"431"
    await eventually(lambda: len(ingest.delivered()) >= len(calls) + 1)
    assert await d.stop() == 0
    shipped = str(ingest.calls)
    stored = read_store(spool)
    for name, canary in canaries.items():
        assert canary not in d.log, name
        assert canary not in scraped, name
        assert canary.encode() not in stored, name
        if name != "local":  # the local key is sent as the ingest header, as it must be
            assert canary not in shipped, name
    assert "abn_canary_wrong_0008" not in d.log
    assert "level=debug" in d.log and "msg=request" in d.log  # it did log, at debug and info
    figures("canaries", f"{len(canaries) + 1}: 0 found in stderr, store + WAL, shipped, /metrics")


def read_store(spool: Path) -> bytes:
    """The store file with its WAL and shared-memory files."""
    return b"".join(
        Path(str(spool) + suffix).read_bytes()
        for suffix in ("", "-wal", "-shm")
        if os.path.exists(str(spool) + suffix)
    )
