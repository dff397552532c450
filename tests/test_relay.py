"""The relay on the wire: bytes, headers, compression, limits, routing, and upstream failures."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib

import aiohttp
import openai
import pytest

from proxy.adapters.base import UsageSource

from .conftest import RunningDaemon, StartDaemon, cpu_wait, eventually
from .fakes.provider import FakeProvider, fixture, sse_events

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}


def raw_session() -> aiohttp.ClientSession:
    """A client that shows the bytes as sent: no decompression."""
    return aiohttp.ClientSession(auto_decompress=False)


async def fetch(
    session: aiohttp.ClientSession, url: str, body: object, **kw: object
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url, json=body, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.read()


def end_to_end(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in ("date", "connection")}


@pytest.mark.parametrize("body", [CHAT, CHAT_STREAM], ids=["json", "sse"])
async def test_bytes_and_headers_identical_to_direct(
    fake: FakeProvider, daemon: RunningDaemon, body: dict[str, object]
) -> None:
    async with raw_session() as s:
        direct = await fetch(s, f"{fake.url}/v1/chat/completions", body)
        via = await fetch(s, f"{daemon.url}/v1/chat/completions", body)
    assert via[0] == direct[0] == 200
    assert via[2] == direct[2]
    assert end_to_end(via[1]) == end_to_end(direct[1])


async def test_stream_arrives_chunk_by_chunk(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """The first event reaches the client while the provider holds back the second: nothing is
    buffered. (Ordered by the provider's gate, not by a clock: it holds on a busy machine.)"""
    events = sse_events(fixture("openai", "chat_completion_stream.sse"))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{daemon.url}/v1/chat/completions",
            json=CHAT_STREAM,
            headers={"x-fake-fault": "gate"},
        ) as resp:
            # A daemon that buffered would never hand this over: the rest waits for the gate.
            # (The timeout only turns that hang into a failure.)
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 30)
            assert (first, fake.sent) == (events[0], 1)
            fake.gate.set()
            rest = await resp.read()
    assert first + rest == b"".join(events)


async def test_hop_by_hop_request_headers_dropped(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    headers = {
        "Connection": "keep-alive, X-Foo",
        "X-Foo": "per-hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        "Proxy-Connection": "keep-alive",
        "AtlasBurn-API-Key": "abn_test_must_not_leave",
        "X-Keep": "end-to-end",
        "Authorization": "Bearer sk-test-provider-key",
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{daemon.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200
    seen = {k.lower(): v for k, v in fake.requests[-1].headers}
    for name in (
        "x-foo",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "atlasburn-api-key",
        "connection",
    ):
        assert name not in seen, name
    assert seen["x-keep"] == "end-to-end"
    assert seen["authorization"] == "Bearer sk-test-provider-key"
    assert seen["host"] == f"127.0.0.1:{fake.url.rsplit(':', 1)[1]}"


async def test_no_headers_added_to_the_request(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """aiohttp would add Accept, Accept-Encoding and User-Agent; the upstream must see only what
    the client sent (plus Host and Content-Length of this hop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    body = b'{"model":"m"}'
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nX-Only: 1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    names = [k.lower() for k, _ in fake.requests[-1].headers]
    assert sorted(names) == ["content-length", "host", "x-only"]
    assert fake.requests[-1].body == body


async def test_hop_by_hop_response_headers_dropped(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{daemon.url}/v1/anything", headers={"x-fake-fault": "hop-response"}
        ) as r:
            assert r.status == 200
            names = {k.lower() for k in r.headers}
            assert r.headers["X-End"] == "end-to-end"
    assert not names & {"x-bar", "keep-alive", "proxy-authenticate"}


@pytest.mark.parametrize("fault", ["gzip", "gzip-chunked", "deflate"])
async def test_compressed_bodies_relayed_consistently(
    fake: FakeProvider, daemon: RunningDaemon, fault: str
) -> None:
    hdr = {"x-fake-fault": fault}
    async with raw_session() as s:
        direct = await fetch(s, f"{fake.url}/v1/chat/completions", CHAT, headers=hdr)
        via = await fetch(s, f"{daemon.url}/v1/chat/completions", CHAT, headers=hdr)
    assert via[2] == direct[2]
    assert via[1]["Content-Encoding"] == direct[1]["Content-Encoding"]
    if fault == "gzip-chunked":
        assert "Content-Length" not in via[1] and via[1]["Transfer-Encoding"] == "chunked"
        plain = gzip.decompress(via[2])
    else:
        assert via[1]["Content-Length"] == direct[1]["Content-Length"] == str(len(via[2]))
        plain = gzip.decompress(via[2]) if fault == "gzip" else zlib.decompress(via[2])
    assert json.loads(plain)["usage"]["prompt_tokens"] == 1536
    # The meter read a decoded copy.
    assert (daemon.events[-1].tokens_in, daemon.events[-1].tokens_out) == (1536, 7)
    # And an SDK, which decodes, gets the same object either way.
    async with openai.AsyncOpenAI(
        base_url=daemon.url + "/v1", api_key="sk-test", max_retries=0
    ) as c:
        got = await c.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT["messages"], extra_headers=hdr
        )  # type: ignore[arg-type]
    assert got.usage is not None and got.usage.prompt_tokens == 1536


async def test_query_string_and_path_kept(fake: FakeProvider, daemon: RunningDaemon) -> None:
    """Sent byte for byte (a raw socket: client libraries re-quote URLs)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(
        b"GET /openai/v1/models/ft%3Agpt-4o%2Fx?limit=2&after=a%20b&x=%2F&k=%7E HTTP/1.1"
        b"\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    seen = fake.requests[-1]
    assert (seen.path, seen.query) == (
        "/v1/models/ft%3Agpt-4o%2Fx",
        "limit=2&after=a%20b&x=%2F&k=%7E",
    )


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/openai/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/messages", "/v1/messages"),
        ("/v1/messages/count_tokens", "/v1/messages/count_tokens"),
        ("/anthropic/v1/messages", "/v1/messages"),
        (
            "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
    ],
)
async def test_routes(
    fake: FakeProvider, daemon: RunningDaemon, path: str, upstream_path: str
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(daemon.url + path, json={"model": "m"}) as r:
            await r.read()
    assert fake.requests[-1].path == upstream_path
    provider = "openai"
    if "messages" in path:
        provider = "anthropic"
    elif path.startswith("/gemini/"):
        provider = "gemini"
    assert daemon.events[-1].provider == provider


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/nope/v1/chat",
        "/api/unknown",
        "//evil.example/v1/models",
        "/v2/chat/completions",
        "/nope%0A/v1/chat",  # a newline in the path: still the relay's answer
    ],
)
async def test_unknown_route_is_404_json(
    fake: FakeProvider, daemon: RunningDaemon, target: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    assert json.loads(body)["error"]["code"] == "no_route"
    assert fake.requests == []


async def test_a_path_with_an_encoded_newline_is_relayed(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    """%0A decodes to a newline, which a route's ``.*`` does not match: aiohttp answered its own
    text/plain 404. The catch-all matches every path, so it goes where its route says."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(b"GET /v1/models%0Ax HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\ncontent-type: application/json" in head.lower()
    json.loads(body)
    assert fake.requests[-1].path == "/v1/models%0Ax"


@pytest.mark.parametrize("request_line", [b"CONNECT 127.0.0.1:22 HTTP/1.1", b"OPTIONS * HTTP/1.1"])
async def test_a_target_that_is_not_a_path_is_refused_in_json(
    fake: FakeProvider, daemon: RunningDaemon, request_line: bytes
) -> None:
    """A fresh attack review: CONNECT and ``OPTIONS *`` got aiohttp's text 404, and CONNECT's
    connection stayed open 75 s. Now a JSON 400, and the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(request_line + b"\r\nHost: localhost\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)  # the daemon closes it
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"\r\ncontent-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert fake.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://evil.example/v1/models",
    ],
)
async def test_absolute_form_target_never_chooses_the_host(
    fake: FakeProvider, daemon: RunningDaemon, target: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    if target.endswith("/v1/models"):
        # Routed by its path to the configured openai upstream, never to evil.example.
        assert response.startswith(b"HTTP/1.1 200")
        assert fake.requests[-1].path == "/v1/models"
    else:
        assert response.startswith(b"HTTP/1.1 404")
        assert fake.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/openai/../api/ingest",
        "/openai/v1/%2e%2e/admin",
        "/openai/v1/%2E%2E/x",
        "/openai/./v1/models",
    ],
)
async def test_dot_segments_refused(fake: FakeProvider, daemon: RunningDaemon, path: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.daemon.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    assert response.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 404 Not Found")
    assert fake.requests == []


async def test_redirects_are_relayed_not_followed(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{daemon.url}/v1/models", allow_redirects=False, headers={"x-fake-fault": "redirect"}
        ) as r:
            assert r.status == 302
            assert r.headers["Location"] == "http://127.0.0.2:9/stolen"
    assert len(fake.requests) == 1


async def test_body_over_limit_is_413(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    d = await start_daemon(server={"max_body_bytes": 1000})
    async with aiohttp.ClientSession() as s:
        ok = {"model": "m", "input": "x" * (1000 - 24)}
        assert len(json.dumps(ok, separators=(",", ":"))) == 1000
        async with s.post(
            f"{d.url}/v1/embeddings",
            data=json.dumps(ok, separators=(",", ":")),
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 200
        big = b'{"input": "' + b"x" * 5000 + b'"}'
        async with s.post(f"{d.url}/v1/embeddings", data=big) as r:
            assert r.status == 413
            error = (await r.json())["error"]
            assert (error["code"], error["message"]) == (
                "body_too_large",
                "request body over 1000 bytes",
            )

        async def chunked() -> object:
            for _ in range(10):
                yield b"x" * 500

        async with s.post(f"{d.url}/v1/embeddings", data=chunked()) as r:
            assert r.status == 413
    assert len(fake.requests) == 1


async def test_unreachable_upstream_is_502(start_daemon: StartDaemon) -> None:
    # A port that was just free: nothing listens there.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    d = await start_daemon(providers={"openai": {"base_url": f"http://127.0.0.1:{port}"}})
    async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="sk-test", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unreachable"
    assert "cannot connect to upstream openai" in info.value.message
    [event] = d.events
    assert (event.status, event.tokens_in, event.model) == (502, 0, "gpt-4o-mini")


async def test_silent_upstream_is_504(start_daemon: StartDaemon) -> None:
    d = await start_daemon(upstream={"read_timeout_seconds": 0.3})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{d.url}/v1/chat/completions", json=CHAT, headers={"x-fake-fault": "hang"}
        ) as r:
            assert r.status == 504
            assert (await r.json())["error"] == {
                "message": "upstream openai timed out",
                "type": "server_error",
                "param": None,
                "code": "upstream_timeout",
            }
    assert d.events[-1].status == 504


@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_upstream_failure_mid_stream_truncates_for_the_client(
    fake: FakeProvider, start_daemon: StartDaemon, fault: str
) -> None:
    """The client must see a broken stream, never one that looks complete."""
    d = await start_daemon(upstream={"read_timeout_seconds": 0.5})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{d.url}/v1/chat/completions", json=CHAT_STREAM, headers={"x-fake-fault": fault}
        ) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    [event] = d.events
    assert event.usage_source is UsageSource.PARTIAL


async def test_client_disconnect_closes_upstream_within_a_second(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{daemon.url}/v1/chat/completions", json=CHAT_STREAM, headers={"x-fake-fault": "stall"}
        )
        await resp.content.readuntil(b"\n\n")
        closed_at, waited = time.monotonic(), cpu_wait()
        resp.close()  # drop the connection mid-stream
        await eventually(lambda: bool(fake.stream_ends), within=30)
    [end] = fake.stream_ends
    assert end.how == "disconnected"
    # At once: within a second, leaving out the time this process waited for a CPU meanwhile.
    assert end.at - closed_at < 1.0 + cpu_wait() - waited
    await eventually(lambda: bool(daemon.events), within=30)
    [event] = daemon.events
    assert (event.stream, event.usage_source) == (True, UsageSource.PARTIAL)


async def test_client_gone_before_the_answer_is_recorded_as_499(
    fake: FakeProvider, daemon: RunningDaemon
) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(
                f"{daemon.url}/v1/chat/completions",
                json=CHAT,
                headers={"x-fake-fault": "hang"},
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
    await eventually(lambda: bool(daemon.events), within=30)
    [event] = daemon.events
    assert (event.status, event.tokens_in, event.usage_source) == (499, 0, UsageSource.NONE)
    assert len(fake.requests) == 1


async def test_expect_100_continue(fake: FakeProvider, start_daemon: StartDaemon) -> None:
    """An announced oversized body is refused before it is sent; a fitting one is invited."""
    d = await start_daemon(server={"max_body_bytes": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.port)
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413 ")
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", d.daemon.port)
    body = b'{"model":"m","input":"hi"}'
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
        b"Expect: 100-continue\r\n\r\n" % len(body)
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    assert [r.body for r in fake.requests] == [body]


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_body_over_the_buffer_streams_upstream(
    fake: FakeProvider, start_daemon: StartDaemon, announced: bool
) -> None:
    """A body over server.max_buffered_body_bytes goes upstream as it arrives, byte for byte
    (with its length, or chunked); the event has its raw-bytes fingerprint and the model from
    the answer."""
    from proxy.fingerprint import fingerprint

    d = await start_daemon(server={"max_buffered_body_bytes": 1000})
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    async def pieces():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 700):
            yield body[i : i + 700]

    headers = {"Content-Type": "application/json"}
    if announced:
        headers["Content-Length"] = str(len(body))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{d.url}/v1/chat/completions", data=pieces(), headers=headers) as r:
            assert r.status == 200
            assert await r.read() == fixture("openai", "chat_completion.json")
    seen = fake.requests[-1]
    assert seen.body == body
    if announced:
        assert seen.header("Content-Length") == str(len(body))
    else:
        assert seen.header("Transfer-Encoding") == "chunked"
    (event,) = d.events
    assert event.fingerprint == fingerprint("openai", "/chat/completions", None, body)
    assert event.model.startswith("gpt-4o-mini") and event.tokens_in > 0 and event.cost_usd > 0


async def test_streamed_body_over_the_limit_is_413(
    fake: FakeProvider, start_daemon: StartDaemon
) -> None:
    d = await start_daemon(server={"max_buffered_body_bytes": 1000, "max_body_bytes": 20_000})

    async def pieces():  # type: ignore[no-untyped-def]
        for _ in range(50):
            yield b" " * 1000

    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(f"{d.url}/v1/chat/completions", data=pieces()) as r:
                status = r.status
        except aiohttp.ClientError:
            status = 413  # closed while the client was still sending
    assert status == 413
    await asyncio.sleep(0.1)
    assert fake.requests == []  # the provider never got a whole request
