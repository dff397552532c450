"""Unknown spend is visible (issue 16.9): a billed answer whose usage is missing or partial, and
a model with no price, are requests of unknown cost, not $0 ones: ``atlasburn-proxy report``
has a column for them and ``/metrics`` counts them by provider, model and reason.

One run through a daemon to a provider on loopback: a priced chat completion, a chat stream cut
mid-answer, a 400, a model with no price, a text-to-speech answer (audio: no usage in it), and
a ``GET /v1/models`` (not billed: never of unknown cost).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.adapters.base import UsageSource

from .conftest import StartDaemon, eventually
from .fakes.server import start
from .test_report import report

# gpt-4o-mini, USD per million tokens: 0.15 in, 0.60 out. 1000 in, 500 out.
CHAT_COST = (1000 * Decimal("0.15") + 500 * Decimal("0.60")) / 1_000_000  # = 0.00045


async def provider(request: web.Request) -> web.StreamResponse:
    if request.method == "GET":  # /v1/models
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini"}]})
    body: dict[str, Any] = await request.json()
    if request.path == "/v1/audio/speech":
        return web.Response(body=b"ID3\x04" + bytes(4096), content_type="audio/mpeg")
    if body["model"] == "bad":
        error = {"error": {"message": "no", "type": "invalid_request_error", "code": None}}
        return web.json_response(error, status=400)
    if body.get("stream"):  # two chunks, then the connection is cut
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Once", " upon"):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        assert request.transport is not None
        request.transport.close()
        return resp
    return web.json_response(
        {
            "id": "c2",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
        }
    )


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "a story"}], **extra}


async def test_report_and_metrics_show_requests_of_unknown_cost(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", provider)
    upstream = await start(app)
    spool = tmp_path / "u" / "spool.sqlite3"
    d = await start_daemon(
        storage={"path": str(spool)}, providers={"openai": {"base_url": upstream.url}}
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(d.url + "/v1/chat/completions", json=chat("gpt-4o-mini")) as r:
                assert r.status == 200
            body = chat("gpt-4o-mini", stream=True)
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
            async with s.post(d.url + "/v1/chat/completions", json=chat("bad")) as r:
                assert r.status == 400
            body = chat("acme-private-model-1")
            async with s.post(d.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
            body = {"model": "tts-1", "input": "Hello there", "voice": "alloy"}
            async with s.post(d.url + "/v1/audio/speech", json=body) as r:
                assert r.status == 200 and len(await r.read()) == 4100
            async with s.get(d.url + "/v1/models") as r:
                assert r.status == 200
            await eventually(lambda: len(d.events) == 6)
            async with s.get(d.url + "/metrics") as r:
                metrics = await r.text()
    finally:
        await d.daemon.stop()
        await upstream.stop()

    assert [(e.model, e.status, e.usage_source, e.unknown_cost) for e in d.events] == [
        ("gpt-4o-mini", 200, UsageSource.REPORTED, None),
        ("gpt-4o-mini", 200, UsageSource.PARTIAL, "partial"),
        ("bad", 400, UsageSource.MISSING, None),
        ("acme-private-model-1", 200, UsageSource.REPORTED, "unpriced"),
        ("tts-1", 200, UsageSource.MISSING, "missing"),
        ("", 200, UsageSource.MISSING, None),
    ]
    assert abs(d.events[0].cost_usd - float(CHAT_COST)) < 1e-12

    name = "atlasburn_unknown_cost_requests_total"  # (not _created: a time)
    assert [line for line in metrics.splitlines() if name in line] == [
        "# HELP atlasburn_unknown_cost_requests_total Requests whose cost is not known, by "
        "provider, model and reason: missing (a billed answer without usage), partial (cut "
        "before its final usage: cost at least what was counted), unpriced (no price for the "
        "model). Their atlasburn_cost_usd is 0 or a lower bound, not free",
        "# TYPE atlasburn_unknown_cost_requests_total counter",
        'atlasburn_unknown_cost_requests_total{model="gpt-4o-mini",provider="openai",'
        'reason="partial"} 1.0',
        'atlasburn_unknown_cost_requests_total{model="acme-private-model-1",provider="openai",'
        'reason="unpriced"} 1.0',
        'atlasburn_unknown_cost_requests_total{model="tts-1",provider="openai",'
        'reason="missing"} 1.0',
    ]

    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{spool}"\n')
    assert report(config, "--since", "all") == (
        "Spend since the beginning (all), by model\n"
        "model                 requests  refused  errors  tokens in  tokens out  cost USD"
        "  unpriced  unknown cost\n"
        "gpt-4o-mini                  2        0       0      1,000         500  0.000450"
        "         0             1\n"
        "                             1        0       0          0           0  0.000000"
        "         0             0\n"
        "acme-private-model-1         1        0       0      1,000         500  0.000000"
        "         1             1\n"
        "bad                          1        0       1          0           0  0.000000"
        "         0             0\n"
        "tts-1                        1        0       0          0           0  0.000000"
        "         0             1\n"
        "--------------------  --------  -------  ------  ---------  ----------  --------"
        "  --------  ------------\n"
        "total                        6        0       1      2,000       1,000  0.000450"
        "         1             3\n"
    )
    out = json.loads(report(config, "--json", "--since", "all", "--by", "provider"))
    assert out["rows"] == [
        {
            "provider": "openai",
            "requests": 6,
            "refused": 0,
            "errors": 1,
            "tokens_in": 2000,
            "tokens_out": 1000,
            "cost_usd": 0.00045,
            "unpriced": 1,
            "unknown_cost": 3,
        }
    ]
