"""WebSocket sessions through the daemon (``proxy.websocket``): the OpenAI Realtime API, with the
real ``openai`` SDK's realtime client and with aiohttp's WebSocket client, against a fake
Realtime upstream on loopback (``tests/fakes/realtime.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import WSMsgType

from proxy.adapters.base import UsageSource
from proxy.adapters.realtime import RealtimeMeter, RealtimeUsage
from proxy.app import Daemon
from proxy.config import parse_config
from proxy.events import Event
from proxy.pricing import Pricer

from .conftest import eventually
from .fakes.realtime import REFUSAL, FakeRealtime
from .fakes.server import start

# Two responses of text only (so the price is the text rates, whatever the modality rates).
TEXT_USAGES = [
    {
        "total_tokens": 1500,
        "input_tokens": 1200,
        "output_tokens": 300,
        "input_token_details": {"text_tokens": 1200, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 300, "audio_tokens": 0},
    },
    {
        "total_tokens": 3000,
        "input_tokens": 2500,
        "output_tokens": 500,
        "input_token_details": {
            "text_tokens": 2500,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": 1024,
            "cached_tokens_details": {"text_tokens": 1024, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 500, "audio_tokens": 0},
    },
]
# gpt-realtime, per million text tokens: input $4.00, cached input $0.40, output $16.00.
# Input 1200 + 2500 = 3700, of which 1024 cached; output 300 + 500 = 800.
TEXT_COST = (3700 - 1024) * 4.00 / 1e6 + 1024 * 0.40 / 1e6 + 800 * 16.00 / 1e6


class Daemons:
    def __init__(self, upstream: FakeRealtime, tmp_path: Path) -> None:
        self.upstream = upstream
        self.tmp_path = tmp_path
        self.running: list[Daemon] = []
        self.events: list[Event] = []

    async def start(self, **server: Any) -> Daemon:
        config = parse_config(
            {
                "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 2, **server},
                "attribution": {"process": False},  # (see conftest.start_daemon)
                "storage": {"path": str(self.tmp_path / "state" / "spool.sqlite3")},
                "providers": {"openai": {"base_url": self.upstream.url}},
            },
            env={},
        )
        daemon = Daemon(config, record=self.events.append)
        await daemon.start()
        self.running.append(daemon)
        return daemon


@pytest.fixture
async def upstream() -> AsyncIterator[FakeRealtime]:
    fake = FakeRealtime(usages=TEXT_USAGES)
    running = await start(fake.app())
    fake.url = running.url
    yield fake
    await running.stop()


@pytest.fixture
async def daemons(upstream: FakeRealtime, tmp_path: Path) -> AsyncIterator[Daemons]:
    d = Daemons(upstream, tmp_path)
    yield d
    for daemon in d.running:
        await daemon.stop()


# A WebSocket upgrade request's headers (RFC 6455 §4.1; the key is the RFC's own example).
HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def ws_url(daemon: Daemon, model: str = "gpt-realtime") -> str:
    return f"{daemon.url}/v1/realtime?model={model}"


async def test_sdk_session_sums_and_prices_every_response(daemons: Daemons) -> None:
    daemon = await daemons.start()
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=daemon.url + "/v1", max_retries=0)
    seen: list[Any] = []
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={"type": "realtime", "instructions": "be brief"})
        for _ in range(2):
            await conn.response.create()
            async for event in conn:
                seen.append(event)
                if event.type == "response.done":
                    break
    assert [e.type for e in seen] == [
        "session.created",
        "response.output_text.delta",
        "response.done",
        "response.output_text.delta",
        "response.done",
    ]
    assert seen[1].delta == "héllo"
    assert seen[4].response.usage.input_token_details.cached_tokens == 1024
    sent = [json.loads(data)["type"] for kind, data, _ in daemons.upstream.received[:3]]
    assert sent == ["session.update", "response.create", "response.create"]
    hello = daemons.upstream.handshakes[0]
    assert hello["Authorization"] == "Bearer sk-test"
    assert hello["Host"] == daemons.upstream.url.removeprefix("http://")
    [event] = daemons.events
    assert (event.provider, event.endpoint, event.model, event.status) == (
        "openai",
        "/realtime",
        "gpt-realtime",
        101,
    )
    assert (event.tokens_in, event.tokens_out) == (3700, 800)
    assert abs(event.cost_usd - TEXT_COST) <= 1e-12
    assert event.usage_source is UsageSource.REPORTED and event.priced and event.stream


async def test_frames_relayed_unchanged_both_ways(daemons: Daemons) -> None:
    daemon = await daemons.start()
    up = daemons.upstream
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(
            ws_url(daemon),
            headers={"Authorization": "Bearer sk-test", "AtlasBurn-API-Key": "abn_secret"},
            autoping=False,
            autoclose=False,
        ) as ws:
            assert ws._response.headers["x-request-id"] == "req_ok"
            created = await ws.receive()
            assert (created.type, created.data) == up.sent[0]
            await ws.send_str('{"type":"conversation.item.create", "text": "ünïcode ✓"}')
            await ws.send_bytes(b"\x01\x02\xfe")
            await ws.ping(b"client-ping")
            pong = await ws.receive()
            assert (pong.type, pong.data) == (WSMsgType.PONG, b"client-ping")
            await ws.send_str("ping-me")
            ping = await ws.receive()
            assert (ping.type, ping.data) == (WSMsgType.PING, b"up-ping")
            await ws.pong(b"up-ping")
            await ws.send_str("binary-me")
            binary = await ws.receive()
            assert (binary.type, binary.data) == (WSMsgType.BINARY, b"\x00\xffaudio")
            await ws.close(code=4001, message=b"client bye")
            assert ws.close_code == 4001  # the upstream's answer to the close, relayed
    assert up.received == [
        (WSMsgType.TEXT, '{"type":"conversation.item.create", "text": "ünïcode ✓"}', ""),
        (WSMsgType.BINARY, b"\x01\x02\xfe", ""),
        (WSMsgType.PING, b"client-ping", ""),
        (WSMsgType.TEXT, "ping-me", ""),
        (WSMsgType.PONG, b"up-ping", ""),
        (WSMsgType.TEXT, "binary-me", ""),
        (WSMsgType.CLOSE, 4001, "client bye"),
    ]
    assert "AtlasBurn-API-Key" not in up.handshakes[0]
    [event] = daemons.events
    # No response was made: the session is recorded, with no usage to price.
    assert (event.status, event.tokens_in, event.tokens_out, event.cost_usd) == (101, 0, 0, 0.0)
    assert event.usage_source is UsageSource.MISSING


async def test_upstream_close_reaches_the_client_with_its_code_and_reason(
    daemons: Daemons,
) -> None:
    daemon = await daemons.start()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon), autoclose=False) as ws:
            await ws.receive()  # session.created
            await ws.send_str(json.dumps({"type": "response.create"}))
            assert json.loads((await ws.receive()).data)["type"] == "response.output_text.delta"
            assert json.loads((await ws.receive()).data)["type"] == "response.done"
            await ws.send_str("close-me")
            closing = await ws.receive()
            assert (closing.type, closing.data, closing.extra) == (
                WSMsgType.CLOSE,
                4000,
                "upstream says bye",
            )
            # The event is recorded before the close is relayed.
            [event] = daemons.events
            await ws.close(code=4000)
    assert daemons.upstream.received[-1][0] is WSMsgType.TEXT  # its close was answered, no more
    assert (event.tokens_in, event.tokens_out) == (1200, 300)
    # gpt-realtime: 1200 input tokens at $4.00/M, 300 output tokens at $16.00/M.
    assert abs(event.cost_usd - (1200 * 4.00 / 1e6 + 300 * 16.00 / 1e6)) <= 1e-12
    assert event.usage_source is UsageSource.REPORTED


async def test_upstream_failure_closes_the_client_and_records_usage_so_far(
    daemons: Daemons,
) -> None:
    daemon = await daemons.start()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
            await ws.send_str(json.dumps({"type": "response.create"}))
            await ws.receive()
            await ws.receive()  # response.done
            await ws.send_str("drop-me")
            closing = await ws.receive()
            assert (closing.type, closing.data, closing.extra) == (
                WSMsgType.CLOSE,
                1014,
                "upstream failed",
            )
    [event] = daemons.events
    assert (event.status, event.tokens_in, event.tokens_out) == (101, 1200, 300)
    assert event.usage_source is UsageSource.PARTIAL


async def test_a_session_without_its_whole_usage_is_of_unknown_cost(daemons: Daemons) -> None:
    """A session whose usage is missing (no ``response.done`` seen: a Gemini Live session, whose
    usage is not read) or partial (cut) is spend not known, as for a plain request."""
    daemon = await daemons.start()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
            await ws.send_str(json.dumps({"type": "response.create"}))
            await ws.receive()
            await ws.receive()  # response.done
            await ws.send_str("drop-me")
            await ws.receive()
    assert [(e.usage_source, e.tokens_in, e.unknown_cost) for e in daemons.events] == [
        (UsageSource.MISSING, 0, "missing"),
        (UsageSource.PARTIAL, 1200, "partial"),
    ]


async def test_upstream_refusing_the_handshake_is_relayed_as_its_answer(
    daemons: Daemons,
) -> None:
    daemon = await daemons.start()
    handshake = {**HANDSHAKE, "Authorization": "Bearer sk-test"}
    async with aiohttp.ClientSession() as s:
        async with s.get(ws_url(daemon, "refuse"), headers=handshake) as r:
            assert r.status == 403
            assert r.headers["x-request-id"] == "req_refused"
            assert r.headers["Content-Type"] == "application/json"
            assert await r.read() == REFUSAL
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=daemon.url + "/v1", max_retries=0)
    with pytest.raises(Exception) as info:
        async with client.realtime.connect(model="refuse"):
            pass
    assert "403" in str(info.value)
    assert [(e.status, e.model, e.tokens_in, e.usage_source) for e in daemons.events] == [
        (403, "refuse", 0, UsageSource.NONE),
        (403, "refuse", 0, UsageSource.NONE),
    ]


async def test_a_handshake_not_upgraded_is_recorded_as_answered(
    daemons: Daemons, tmp_path: Path
) -> None:
    """An upstream redirect is relayed, not followed (no host but the configured one is ever
    contacted), and an answer that is no upgrade is recorded with its own status, not a stream."""
    elsewhere = FakeRealtime(usages=TEXT_USAGES)
    running = await start(elsewhere.app())
    daemons.upstream.redirect_to = running.url + "/v1/realtime?model=gpt-realtime"
    try:
        daemon = await daemons.start()
        async with aiohttp.ClientSession() as s:
            async with s.get(
                ws_url(daemon, "redirect"), headers=HANDSHAKE, allow_redirects=False
            ) as r:
                assert r.status == 302
                assert r.headers["Location"] == daemons.upstream.redirect_to
            async with s.get(ws_url(daemon, "plain"), headers=HANDSHAKE) as r:
                assert r.status == 200
                assert await r.json() == {"object": "list", "data": []}
        assert elsewhere.handshakes == []
    finally:
        await running.stop()
    assert [(e.status, e.model, e.stream, e.usage_source) for e in daemons.events] == [
        (302, "redirect", False, UsageSource.NONE),
        (200, "plain", False, UsageSource.NONE),
    ]


async def test_kill_flag_answers_429_before_the_upgrade(daemons: Daemons) -> None:
    daemon = await daemons.start()
    await daemon.kill.suspend("manual", "budget review", 30, "api")
    async with aiohttp.ClientSession() as s:
        async with s.get(ws_url(daemon), headers=HANDSHAKE) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "30"
            assert r.headers["x-should-retry"] == "false"
            assert r.headers["AtlasBurn-Guardrail"] == "manual"
            body = await r.json()
    assert body["error"]["message"] == (
        "AtlasBurn guardrail: org org_local is suspended by manual (budget review); retry after 30s"
        ". An operator resumes it with `atlasburn-proxy resume` (or DELETE /api/guardrails/enforce)"
    )
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=daemon.url + "/v1", max_retries=0)
    with pytest.raises(Exception) as info:
        async with client.realtime.connect(model="gpt-realtime"):
            pass
    assert "429" in str(info.value)
    assert daemons.upstream.handshakes == []
    assert [(e.status, e.endpoint, e.model, e.refused_by) for e in daemons.events] == [
        (429, "/realtime", "gpt-realtime", "manual"),
        (429, "/realtime", "gpt-realtime", "manual"),
    ]


async def test_a_message_over_the_bound_closes_the_session(daemons: Daemons) -> None:
    daemon = await daemons.start(max_body_bytes=65536)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
            await ws.send_str("x" * 65537)
            closing = await ws.receive()
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1009)
    # (the client has its close before the daemon closes the upstream)
    await eventually(lambda: len(daemons.upstream.received) == 1)
    assert daemons.upstream.received[0][:2] == (WSMsgType.CLOSE, 1001)
    [event] = daemons.events
    assert event.usage_source is UsageSource.PARTIAL


async def test_daemon_stop_closes_open_sessions(daemons: Daemons) -> None:
    daemon = await daemons.start()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
            await daemon.stop()
            daemons.running.remove(daemon)
            closing = await ws.receive()
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
    assert daemons.upstream.received[-1][:2] == (WSMsgType.CLOSE, 1001)
    assert len(daemons.events) == 1


async def test_a_quiet_session_outlives_the_request_deadlines(daemons: Daemons) -> None:
    """Frames after the handshake are not a request head or body: the header, body and
    keep-alive timeouts of ``server`` do not end a session that pauses longer than they last."""
    daemon = await daemons.start(
        header_timeout_seconds=1, body_timeout_seconds=1, keepalive_timeout_seconds=1
    )
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(daemon)) as ws:
            await ws.receive()  # session.created
            await asyncio.sleep(1.5)
            await ws.send_str("binary-me")  # a first frame, then a pause past every deadline
            assert (await ws.receive()).type is WSMsgType.BINARY
            await asyncio.sleep(2.5)
            await ws.send_str(json.dumps({"type": "response.create"}))
            assert json.loads((await ws.receive()).data)["type"] == "response.output_text.delta"
            await ws.close()
    assert daemons.upstream.received[-1][:2] == (WSMsgType.CLOSE, 1000)


def test_meter_sums_every_modality() -> None:
    meter = RealtimeMeter()
    meter.feed('{"type":"session.created","session":{"model":"gpt-realtime-2025-08-28"}}')
    meter.feed('{"type":"response.output_audio.delta","delta":"UklGRg=="}')
    audio = {
        "input_tokens": 1200,
        "output_tokens": 300,
        "input_token_details": {
            "text_tokens": 200,
            "audio_tokens": 900,
            "image_tokens": 100,
            "cached_tokens": 512,
            "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 448, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 60, "audio_tokens": 240},
    }
    for _ in range(2):
        meter.feed(json.dumps({"type": "response.done", "response": {"usage": audio}}))
    meter.feed('{"type":"response.done","response":{"usage":null}}')
    assert meter.model == "gpt-realtime-2025-08-28"
    assert meter.total == RealtimeUsage(
        responses=2,
        input_tokens=2400,
        input_text=400,
        input_audio=1800,
        input_image=200,
        cached_tokens=1024,
        cached_text=128,
        cached_audio=896,
        cached_image=0,
        output_tokens=600,
        output_text=120,
        output_audio=480,
    )
    usage = meter.usage()
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (2400, 1024, 600)
    assert (usage.input_audio_tokens, usage.cached_audio_tokens, usage.output_audio_tokens) == (
        1800,
        896,
        480,
    )
    assert (usage.input_image_tokens, usage.cached_image_tokens) == (200, 0)
    # Priced at gpt-realtime's rates per million: text 4 in / 0.40 cached / 16 out, audio 32
    # in / 0.40 cached / 64 out, image 5 in (genai-prices).
    expected = (
        (400 - 128) * 4
        + 128 * Decimal("0.40")
        + (1800 - 896) * 32
        + 896 * Decimal("0.40")
        + 200 * 5
        + 120 * 16
        + 480 * 64
    ) / 1_000_000
    defaults = parse_config({}, env={})
    pricer = Pricer.from_config(defaults.providers, defaults.pricing)
    assert abs(pricer.price("openai", "gpt-realtime", usage).cost_usd - float(expected)) <= 1e-12


async def test_the_status_page_session_cookie_never_goes_upstream(daemons: Daemons) -> None:
    """A handshake's ``Cookie`` lines (any case and spacing, several of them) reach the provider
    without the status page's session cookies; a line left with nothing is not sent at all."""
    daemon = await daemons.start()
    port = daemon.port
    for lines, relayed in (
        ([f"Cookie: atlasburn_session_{port}=s3cret"], []),
        (
            ["Cookie: a=1", f"cookie:atlasburn_session_{port}=s3cret;b=2"],
            [("Cookie", "a=1"), ("Cookie", "b=2")],
        ),
        (
            [f"COOKIE:  a=1 ;  atlasburn_session_{port}=s3cret  ", "Cookie: atlasburn_session_1=x"],
            [("Cookie", "a=1")],
        ),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = [
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            *(f"{name}: {value}" for name, value in HANDSHAKE.items()),
            *lines,
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.close()
        seen = daemons.upstream.header_lines[-1]
        assert [(n, v) for n, v in seen if n.lower() == "cookie"] == relayed
    assert not any("s3cret" in v for h in daemons.upstream.header_lines for _, v in h)
