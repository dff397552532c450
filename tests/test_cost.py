"""Exact cost for every provider x endpoint x stream mode, end to end through the daemon.

Each expected cost is arithmetic from the providers' published per-million-token rates, written
here by hand (not computed by the daemon's code), and compared exactly: the daemon's cost is the
correctly rounded float of the exact decimal cost.
"""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import pytest

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, StartDaemon
from .fakes.provider import FakeProvider, fixture

M = Decimal(1_000_000)

# Published rates, USD per million tokens.
GPT_4O_MINI = {"in": Decimal("0.15"), "cached": Decimal("0.075"), "out": Decimal("0.60")}
GPT_41_MINI = {"in": Decimal("0.40"), "cached": Decimal("0.10"), "out": Decimal("1.60")}
EMBED_3_SMALL = Decimal("0.02")
INSTRUCT = {"in": Decimal("1.50"), "out": Decimal("2.00")}
SONNET_46 = {
    "in": Decimal(3),
    "write_5m": Decimal("3.75"),
    "write_1h": Decimal(6),
    "read": Decimal("0.30"),
    "out": Decimal(15),
}
GEMINI_25_FLASH = {"in": Decimal("0.30"), "cached": Decimal("0.03"), "out": Decimal("2.50")}
AZURE_GPT_4O = {"in": Decimal("2.50"), "cached": Decimal("1.25"), "out": Decimal(10)}

# 1536 prompt tokens of which 1024 cached, 7 completion tokens.
CHAT = (512 * GPT_4O_MINI["in"] + 1024 * GPT_4O_MINI["cached"] + 7 * GPT_4O_MINI["out"]) / M
# 6 prompt, 8 completion.
COMPLETION = (6 * INSTRUCT["in"] + 8 * INSTRUCT["out"]) / M
EMBEDDING = 5 * EMBED_3_SMALL / M
# 2048 input of which 512 cached; 300 output of which 128 reasoning (priced as output).
RESPONSES = (1536 * GPT_41_MINI["in"] + 512 * GPT_41_MINI["cached"] + 300 * GPT_41_MINI["out"]) / M
# 25 uncached + 800 written for 5 min + 400 written for 1 h + 3000 read; 150 out.
MESSAGE = (
    25 * SONNET_46["in"]
    + 800 * SONNET_46["write_5m"]
    + 400 * SONNET_46["write_1h"]
    + 3000 * SONNET_46["read"]
    + 150 * SONNET_46["out"]
) / M
MESSAGE_TOOL = (412 * SONNET_46["in"] + 89 * SONNET_46["out"]) / M
# 1200 prompt (1000 cached) + 40 tool-use prompt in; 85 candidates + 230 thoughts out.
GEMINI = (
    240 * GEMINI_25_FLASH["in"] + 1000 * GEMINI_25_FLASH["cached"] + 315 * GEMINI_25_FLASH["out"]
) / M
# 900 prompt of which 512 cached; 60 completion.
AZURE = (388 * AZURE_GPT_4O["in"] + 512 * AZURE_GPT_4O["cached"] + 60 * AZURE_GPT_4O["out"]) / M

# Other modalities and per-call fees (issue 16.1, 16.2). USD per million tokens, and per call.
GPT_AUDIO = {"in": Decimal("2.50"), "out": Decimal(10), "audio_in": 32, "audio_out": 64}
GPT_41 = {"in": 2, "cached": Decimal("0.50"), "out": 8}
OPENAI_WEB_SEARCH = Decimal(10) / 1000  # per call
OPENAI_FILE_SEARCH = Decimal("2.50") / 1000  # per call
SONNET_45 = {"in": 3, "out": 15}
ANTHROPIC_WEB_SEARCH = Decimal(10) / 1000  # per search
GEMINI_25_FLASH_AUDIO = {"in": Decimal("1.00"), "cached": Decimal("0.10")}
GEMINI_GROUNDED_PROMPT = Decimal(35) / 1000  # Gemini 2.5: per grounded prompt
GEMINI_25_FLASH_IMAGE = {"in": Decimal("0.30"), "out": Decimal("2.50"), "image_out": 30}
WHISPER_PER_MINUTE = Decimal("0.006")
GPT_4O_TRANSCRIBE = {"in": Decimal("2.50"), "audio_in": 6, "out": 10}

# 1200 prompt of which 1000 audio; 850 completion of which 800 audio.
CHAT_AUDIO = (
    200 * GPT_AUDIO["in"]
    + 1000 * GPT_AUDIO["audio_in"]
    + 50 * GPT_AUDIO["out"]
    + 800 * GPT_AUDIO["audio_out"]
) / M
# 5000 input of which 1000 cached, 400 output; two web_search_call items, one file_search_call.
RESPONSES_SEARCH = (
    (4000 * GPT_41["in"] + 1000 * GPT_41["cached"] + 400 * GPT_41["out"]) / M
    + 2 * OPENAI_WEB_SEARCH
    + 1 * OPENAI_FILE_SEARCH
)
# 12000 in, 600 out, 2 web searches (and 1 web fetch, which costs only its tokens).
MESSAGE_SEARCH = (12000 * SONNET_45["in"] + 600 * SONNET_45["out"]) / M + 2 * ANTHROPIC_WEB_SEARCH
# 50 in, 300 out, one grounded answer (two search queries: Gemini 2.5 bills the prompt once).
GEMINI_GROUNDED = (50 * GEMINI_25_FLASH["in"] + 300 * GEMINI_25_FLASH["out"]) / M + (
    1 * GEMINI_GROUNDED_PROMPT
)
# 4000 prompt (1000 text, 3000 audio) of which 2000 cached (500 text, 1500 audio); 100 out.
GEMINI_CACHED_AUDIO = (
    500 * GEMINI_25_FLASH["in"]
    + 1500 * GEMINI_25_FLASH_AUDIO["in"]
    + 500 * GEMINI_25_FLASH["cached"]
    + 1500 * GEMINI_25_FLASH_AUDIO["cached"]
    + 100 * GEMINI_25_FLASH["out"]
) / M
# 20 in; 1300 candidates of which 1290 image.
GEMINI_IMAGE = (
    20 * GEMINI_25_FLASH_IMAGE["in"]
    + 10 * GEMINI_25_FLASH_IMAGE["out"]
    + 1290 * GEMINI_25_FLASH_IMAGE["image_out"]
) / M
# 95 seconds of audio.
WHISPER = 95 * WHISPER_PER_MINUTE / 60
# 1000 in of which 900 audio; 150 out.
TRANSCRIBE = (
    100 * GPT_4O_TRANSCRIBE["in"]
    + 900 * GPT_4O_TRANSCRIBE["audio_in"]
    + 150 * GPT_4O_TRANSCRIBE["out"]
) / M

CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG_BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
GEM_BODY = {"contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}]}
GEM = "/gemini/v1beta/models/gemini-2.5-flash"
AZ = "/azure/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"

CASES = {
    # id: (path, body, headers, expected cost, tokens in/out, stream, usage source,
    #      fixture the client must receive byte for byte)
    "openai chat json": (
        "/v1/chat/completions",
        CHAT_BODY,
        {},
        CHAT,
        (1536, 7),
        False,
        UsageSource.REPORTED,
        ("openai", "chat_completion.json"),
    ),
    "openai chat stream": (
        "/v1/chat/completions",
        {**CHAT_BODY, "stream": True},
        {},
        CHAT,
        (1536, 7),
        True,
        UsageSource.REQUESTED,
        ("openai", "chat_completion_stream.sse"),
    ),
    "openai chat stream with usage": (
        "/v1/chat/completions",
        {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
        {},
        CHAT,
        (1536, 7),
        True,
        UsageSource.REPORTED,
        ("openai", "chat_completion_stream_usage.sse"),
    ),
    "openai completions json": (
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"},
        {},
        COMPLETION,
        (6, 8),
        False,
        UsageSource.REPORTED,
        ("openai", "completion.json"),
    ),
    "openai completions stream": (
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True},
        {},
        COMPLETION,
        (6, 8),
        True,
        UsageSource.REQUESTED,
        ("openai", "completion_stream.sse"),
    ),
    "openai embeddings": (
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": "hi"},
        {},
        EMBEDDING,
        (5, 0),
        False,
        UsageSource.REPORTED,
        ("openai", "embeddings.json"),
    ),
    "openai responses json": (
        "/v1/responses",
        {"model": "gpt-4.1-mini", "input": "hi"},
        {},
        RESPONSES,
        (2048, 300),
        False,
        UsageSource.REPORTED,
        ("openai", "response.json"),
    ),
    "openai responses stream": (
        "/v1/responses",
        {"model": "gpt-4.1-mini", "input": "hi", "stream": True},
        {},
        RESPONSES,
        (2048, 300),
        True,
        UsageSource.REPORTED,
        ("openai", "response_stream.sse"),
    ),
    "anthropic messages json": (
        "/anthropic/v1/messages",
        MSG_BODY,
        {},
        MESSAGE,
        (4225, 150),
        False,
        UsageSource.REPORTED,
        ("anthropic", "message.json"),
    ),
    "anthropic messages stream": (
        "/v1/messages",
        {**MSG_BODY, "stream": True},
        {},
        MESSAGE,
        (4225, 150),
        True,
        UsageSource.REPORTED,
        ("anthropic", "message_stream.sse"),
    ),
    "anthropic messages stream tool_use": (
        "/anthropic/v1/messages",
        {**MSG_BODY, "stream": True, "tools": [{"name": "t"}]},
        {},
        MESSAGE_TOOL,
        (412, 89),
        True,
        UsageSource.REPORTED,
        ("anthropic", "message_stream_tool.sse"),
    ),
    "gemini generateContent": (
        f"{GEM}:generateContent",
        GEM_BODY,
        {"x-goog-api-key": "gk-test"},
        GEMINI,
        (1240, 315),
        False,
        UsageSource.REPORTED,
        ("gemini", "generate_content.json"),
    ),
    "gemini streamGenerateContent sse": (
        f"{GEM}:streamGenerateContent?alt=sse&key=gk-test",
        GEM_BODY,
        {},
        GEMINI,
        (1240, 315),
        True,
        UsageSource.REPORTED,
        ("gemini", "stream_generate_content.sse"),
    ),
    "gemini streamGenerateContent json array": (
        f"{GEM}:streamGenerateContent",
        GEM_BODY,
        {"x-goog-api-key": "gk-test"},
        GEMINI,
        (1240, 315),
        True,
        UsageSource.REPORTED,
        ("gemini", "stream_generate_content.json"),
    ),
    "azure chat json": (
        AZ,
        {"messages": CHAT_BODY["messages"]},
        {"api-key": "az-test"},
        AZURE,
        (900, 60),
        False,
        UsageSource.REPORTED,
        ("azure", "chat_completion.json"),
    ),
    "azure chat stream": (
        AZ,
        {"messages": CHAT_BODY["messages"], "stream": True},
        {"api-key": "az-test"},
        AZURE,
        (900, 60),
        True,
        UsageSource.REQUESTED,
        ("azure", "chat_completion_stream.sse"),
    ),
    "openai chat audio in and out": (
        "/v1/chat/completions",
        {"model": "gpt-audio", "modalities": ["text", "audio"], "messages": CHAT_BODY["messages"]},
        {"x-fake-fixture": "openai/chat_completion_audio.json"},
        CHAT_AUDIO,
        (1200, 850),
        False,
        UsageSource.REPORTED,
        ("openai", "chat_completion_audio.json"),
    ),
    "openai responses web and file search calls json": (
        "/v1/responses",
        {"model": "gpt-4.1", "input": "hi", "tools": [{"type": "web_search"}]},
        {"x-fake-fixture": "openai/response_web_search.json"},
        RESPONSES_SEARCH,
        (5000, 400),
        False,
        UsageSource.REPORTED,
        ("openai", "response_web_search.json"),
    ),
    "openai responses web and file search calls stream": (
        "/v1/responses",
        {"model": "gpt-4.1", "input": "hi", "stream": True, "tools": [{"type": "web_search"}]},
        {"x-fake-fixture": "openai/response_web_search_stream.sse"},
        RESPONSES_SEARCH,
        (5000, 400),
        True,
        UsageSource.REPORTED,
        ("openai", "response_web_search_stream.sse"),
    ),
    "openai whisper duration": (
        "/v1/audio/transcriptions",
        {"model": "whisper-1"},
        {"x-fake-fixture": "openai/transcription_duration.json"},
        WHISPER,
        (0, 0),
        False,
        UsageSource.REPORTED,
        ("openai", "transcription_duration.json"),
    ),
    "openai transcribe audio tokens": (
        "/v1/audio/transcriptions",
        {"model": "gpt-4o-transcribe"},
        {"x-fake-fixture": "openai/transcription_tokens.json"},
        TRANSCRIBE,
        (1000, 150),
        False,
        UsageSource.REPORTED,
        ("openai", "transcription_tokens.json"),
    ),
    "anthropic messages stream web search": (
        "/anthropic/v1/messages",
        {**MSG_BODY, "model": "claude-sonnet-4-5", "stream": True},
        {"x-fake-fixture": "anthropic/message_stream_web_search.sse"},
        MESSAGE_SEARCH,
        (12000, 600),
        True,
        UsageSource.REPORTED,
        ("anthropic", "message_stream_web_search.sse"),
    ),
    "gemini grounded with google search": (
        f"{GEM}:generateContent",
        {**GEM_BODY, "tools": [{"google_search": {}}]},
        {"x-goog-api-key": "gk-test", "x-fake-fixture": "gemini/generate_content_grounded.json"},
        GEMINI_GROUNDED,
        (50, 300),
        False,
        UsageSource.REPORTED,
        ("gemini", "generate_content_grounded.json"),
    ),
    "gemini cached audio": (
        f"{GEM}:generateContent",
        GEM_BODY,
        {
            "x-goog-api-key": "gk-test",
            "x-fake-fixture": "gemini/generate_content_cached_audio.json",
        },
        GEMINI_CACHED_AUDIO,
        (4000, 100),
        False,
        UsageSource.REPORTED,
        ("gemini", "generate_content_cached_audio.json"),
    ),
    "gemini image out": (
        "/gemini/v1beta/models/gemini-2.5-flash-image:generateContent",
        GEM_BODY,
        {"x-goog-api-key": "gk-test", "x-fake-fixture": "gemini/generate_content_image.json"},
        GEMINI_IMAGE,
        (20, 1300),
        False,
        UsageSource.REPORTED,
        ("gemini", "generate_content_image.json"),
    ),
}


@pytest.fixture
async def all_providers(fake: FakeProvider, start_daemon: StartDaemon) -> RunningDaemon:
    return await start_daemon(providers={"azure": {"kind": "azure", "base_url": fake.url}})


@pytest.mark.parametrize("case", list(CASES))
async def test_exact_cost(fake: FakeProvider, all_providers: RunningDaemon, case: str) -> None:
    path, body, headers, cost, tokens, stream, source, expected = CASES[case]
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(all_providers.url + path, json=body, headers=headers) as r:
            assert r.status == 200
            assert await r.read() == fixture(*expected)
    [event] = all_providers.events
    assert (event.tokens_in, event.tokens_out) == tokens
    assert event.cost_usd == float(cost)
    assert event.priced is True
    assert (event.stream, event.usage_source, event.status) == (stream, source, 200)


async def test_event_fields_per_provider(all_providers: RunningDaemon) -> None:
    """Model and endpoint: from the request, from the path (Gemini), from the response (Azure)."""
    async with aiohttp.ClientSession() as s:
        for case in (
            "gemini streamGenerateContent sse",
            "azure chat json",
            "anthropic messages json",
        ):
            path, body, headers, *_ = CASES[case]
            async with s.post(all_providers.url + path, json=body, headers=headers) as r:
                await r.read()
    assert [(e.provider, e.model, e.endpoint) for e in all_providers.events] == [
        ("gemini", "gemini-2.5-flash", "/models:streamGenerateContent"),
        ("azure", "gpt-4o-2024-11-20", "/chat/completions"),
        ("anthropic", "claude-sonnet-4-6", "/messages"),
    ]
