"""Content codings through the daemon: every coding a provider or its CDN may send is metered
(alone, stacked, JSON or stream), the client gets the bytes as the provider sent them, and the
daemon never asks upstream for a coding it cannot read."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from proxy.adapters.base import UsageSource
from proxy.encoding import decode_body

from .conftest import RunningDaemon
from .fakes.provider import FakeProvider, compress, fixture, sse_events

ENCODINGS = ["gzip", "x-gzip", "deflate", "br", "zstd", "gzip, br", "br, zstd", "deflate, gzip"]
HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user"}]}


async def post(url: str, body: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(url, json=body, headers={**HEADERS, **headers}) as r:
            return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_json_answer_in_every_coding_is_metered(
    fake: FakeProvider, daemon: RunningDaemon, encoding: str, framing: str
) -> None:
    status, headers, got = await post(
        daemon.url + "/anthropic/v1/messages",
        MESSAGE,
        **{"x-fake-encoding": encoding, "x-fake-framing": framing},
    )
    assert status == 200 and headers["Content-Encoding"] == encoding
    # Relayed as sent: still compressed, and it decodes to the provider's answer.
    assert decode_body(got, encoding, 1 << 20) == fixture("anthropic", "message.json")
    [event] = daemon.events
    # 25 input + 1200 cache-write + 3000 cache-read tokens in, 150 out (message.json).
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        4225,
        150,
        UsageSource.REPORTED,
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_stream_in_every_coding_is_metered(
    fake: FakeProvider, daemon: RunningDaemon, encoding: str
) -> None:
    status, headers, got = await post(
        daemon.url + "/anthropic/v1/messages",
        {**MESSAGE, "stream": True},
        **{"x-fake-encoding": encoding},
    )
    assert status == 200 and headers["Content-Encoding"] == encoding
    assert decode_body(got, encoding, 1 << 20) == fixture("anthropic", "message_stream.sse")
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        4225,
        150,
        UsageSource.REPORTED,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_stacked_codings_in_separate_header_lines_are_metered(
    fake: FakeProvider, daemon: RunningDaemon, stream: bool
) -> None:
    """``Content-Encoding: gzip`` and ``Content-Encoding: br`` as two lines are one list, gzip
    then brotli (RFC 9110 section 5.3), as a CDN that adds its own coding sends them."""
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(
            daemon.url + "/anthropic/v1/messages",
            json={**MESSAGE, "stream": stream},
            headers={**HEADERS, "x-fake-encoding": "gzip, br", "x-fake-encoding-lines": "split"},
        ) as r:
            assert r.headers.getall("Content-Encoding") == ["gzip", "br"]
            got = await r.read()
    name = "message_stream.sse" if stream else "message.json"
    assert decode_body(got, "gzip, br", 1 << 20) == fixture("anthropic", name)
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        4225,
        150,
        UsageSource.REPORTED,
    )


@pytest.mark.parametrize(
    ("sent", "upstream_got"),
    [
        # What browsers with compression dictionaries send: dcb / dcz are left out.
        ("gzip, deflate, br, zstd, dcb, dcz", "gzip, deflate, br, zstd"),
        ("*", "gzip, deflate, br, zstd"),
        ("br;q=1.0, *;q=0.5", "br;q=1.0, gzip;q=0.5, deflate;q=0.5, zstd;q=0.5"),
        ("compress", "identity"),
    ],
)
async def test_codings_the_meter_cannot_read_are_not_asked_for(
    fake: FakeProvider,
    daemon: RunningDaemon,
    sent: str,
    upstream_got: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(2):
        status, _, _ = await post(
            daemon.url + "/anthropic/v1/messages", MESSAGE, **{"Accept-Encoding": sent}
        )
        assert status == 200
    for seen in fake.requests:
        values = [v for k, v in seen.headers if k.lower() == "accept-encoding"]
        assert values == [upstream_got]
    warned = [r.getMessage() for r in caplog.records if "cannot meter" in r.getMessage()]
    assert len(warned) == 1  # once, not per request


async def test_readable_codings_are_sent_as_the_client_wrote_them(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    await post(daemon.url + "/anthropic/v1/messages", MESSAGE, **{"Accept-Encoding": "gzip, br"})
    values = [v for k, v in fake.requests[-1].headers if k.lower() == "accept-encoding"]
    assert values == ["gzip, br"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, br"])
async def test_a_stream_compressed_despite_identity_reaches_the_client_plain_and_filtered(
    fake: FakeProvider, daemon: RunningDaemon, encoding: str
) -> None:
    """The daemon asked for stream usage and for ``identity``; the upstream compressed anyway.
    The client must get exactly the stream it asked for (no usage chunk, no ``"usage": null``),
    plain, without a Content-Encoding or a stale Content-Length."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, got = await post(
        daemon.url + "/v1/chat/completions",
        {**body, "stream": True},
        **{"x-fake-encoding": encoding, "Accept-Encoding": "gzip, br"},
    )
    assert status == 200
    assert got == fixture("openai", "chat_completion_stream.sse")
    assert "Content-Encoding" not in headers and "Content-Length" not in headers
    seen = fake.requests[-1]
    assert [v for k, v in seen.headers if k.lower() == "accept-encoding"] == ["identity"]
    assert json.loads(seen.body)["stream_options"] == {"include_usage": True}
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out, event.usage_source) == (
        1536,
        7,
        UsageSource.REQUESTED,
    )


async def test_a_corrupt_compressed_stream_is_cut_not_passed_off_as_complete(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """A stream decoded for the client that stops decoding: the client sees a cut answer."""
    good = compress("gzip", b"".join(sse_events(fixture("openai", "chat_completion_stream.sse"))))
    assert decode_body(good[:40] + b"\xff" * 64, "gzip", 1 << 20) is None
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user"}], "stream": True}
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(
            daemon.url + "/v1/chat/completions",
            body,
            **{"x-fake-encoding": "gzip", "x-fake-fault": "corrupt"},
        )


async def test_the_openai_sdk_gets_no_chunk_it_did_not_ask_for_from_a_compressed_stream(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """What was found by trial: through an upstream that gzips although asked for identity,
    the SDK's stream must not end in a ``choices: []`` chunk carrying usage it never asked for."""
    async with openai.AsyncOpenAI(
        base_url=daemon.url + "/v1", api_key="sk-test", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-fake-encoding": "gzip"},
        )
        chunks = [chunk async for chunk in stream]
    assert [len(c.choices) for c in chunks] == [1] * len(chunks)
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(
        json.loads(e[len(b"data: ") :])["choices"][0]["delta"].get("content") or ""
        for e in sse_events(fixture("openai", "chat_completion_stream.sse"))
        if not e.startswith(b"data: [DONE]")
    )
    [event] = daemon.events
    assert (event.tokens_in, event.tokens_out) == (1536, 7)
