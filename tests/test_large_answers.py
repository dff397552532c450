"""Answers larger than the meter keeps (issue 16.5): their usage is read wherever the provider put
it, in every adapter's JSON shape and in a stream with one huge event, and priced exactly.

Each answer is over 16 MiB (the most the meter ever held whole before) and its usage is anywhere
in it, not only near its end. A provider on loopback streams it in 64 KiB pieces, built as they
are sent. Costs are arithmetic from the providers' published per-million-token rates.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, StartDaemon
from .fakes.server import start

M = Decimal(1_000_000)
BIG = 17 * 1024 * 1024  # bytes of the big value of each answer: over the old 16 MiB buffer
PIECE = 64 * 1024

Body = Callable[[], Iterator[bytes]]


def big_string(size: int = BIG) -> Iterator[bytes]:
    """A JSON string of ``size`` base64 bytes (an image, an embedding), in pieces."""
    yield b'"'
    block = base64.b64encode(bytes(range(256)) * 192)  # 65,536 bytes
    for _ in range(size // len(block)):
        yield block
    yield b'"'


def json_object(members: list[tuple[str, Any]]) -> Body:
    """An object of ``members`` in this order; a value that is a callable is streamed."""

    def pieces() -> Iterator[bytes]:
        yield b"{"
        for n, (key, value) in enumerate(members):
            yield (b"," if n else b"") + orjson.dumps(key) + b": "
            if callable(value):
                yield from value()
            else:
                yield orjson.dumps(value)
        yield b"}"

    return pieces


class LargeProvider:
    """Answers every request with ``body`` (chunked), as ``content_type``."""

    def __init__(self) -> None:
        self.body: Body = lambda: iter(())
        self.content_type = "application/json"
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": self.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        held = b""
        self.sent = 0
        for piece in self.body():
            held += piece
            if len(held) >= PIECE:
                await resp.write(held)
                self.sent += len(held)
                held = b""
        await resp.write(held)
        self.sent += len(held)
        await resp.write_eof()
        return resp


@pytest.fixture
async def large() -> AsyncIterator[tuple[LargeProvider, str]]:
    provider = LargeProvider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", provider.handle)
    running = await start(app)
    yield provider, running.url
    await running.stop()


@pytest.fixture
async def daemon_large(
    large: tuple[LargeProvider, str], start_daemon: StartDaemon
) -> tuple[LargeProvider, RunningDaemon]:
    provider, url = large
    providers = {name: {"base_url": url} for name in ("openai", "anthropic", "gemini")}
    return provider, await start_daemon(providers=providers)


async def relay(daemon: RunningDaemon, path: str, body: dict[str, Any]) -> int:
    """POST through the daemon; the bytes the client received."""
    received = 0
    async with aiohttp.ClientSession() as s:
        async with s.post(daemon.url + path, json=body, headers={"x-api-key": "k"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += len(chunk)
    return received


# --------------------------------------------------------------------------- OpenAI embeddings

EMBED_3_LARGE = Decimal("0.13")  # USD per million input tokens
EMBED_USAGE = {"prompt_tokens": 102400, "total_tokens": 102400}
EMBED_COST = 102400 * EMBED_3_LARGE / M  # = 0.013312


def embeddings_data() -> Iterator[bytes]:
    vector = base64.b64encode(b"\x00\x00\x80\x3f" * 3072)  # 16,384 bytes
    count = BIG // len(vector)
    yield b"["
    for i in range(count):
        yield b'%s{"object": "embedding", "index": %d, "embedding": "%s"}' % (
            b"," if i else b"",
            i,
            vector,
        )
    yield b"]"


def float_data() -> Iterator[bytes]:
    vector = b"[" + b",".join(b"%.9f" % (i / 3072 - 0.5) for i in range(3072)) + b"]"
    yield b"["
    for i in range(BIG // len(vector) + 1):
        yield b'%s{"object":"embedding","index":%d,"embedding":%s}' % (
            b"," if i else b"",
            i,
            vector,
        )
    yield b"]"


EMBEDDINGS: dict[str, list[tuple[str, Any]]] = {
    "usage last (OpenAI's order)": [
        ("object", "list"),
        ("data", embeddings_data),
        ("model", "text-embedding-3-large"),
        ("usage", EMBED_USAGE),
    ],
    "usage first": [
        ("usage", EMBED_USAGE),
        ("object", "list"),
        ("data", embeddings_data),
        ("model", "text-embedding-3-large"),
    ],
    "usage between object and data, floats": [
        ("object", "list"),
        ("model", "text-embedding-3-large"),
        ("usage", EMBED_USAGE),
        ("data", float_data),
    ],
}


@pytest.mark.parametrize("order", list(EMBEDDINGS))
async def test_openai_embeddings(
    daemon_large: tuple[LargeProvider, RunningDaemon], order: str
) -> None:
    provider, daemon = daemon_large
    provider.body = json_object(EMBEDDINGS[order])
    body = {"model": "text-embedding-3-large", "input": ["x"] * 2048}
    assert await relay(daemon, "/v1/embeddings", body) == provider.sent > BIG
    [event] = daemon.events
    assert (event.model, event.endpoint, event.status) == (
        "text-embedding-3-large",
        "/embeddings",
        200,
    )
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        102400,
        0,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(EMBED_COST)) < 1e-12


# --------------------------------------------------------------------------- OpenAI chat

GPT_4O_MINI = {"in": Decimal("0.15"), "cached": Decimal("0.075"), "out": Decimal("0.60")}
CHAT_USAGE = {
    "prompt_tokens": 1536,
    "completion_tokens": 4000,
    "total_tokens": 5536,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
# 512 uncached + 1024 cached in, 4000 out.
CHAT_COST = (512 * GPT_4O_MINI["in"] + 1024 * GPT_4O_MINI["cached"] + 4000 * GPT_4O_MINI["out"]) / M


def chat_choices() -> Iterator[bytes]:
    yield b'[{"index": 0, "message": {"role": "assistant", "content": '
    yield from big_string()
    yield b'}, "finish_reason": "stop"}]'


def chat(usage_first: bool) -> list[tuple[str, Any]]:
    members: list[tuple[str, Any]] = [
        ("id", "chatcmpl-1"),
        ("object", "chat.completion"),
        ("created", 1764460000),
        ("model", "gpt-4o-mini-2024-07-18"),
        ("choices", chat_choices),
        ("usage", CHAT_USAGE),
        ("system_fingerprint", "fp_1"),
    ]
    if usage_first:
        members.insert(0, members.pop(5))
    return members


@pytest.mark.parametrize("usage_first", [False, True], ids=["usage after choices", "usage first"])
async def test_openai_chat(
    daemon_large: tuple[LargeProvider, RunningDaemon], usage_first: bool
) -> None:
    provider, daemon = daemon_large
    provider.body = json_object(chat(usage_first))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a long story"}]}
    assert await relay(daemon, "/v1/chat/completions", body) == provider.sent > BIG
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1536,
        4000,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(CHAT_COST)) < 1e-12


# --------------------------------------------------------------------------- Anthropic message

SONNET_46 = {
    "in": Decimal(3),
    "write_5m": Decimal("3.75"),
    "write_1h": Decimal(6),
    "read": Decimal("0.30"),
    "out": Decimal(15),
}
MESSAGE_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1200,
    "cache_read_input_tokens": 3000,
    "cache_creation": {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 400},
    "output_tokens": 6000,
}
# 25 uncached + 800 written for 5 min + 400 written for 1 h + 3000 read; 6000 out.
MESSAGE_COST = (
    25 * SONNET_46["in"]
    + 800 * SONNET_46["write_5m"]
    + 400 * SONNET_46["write_1h"]
    + 3000 * SONNET_46["read"]
    + 6000 * SONNET_46["out"]
) / M


def message_content() -> Iterator[bytes]:
    yield b'[{"type": "text", "text": '
    yield from big_string()
    yield b"}]"


def message(usage_first: bool) -> list[tuple[str, Any]]:
    members: list[tuple[str, Any]] = [
        ("id", "msg_01"),
        ("type", "message"),
        ("role", "assistant"),
        ("model", "claude-sonnet-4-6"),
        ("content", message_content),
        ("stop_reason", "end_turn"),
        ("stop_sequence", None),
        ("usage", MESSAGE_USAGE),
    ]
    if usage_first:
        members.insert(0, members.pop())
    return members


@pytest.mark.parametrize("usage_first", [False, True], ids=["usage last", "usage first"])
async def test_anthropic_message(
    daemon_large: tuple[LargeProvider, RunningDaemon], usage_first: bool
) -> None:
    provider, daemon = daemon_large
    provider.body = json_object(message(usage_first))
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 8000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert await relay(daemon, "/v1/messages", body) == provider.sent > BIG
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        4225,
        6000,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(MESSAGE_COST)) < 1e-12


# --------------------------------------------------------------------------- Gemini

GEMINI_25_FLASH = {"in": Decimal("0.30"), "cached": Decimal("0.03"), "out": Decimal("2.50")}
GEMINI_USAGE = {
    "promptTokenCount": 1200,
    "cachedContentTokenCount": 1000,
    "candidatesTokenCount": 85,
    "thoughtsTokenCount": 230,
    "totalTokenCount": 1515,
}
# 200 uncached + 1000 cached in; 85 candidates + 230 thoughts out.
GEMINI_COST = (
    200 * GEMINI_25_FLASH["in"] + 1000 * GEMINI_25_FLASH["cached"] + 315 * GEMINI_25_FLASH["out"]
) / M
GEM = "/gemini/v1beta/models/gemini-2.5-flash"
GEM_BODY = {"contents": [{"role": "user", "parts": [{"text": "Draw a cat"}]}]}


def gemini_candidates() -> Iterator[bytes]:
    yield b'[{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": '
    yield from big_string()
    yield b'}}], "role": "model"}, "finishReason": "STOP", "index": 0}]'


def gemini(usage_first: bool) -> list[tuple[str, Any]]:
    members: list[tuple[str, Any]] = [
        ("candidates", gemini_candidates),
        ("usageMetadata", GEMINI_USAGE),
        ("modelVersion", "gemini-2.5-flash"),
        ("responseId", "r1"),
    ]
    if usage_first:
        members.insert(0, members.pop(1))
    return members


@pytest.mark.parametrize(
    "usage_first", [False, True], ids=["usageMetadata after candidates", "usageMetadata first"]
)
async def test_gemini_generate_content(
    daemon_large: tuple[LargeProvider, RunningDaemon], usage_first: bool
) -> None:
    provider, daemon = daemon_large
    provider.body = json_object(gemini(usage_first))
    assert await relay(daemon, f"{GEM}:generateContent", GEM_BODY) == provider.sent > BIG
    [event] = daemon.events
    assert (event.model, event.tokens_in, event.tokens_out, event.usage_source) == (
        "gemini-2.5-flash",
        1200,
        315,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(GEMINI_COST)) < 1e-12


async def test_gemini_json_array_stream(daemon_large: tuple[LargeProvider, RunningDaemon]) -> None:
    """streamGenerateContent without alt=sse: one JSON array of 3,000 chunks; the model is in
    every chunk, the final usage and the finishReason in the last one only."""
    provider, daemon = daemon_large
    text = "w" * 6000

    def chunks() -> Iterator[bytes]:
        yield b"["
        for i in range(3000):
            chunk: dict[str, Any] = {
                "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}}],
                "usageMetadata": {"promptTokenCount": 1200, "totalTokenCount": 1200},
                "modelVersion": "gemini-2.5-flash",
            }
            if i == 2999:
                chunk["candidates"][0]["finishReason"] = "STOP"
                chunk["usageMetadata"] = GEMINI_USAGE
            yield (b"\n,\r\n" if i else b"") + orjson.dumps(chunk)
        yield b"]"

    provider.body = chunks
    sent = await relay(daemon, f"{GEM}:streamGenerateContent", GEM_BODY)
    assert sent == provider.sent > BIG
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1200,
        315,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(GEMINI_COST)) < 1e-12


# --------------------------------------------------------------------------- one huge SSE event

GPT_41_MINI = {"in": Decimal("0.40"), "cached": Decimal("0.10"), "out": Decimal("1.60")}
RESPONSES_USAGE = {
    "input_tokens": 2048,
    "input_tokens_details": {"cached_tokens": 512},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 128},
    "total_tokens": 2348,
}
# 1536 uncached + 512 cached in; 300 out (128 of them reasoning, priced as output).
RESPONSES_COST = (
    1536 * GPT_41_MINI["in"] + 512 * GPT_41_MINI["cached"] + 300 * GPT_41_MINI["out"]
) / M


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
async def test_responses_stream_with_one_huge_event(
    daemon_large: tuple[LargeProvider, RunningDaemon], newline: bytes
) -> None:
    """An image generation's ``response.completed`` event carries the image (17 MiB of base64),
    and the usage after it."""
    provider, daemon = daemon_large
    provider.content_type = "text/event-stream"

    def events() -> Iterator[bytes]:
        created = {"type": "response.created", "response": {"id": "r", "model": "gpt-4.1-mini"}}
        yield b"event: response.created" + newline + b"data: " + orjson.dumps(created)
        yield newline + newline + b"event: response.completed" + newline
        yield b'data: {"type": "response.completed", "response": {"id": "r", "output": ['
        yield b'{"type": "image_generation_call", "status": "completed", "result": '
        yield from big_string()
        yield b'}], "model": "gpt-4.1-mini-2025-04-14", "usage": ' + orjson.dumps(RESPONSES_USAGE)
        yield b"}}" + newline + newline

    provider.body = events
    body = {"model": "gpt-4.1-mini", "input": "draw", "stream": True}
    assert await relay(daemon, "/v1/responses", body) == provider.sent > BIG
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source, event.stream) == (
        2048,
        300,
        UsageSource.REPORTED,
        True,
    )
    assert abs(event.cost_usd - float(RESPONSES_COST)) < 1e-12


async def test_gemini_sse_event_with_an_inline_image(
    daemon_large: tuple[LargeProvider, RunningDaemon],
) -> None:
    provider, daemon = daemon_large
    provider.content_type = "text/event-stream"

    def events() -> Iterator[bytes]:
        yield b"data: "
        yield from json_object(gemini(usage_first=False))()
        yield b"\r\n\r\n"

    provider.body = events
    path = f"{GEM}:streamGenerateContent?alt=sse"
    assert await relay(daemon, path, GEM_BODY) == provider.sent > BIG
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1200,
        315,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(GEMINI_COST)) < 1e-12


# o3-deep-research, USD: per million tokens in and out, and per web search call ($10 per 1,000).
DEEP_RESEARCH = {"in": Decimal("10.00"), "out": Decimal("40.00"), "search": Decimal("0.01")}
SEARCHES = 300
DEEP_USAGE = {
    "input_tokens": 100000,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 20000,
    "output_tokens_details": {"reasoning_tokens": 15000},
    "total_tokens": 120000,
}
# 100,000 * 10 / 1e6 + 20,000 * 40 / 1e6 + 300 * 0.01 = 1.0 + 0.8 + 3.0
DEEP_COST = (
    100000 * DEEP_RESEARCH["in"] / M
    + 20000 * DEEP_RESEARCH["out"] / M
    + SEARCHES * DEEP_RESEARCH["search"]
)


def deep_research_items() -> list[dict[str, Any]]:
    """A deep-research answer's output: a search (with its sources) and a reasoning summary, 300
    times, then the report: about 700 KB, so its middle is not in the meter's skeleton."""
    items: list[dict[str, Any]] = []
    for i in range(SEARCHES):
        sources = [{"type": "url", "url": f"https://example.com/{i}/{j}"} for j in range(20)]
        action = {"type": "search", "query": f"query {i}", "sources": sources}
        items.append(
            {"type": "web_search_call", "id": f"ws_{i}", "status": "completed", "action": action}
        )
        summary = [{"type": "summary_text", "text": "Weighing the sources. " * 40}]
        items.append({"type": "reasoning", "id": f"rs_{i}", "summary": summary})
    text = "The report. " * 2000
    content = [{"type": "output_text", "text": text, "annotations": []}]
    items.append({"type": "message", "id": "msg", "role": "assistant", "content": content})
    return items


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_every_search_of_a_long_answer_is_billed(
    daemon_large: tuple[LargeProvider, RunningDaemon], stream: bool
) -> None:
    """The middle of a long ``output`` is left out of the skeleton: the web search calls there
    are billed all the same."""
    provider, daemon = daemon_large
    items = deep_research_items()
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "o3-deep-research-2025-06-26",
        "output": items,
        "usage": DEEP_USAGE,
    }

    def answer() -> Iterator[bytes]:
        yield orjson.dumps(response)

    def events() -> Iterator[bytes]:
        created = {"type": "response.created", "response": {"id": "resp_1", "output": []}}
        yield b"event: response.created\ndata: " + orjson.dumps(created) + b"\n\n"
        for n, item in enumerate(items):
            done = {"type": "response.output_item.done", "output_index": n, "item": item}
            yield b"event: response.output_item.done\ndata: " + orjson.dumps(done) + b"\n\n"
        completed = {"type": "response.completed", "response": response}
        yield b"event: response.completed\ndata: " + orjson.dumps(completed) + b"\n\n"

    assert len(orjson.dumps(response)) > 600_000
    if stream:
        provider.content_type = "text/event-stream"
    provider.body = events if stream else answer
    body = {"model": "o3-deep-research", "input": "research", "stream": stream}
    assert await relay(daemon, "/v1/responses", body) == provider.sent
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        100000,
        20000,
        UsageSource.REPORTED,
    )
    assert abs(event.cost_usd - float(DEEP_COST)) < 1e-12
