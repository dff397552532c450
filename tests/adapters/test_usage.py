"""Usage from every recorded wire shape: provider x endpoint x JSON / stream, with and without
usage, exact numbers however the bytes are split (inside events, lines and UTF-8 characters)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.adapters import ADAPTERS
from proxy.adapters.base import Metered, Usage

from ..fakes.provider import fixture

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"

OPENAI_CHAT = Usage(1536, 7, cached_input_tokens=1024, service_tier="default")
OPENAI_RESPONSES = Usage(
    2048, 300, cached_input_tokens=512, reasoning_tokens=128, service_tier="default"
)
ANTHROPIC = Usage(
    4225, 150, cached_input_tokens=3000, cache_write_tokens=1200, cache_write_1h_tokens=400
)
GEMINI = Usage(1240, 315, cached_input_tokens=1000, reasoning_tokens=230)
AZURE = Usage(900, 60, cached_input_tokens=512)
RESPONSES_SEARCH = Usage(
    5000,
    400,
    cached_input_tokens=1000,
    web_searches=2,
    file_searches=1,
    service_tier="default",
)

CASES = {
    # id: (kind, fixture dir, fixture, request path, content type, expected)
    "openai chat json": (
        "openai",
        "openai",
        "chat_completion.json",
        "/v1/chat/completions",
        JSON,
        Metered(OPENAI_CHAT, "gpt-4o-mini-2024-07-18"),
    ),
    "openai chat sse": (
        "openai",
        "openai",
        "chat_completion_stream.sse",
        "/v1/chat/completions",
        SSE,
        Metered(None, "gpt-4o-mini-2024-07-18"),
    ),
    "openai chat sse usage": (
        "openai",
        "openai",
        "chat_completion_stream_usage.sse",
        "/v1/chat/completions",
        SSE,
        Metered(OPENAI_CHAT, "gpt-4o-mini-2024-07-18"),
    ),
    "openai completions json": (
        "openai",
        "openai",
        "completion.json",
        "/v1/completions",
        JSON,
        Metered(Usage(6, 8), "gpt-3.5-turbo-instruct:20230824-v2"),
    ),
    "openai completions sse": (
        "openai",
        "openai",
        "completion_stream.sse",
        "/v1/completions",
        SSE,
        Metered(None, "gpt-3.5-turbo-instruct:20230824-v2"),
    ),
    "openai completions sse usage": (
        "openai",
        "openai",
        "completion_stream_usage.sse",
        "/v1/completions",
        SSE,
        Metered(Usage(6, 8), "gpt-3.5-turbo-instruct:20230824-v2"),
    ),
    "openai embeddings json": (
        "openai",
        "openai",
        "embeddings.json",
        "/v1/embeddings",
        JSON,
        Metered(Usage(5), "text-embedding-3-small"),
    ),
    "openai responses json": (
        "openai",
        "openai",
        "response.json",
        "/v1/responses",
        JSON,
        Metered(OPENAI_RESPONSES, "gpt-4.1-mini-2025-04-14"),
    ),
    "openai responses sse": (
        "openai",
        "openai",
        "response_stream.sse",
        "/v1/responses",
        SSE,
        Metered(OPENAI_RESPONSES, "gpt-4.1-mini-2025-04-14"),
    ),
    "openai error json": (
        "openai",
        "openai",
        "error_401.json",
        "/v1/chat/completions",
        JSON,
        Metered(None, None),
    ),
    "anthropic messages json": (
        "anthropic",
        "anthropic",
        "message.json",
        "/v1/messages",
        JSON,
        Metered(ANTHROPIC, "claude-sonnet-4-6"),
    ),
    "anthropic messages sse": (
        "anthropic",
        "anthropic",
        "message_stream.sse",
        "/v1/messages",
        SSE,
        Metered(ANTHROPIC, "claude-sonnet-4-6"),
    ),
    "anthropic messages sse tool": (
        "anthropic",
        "anthropic",
        "message_stream_tool.sse",
        "/v1/messages",
        SSE,
        Metered(Usage(412, 89), "claude-sonnet-4-6"),
    ),
    "anthropic messages sse cut by error": (
        "anthropic",
        "anthropic",
        "message_stream_error.sse",
        "/v1/messages",
        SSE,
        Metered(
            Usage(
                4225,
                1,
                cached_input_tokens=3000,
                cache_write_tokens=1200,
                cache_write_1h_tokens=400,
            ),
            "claude-sonnet-4-6",
            final=False,
        ),
    ),
    "anthropic count_tokens json": (
        "anthropic",
        "anthropic",
        "count_tokens.json",
        "/v1/messages/count_tokens",
        JSON,
        Metered(Usage(), None),
    ),
    "anthropic error json": (
        "anthropic",
        "anthropic",
        "error_429.json",
        "/v1/messages",
        JSON,
        Metered(None, None),
    ),
    "gemini generateContent json": (
        "gemini",
        "gemini",
        "generate_content.json",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        JSON,
        Metered(GEMINI, "gemini-2.5-flash"),
    ),
    "gemini streamGenerateContent sse": (
        "gemini",
        "gemini",
        "stream_generate_content.sse",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        SSE,
        Metered(GEMINI, "gemini-2.5-flash"),
    ),
    "gemini streamGenerateContent json array": (
        "gemini",
        "gemini",
        "stream_generate_content.json",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        JSON,
        Metered(GEMINI, "gemini-2.5-flash"),
    ),
    "gemini error json": (
        "gemini",
        "gemini",
        "error_429.json",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        JSON,
        Metered(None, None),
    ),
    "azure chat json": (
        "azure",
        "azure",
        "chat_completion.json",
        "/openai/deployments/prod-gpt4o/chat/completions",
        JSON,
        Metered(AZURE, "gpt-4o-2024-11-20"),
    ),
    "azure chat sse": (
        "azure",
        "azure",
        "chat_completion_stream.sse",
        "/openai/deployments/prod-gpt4o/chat/completions",
        SSE,
        Metered(None, "gpt-4o-2024-11-20"),
    ),
    "azure chat sse usage": (
        "azure",
        "azure",
        "chat_completion_stream_usage.sse",
        "/openai/deployments/prod-gpt4o/chat/completions",
        SSE,
        Metered(AZURE, "gpt-4o-2024-11-20"),
    ),
    # Other modalities and per-call fees (issue 16.1, 16.2).
    "openai chat json audio": (
        "openai",
        "openai",
        "chat_completion_audio.json",
        "/v1/chat/completions",
        JSON,
        Metered(
            Usage(
                1200,
                850,
                input_audio_tokens=1000,
                output_audio_tokens=800,
                service_tier="default",
            ),
            "gpt-audio-2025-08-28",
        ),
    ),
    "openai responses json search calls": (
        "openai",
        "openai",
        "response_web_search.json",
        "/v1/responses",
        JSON,
        Metered(RESPONSES_SEARCH, "gpt-4.1-2025-04-14"),
    ),
    "openai responses sse search calls": (
        "openai",
        "openai",
        "response_web_search_stream.sse",
        "/v1/responses",
        SSE,
        Metered(RESPONSES_SEARCH, "gpt-4.1-2025-04-14"),
    ),
    "openai transcription duration": (
        "openai",
        "openai",
        "transcription_duration.json",
        "/v1/audio/transcriptions",
        JSON,
        Metered(Usage(audio_ms=95_000), None),
    ),
    "openai transcription tokens": (
        "openai",
        "openai",
        "transcription_tokens.json",
        "/v1/audio/transcriptions",
        JSON,
        Metered(Usage(1000, 150, input_audio_tokens=900), None),
    ),
    "anthropic messages sse web search": (
        "anthropic",
        "anthropic",
        "message_stream_web_search.sse",
        "/v1/messages",
        SSE,
        Metered(Usage(12000, 600, web_searches=2), "claude-sonnet-4-5-20250929"),
    ),
    "gemini json grounded 2.5: one search per grounded answer": (
        "gemini",
        "gemini",
        "generate_content_grounded.json",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        JSON,
        Metered(Usage(50, 300, web_searches=1), "gemini-2.5-flash"),
    ),
    "gemini sse grounded 3: one search per query": (
        "gemini",
        "gemini",
        "stream_generate_content_grounded.sse",
        "/v1beta/models/gemini-3-pro-preview:streamGenerateContent",
        SSE,
        Metered(Usage(50, 300, web_searches=2), "gemini-3-pro-preview"),
    ),
    "gemini json cached audio": (
        "gemini",
        "gemini",
        "generate_content_cached_audio.json",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        JSON,
        Metered(
            Usage(
                4000,
                100,
                cached_input_tokens=2000,
                input_audio_tokens=3000,
                cached_audio_tokens=1500,
            ),
            "gemini-2.5-flash",
        ),
    ),
    "gemini json image out": (
        "gemini",
        "gemini",
        "generate_content_image.json",
        "/v1beta/models/gemini-2.5-flash-image:generateContent",
        JSON,
        Metered(Usage(20, 1300, output_image_tokens=1290), "gemini-2.5-flash-image"),
    ),
}


def meter(case: str, cuts: list[int]) -> Metered:
    kind, folder, name, path, ctype, _ = CASES[case]
    adapter = ADAPTERS[kind]
    data = fixture(folder, name)
    m = adapter.meter(adapter.describe(path, None), ctype)
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        m.feed(data[start:cut])
        start = cut
    return m.result()


@pytest.mark.parametrize("case", list(CASES))
def test_usage(case: str) -> None:
    assert meter(case, []) == CASES[case][-1]


@settings(max_examples=300)
@given(
    st.sampled_from(list(CASES)), st.lists(st.integers(min_value=0, max_value=20_000), max_size=40)
)
def test_usage_is_the_same_however_split(case: str, cuts: list[int]) -> None:
    assert meter(case, cuts) == CASES[case][-1]


def test_one_byte_at_a_time() -> None:
    """The extreme split: every byte its own chunk, inside every multi-byte character."""
    for case in CASES:
        size = len(fixture(CASES[case][1], CASES[case][2]))
        assert meter(case, list(range(size))) == CASES[case][-1], case
