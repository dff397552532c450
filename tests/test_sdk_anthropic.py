"""The real ``anthropic`` SDK through the daemon sees exactly what it sees from the provider."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, assert_same_upstream_request
from .fakes.provider import FakeProvider

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def client(base: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test-not-a-key", max_retries=0)


async def both(fake: FakeProvider, daemon_base: str, call: Any) -> tuple[Any, Any]:
    async with client(fake.url) as direct_client, client(daemon_base) as via_client:
        return await call(direct_client), await call(via_client)


# The Anthropic SDK is pointed at /anthropic (ANTHROPIC_BASE_URL) or at the root, where
# /v1/messages goes to the anthropic provider too.
BASES = ["/anthropic", ""]


@pytest.mark.parametrize("prefix", BASES)
async def test_message(fake: FakeProvider, daemon: RunningDaemon, prefix: str) -> None:
    direct, via = await both(
        fake,
        daemon.url + prefix,
        lambda c: c.messages.create(model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES),
    )
    assert via.model_dump() == direct.model_dump()
    assert via.usage.cache_read_input_tokens == 3000
    assert_same_upstream_request(fake)
    assert fake.requests[-1].header("authorization") == "Bearer sk-ant-test-not-a-key"
    [event] = daemon.events
    assert (event.provider, event.model, event.endpoint, event.status, event.stream) == (
        "anthropic",
        "claude-sonnet-4-6",
        "/messages",
        200,
        False,
    )
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        4225,
        150,
        UsageSource.REPORTED,
    )


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "tool_use"])
async def test_message_stream(
    fake: FakeProvider, daemon: RunningDaemon, tools: list[dict[str, Any]] | None
) -> None:
    async def call(c: anthropic.AsyncAnthropic) -> list[dict[str, Any]]:
        extra = {"tools": tools} if tools else {}
        stream = await c.messages.create(
            model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES, stream=True, **extra
        )
        return [event.model_dump() async for event in stream]

    direct, via = await both(fake, daemon.url + "/anthropic", call)
    assert via == direct
    assert via[0]["type"] == "message_start" and via[-1]["type"] == "message_stop"
    # Nothing is injected into an Anthropic request: its streams carry usage anyway.
    assert_same_upstream_request(fake)
    [event] = daemon.events
    expected = (412, 89) if tools else (4225, 150)
    assert (event.tokens_in, event.tokens_out, event.stream, event.usage_source) == (
        *expected,
        True,
        UsageSource.REPORTED,
    )


async def test_message_helper_stream(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """The SDK's high-level ``messages.stream`` accumulates the same final message."""

    async def call(c: anthropic.AsyncAnthropic) -> dict[str, Any]:
        async with c.messages.stream(
            model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES
        ) as stream:
            return (await stream.get_final_message()).model_dump()

    direct, via = await both(fake, daemon.url + "/anthropic", call)
    assert via == direct
    assert via["usage"]["output_tokens"] == 150


async def test_error_mid_stream_reaches_the_sdk_and_usage_is_partial(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    errors = []
    for base in (fake.url, daemon.url + "/anthropic"):
        async with client(base) as c:
            stream = await c.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=256,
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-fault": "stream-error"},
            )
            with pytest.raises(anthropic.APIStatusError) as info:
                async for _ in stream:
                    pass
        errors.append((type(info.value), info.value.body))
    assert errors[0] == errors[1]
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (4225, 1, UsageSource.PARTIAL)


async def test_error_response_reaches_the_sdk(fake: FakeProvider, daemon: RunningDaemon) -> None:
    errors = []
    for base in (fake.url, daemon.url + "/anthropic"):
        async with client(base) as c:
            with pytest.raises(anthropic.RateLimitError) as info:
                await c.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=10,
                    messages=MESSAGES,
                    extra_headers={"x-fake-status": "429"},
                )
        errors.append(info.value.body)
    assert errors[0] == errors[1]
    assert daemon.events[0].status == 429


async def test_count_tokens_is_free(fake: FakeProvider, daemon: RunningDaemon) -> None:
    direct, via = await both(
        fake,
        daemon.url + "/anthropic",
        lambda c: c.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES),
    )
    assert via.input_tokens == direct.input_tokens == 4225
    [event] = daemon.events
    assert (event.endpoint, event.tokens_in, event.tokens_out, event.cost_usd, event.priced) == (
        "/messages/count_tokens",
        0,
        0,
        0.0,
        True,
    )
