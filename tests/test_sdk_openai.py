"""The real ``openai`` SDK through the daemon gets exactly what it gets from the provider."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, assert_same_upstream_request
from .fakes.provider import FakeProvider

MESSAGES = [{"role": "user", "content": "Say hello"}]


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base + "/v1", api_key="sk-test-not-a-real-key", max_retries=0
    )


async def both(fake: FakeProvider, daemon: RunningDaemon, call: Any) -> tuple[Any, Any]:
    """(direct result, result through the daemon) of ``call(client)``."""
    async with client(fake.url) as direct_client, client(daemon.url) as via_client:
        direct = await call(direct_client)
        via = await call(via_client)
    return direct, via


async def collect(stream: Any) -> list[dict[str, Any]]:
    return [chunk.model_dump() async for chunk in stream]


async def test_chat_completion(fake: FakeProvider, daemon: RunningDaemon) -> None:
    direct, via = await both(
        fake,
        daemon,
        lambda c: c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
    )
    assert via.model_dump() == direct.model_dump()
    assert via.choices[0].message.content == direct.choices[0].message.content != ""
    assert_same_upstream_request(fake)
    [event] = daemon.events
    assert (event.provider, event.model, event.endpoint, event.status, event.stream) == (
        "openai",
        "gpt-4o-mini",
        "/chat/completions",
        200,
        False,
    )
    assert (event.tokens_in, event.tokens_out) == (1536, 7)
    assert event.usage_source is UsageSource.REPORTED
    assert event.fingerprint.startswith("sha256:") and len(event.fingerprint) == 71


async def test_chat_completion_stream(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """The daemon asks for usage the client did not ask for, and the client never sees it."""

    async def call(c: openai.AsyncOpenAI) -> list[dict[str, Any]]:
        return await collect(
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        )

    direct, via = await both(fake, daemon, call)
    assert via == direct
    assert len(via) == 6 and all("usage" not in c or c["usage"] is None for c in via)
    sent_direct, sent_via = fake.requests[-2], fake.requests[-1]
    assert sent_via.json() == {**sent_direct.json(), "stream_options": {"include_usage": True}}
    assert sent_via.header("accept-encoding") == "identity"
    [event] = daemon.events
    assert event.stream is True
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1536,
        7,
        UsageSource.REQUESTED,
    )


async def test_chat_completion_stream_with_usage(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async def call(c: openai.AsyncOpenAI) -> list[dict[str, Any]]:
        return await collect(
            await c.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    direct, via = await both(fake, daemon, call)
    assert via == direct
    assert via[-1]["choices"] == [] and via[-1]["usage"]["prompt_tokens"] == 1536
    assert_same_upstream_request(fake)
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1536,
        7,
        UsageSource.REPORTED,
    )


async def test_embeddings(fake: FakeProvider, daemon: RunningDaemon) -> None:
    direct, via = await both(
        fake,
        daemon,
        lambda c: c.embeddings.create(model="text-embedding-3-small", input="hello world"),
    )
    assert via.model_dump() == direct.model_dump()
    assert len(via.data[0].embedding) == 8
    [event] = daemon.events
    assert (event.endpoint, event.tokens_in, event.tokens_out) == ("/embeddings", 5, 0)


async def test_responses(fake: FakeProvider, daemon: RunningDaemon) -> None:
    direct, via = await both(
        fake, daemon, lambda c: c.responses.create(model="gpt-4.1-mini", input="Hi")
    )
    assert via.model_dump() == direct.model_dump()
    assert via.output_text == direct.output_text != ""
    [event] = daemon.events
    assert (event.endpoint, event.model, event.tokens_in, event.tokens_out) == (
        "/responses",
        "gpt-4.1-mini",
        2048,
        300,
    )


async def test_responses_stream(fake: FakeProvider, daemon: RunningDaemon) -> None:
    async def call(c: openai.AsyncOpenAI) -> list[dict[str, Any]]:
        return await collect(
            await c.responses.create(model="gpt-4.1-mini", input="Hi", stream=True)
        )

    direct, via = await both(fake, daemon, call)
    assert via == direct
    assert [e["type"] for e in via][0] == "response.created"
    assert via[-1]["type"] == "response.completed"
    [event] = daemon.events
    assert (event.stream, event.tokens_in, event.tokens_out, event.usage_source) == (
        True,
        2048,
        300,
        UsageSource.REPORTED,
    )


async def test_legacy_completion_and_models(fake: FakeProvider, daemon: RunningDaemon) -> None:
    direct, via = await both(
        fake,
        daemon,
        lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi"),
    )
    assert via.model_dump() == direct.model_dump()
    async with client(daemon.url) as c:
        models = [m.id async for m in c.models.list()]
    assert models == ["gpt-4o-mini", "text-embedding-3-small"]
    assert [(e.endpoint, e.tokens_in, e.tokens_out) for e in daemon.events] == [
        ("/completions", 6, 8),
        ("/models", 0, 0),
    ]


async def test_provider_error_reaches_the_sdk_unchanged(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    errors = []
    for base in (fake.url, daemon.url):
        async with client(base) as c:
            with pytest.raises(openai.AuthenticationError) as info:
                await c.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,
                    extra_headers={"x-fake-status": "401"},
                )
        errors.append((info.value.status_code, info.value.body, info.value.code))
    assert errors[0] == errors[1]
    assert errors[1][2] == "invalid_api_key"
    [event] = daemon.events
    assert (event.status, event.tokens_in, event.usage_source) == (401, 0, UsageSource.MISSING)


def azure(endpoint: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint,
        api_key="az-test-not-a-key",
        api_version="2024-10-21",
        max_retries=0,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_azure_sdk(fake: FakeProvider, start_daemon: Any, stream: bool) -> None:
    daemon = await start_daemon(providers={"azure": {"kind": "azure", "base_url": fake.url}})
    results = []
    for endpoint in (fake.url, daemon.url + "/azure"):
        async with azure(endpoint) as c:
            answer = await c.chat.completions.create(
                model="prod-gpt4o", messages=MESSAGES, stream=stream
            )
            results.append(await collect(answer) if stream else answer.model_dump())
    assert results[0] == results[1]
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert seen.query == "api-version=2024-10-21"
    assert seen.header("api-key") == "az-test-not-a-key"
    [event] = daemon.events
    assert (event.provider, event.model, event.endpoint, event.tokens_in, event.tokens_out) == (
        "azure",
        "gpt-4o-2024-11-20",
        "/chat/completions",
        900,
        60,
    )
