"""Stream usage: asked for where a stream reports it only on request, and hidden from the client."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, StartDaemon
from .fakes.provider import FakeProvider, fixture

MESSAGES = [{"role": "user", "content": "hi"}]


async def post_raw(url: str, body: dict[str, object], **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(url, json=body, headers=headers) as r:
            return r.status, await r.read()


@pytest.mark.parametrize(
    ("path", "body", "plain", "usage"),
    [
        (
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": MESSAGES},
            "chat_completion_stream.sse",
            (1536, 7),
        ),
        (
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"},
            "completion_stream.sse",
            (6, 8),
        ),
    ],
)
async def test_client_gets_byte_for_byte_the_stream_it_asked_for(
    fake: FakeProvider,
    daemon: RunningDaemon,
    path: str,
    body: dict[str, object],
    plain: str,
    usage: tuple[int, int],
) -> None:
    status, got = await post_raw(daemon.url + path, {**body, "stream": True})
    assert status == 200
    assert got == fixture("openai", plain)
    assert json.loads(fake.requests[-1].body)["stream_options"] == {"include_usage": True}
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        *usage,
        UsageSource.REQUESTED,
    )


async def test_client_options_are_kept_and_include_usage_false_is_overridden(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": False, "include_obfuscation": True},
    }
    status, got = await post_raw(daemon.url + "/v1/chat/completions", body)
    assert (status, got) == (200, fixture("openai", "chat_completion_stream.sse"))
    sent = json.loads(fake.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True, "include_obfuscation": True}
    assert daemon.events[0].usage_source is UsageSource.REQUESTED


async def test_client_that_asks_for_usage_gets_it_untouched(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            daemon.url + "/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"},
        ) as r:
            got = await r.read()
    assert got == fixture("openai", "chat_completion_stream_usage.sse")
    seen = fake.requests[-1]
    assert seen.body == raw  # not re-serialised
    assert seen.header("accept-encoding") == "gzip"
    assert daemon.events[0].usage_source is UsageSource.REPORTED


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4.1-mini", "input": "hi", "stream": True}),
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi", "stream": True}),
    ],
)
async def test_nothing_injected_where_not_needed(
    fake: FakeProvider, daemon: RunningDaemon, path: str, body: dict[str, object]
) -> None:
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            daemon.url + path, data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
            await r.read()
    assert fake.requests[-1].body == raw
    assert daemon.events[0].usage_source is UsageSource.REPORTED


async def test_injection_can_be_switched_off(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon(providers={"openai": {"inject_stream_usage": False}})
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    status, got = await post_raw(d.url + "/v1/chat/completions", body)
    assert (status, got) == (200, fixture("openai", "chat_completion_stream.sse"))
    assert "stream_options" not in json.loads(fake.requests[-1].body)
    [event] = d.events
    assert (event.tokens_in, event.usage_source) == (0, UsageSource.MISSING)


async def test_provider_that_rejects_stream_options_gets_the_original_request(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    raw = json.dumps(body).encode()
    for _ in range(2):
        async with aiohttp.ClientSession() as s:
            async with s.post(
                daemon.url + "/v1/chat/completions",
                data=raw,
                headers={
                    "Content-Type": "application/json",
                    "x-fake-fault": "reject-stream-options",
                },
            ) as r:
                assert r.status == 200
                assert await r.read() == fixture("openai", "chat_completion_stream.sse")
    # First request: asked, refused, sent again as the client sent it; second: not asked again.
    bodies = [json.loads(seen.body) for seen in fake.requests]
    assert ["stream_options" in b for b in bodies] == [True, False, False]
    assert fake.requests[-1].body == raw
    assert [e.status for e in daemon.events] == [200, 200]
    assert [e.usage_source for e in daemon.events] == [UsageSource.MISSING] * 2


async def test_a_compressed_refusal_is_read_as_a_refusal(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """A host that compresses its 400 although the daemon asked for identity still refused
    ``stream_options``: the client (the openai SDK) gets its stream, not a 400 about an option
    it never sent."""
    headers = {"x-fake-fault": "reject-stream-options", "x-fake-encoding": "gzip"}
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=daemon.url + "/v1", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is None
    assert ["stream_options" in json.loads(seen.body) for seen in fake.requests] == [True, False]
    assert [(e.status, e.usage_source) for e in daemon.events] == [(200, UsageSource.MISSING)]


async def test_other_400s_are_relayed_as_they_are(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    status, got = await post_raw(
        daemon.url + "/v1/chat/completions", body, **{"x-fake-status": "400"}
    )
    assert status == 400
    assert got == fixture("openai", "error_401.json")
    assert len(fake.requests) == 1
    assert daemon.events[0].status == 400


def test_filter_lets_an_endless_event_through_untouched() -> None:
    """A partial event past the filter's bound is flushed and the rest passes as it comes, so
    a stream without event ends cannot pile up in memory (nor be held from the client)."""
    from proxy.adapters.openai import UsageChunkFilter

    f = UsageChunkFilter()
    piece = b": " + b"p" * 1021 + b"\n"  # comment lines, never a blank line
    sent = b""
    for _ in range(2000):  # ~2 MiB
        sent += f.feed(piece)
        assert len(f._buf) <= UsageChunkFilter.MAX_HELD
    assert sent == piece * 2000  # all of it reached the client (the first MiB a bit late)
    assert f.feed(b'data: {"usage":null}\n\n') == b'data: {"usage":null}\n\n'


async def test_a_refusal_is_remembered_per_deployment_and_api_version(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    """One Azure deployment behind an old api-version refuses ``stream_options``: only that
    (deployment, api-version) stops being asked; other deployments, and the same deployment
    under a newer api-version, keep their usage."""
    d = await start_daemon(providers={"azure": {"kind": "azure", "base_url": fake.url}})
    body = {"messages": MESSAGES, "stream": True}
    sent = [
        ("legacy-35", "2024-02-01", {"x-fake-fault": "reject-stream-options"}),
        ("legacy-35", "2024-02-01", {}),  # remembered: not asked
        ("prod-4o", "2024-02-01", {}),
        ("legacy-35", "2024-10-21", {}),
    ]
    for deployment, version, headers in sent:
        path = f"/azure/openai/deployments/{deployment}/chat/completions?api-version={version}"
        status, _ = await post_raw(d.url + path, body, **{"api-key": "k", **headers})
        assert status == 200
    asked = ["stream_options" in json.loads(seen.body) for seen in fake.requests]
    assert asked == [True, False, False, True, True]
    assert [e.usage_source for e in d.events] == [
        UsageSource.MISSING,
        UsageSource.MISSING,
        UsageSource.REQUESTED,
        UsageSource.REQUESTED,
    ]
