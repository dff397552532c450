"""Cases 8, 9 and 11: what crosses the wire. Compressed answers keep headers and bytes consistent;
compressed requests reach the provider as they were sent; hop-by-hop and spoofable headers never
reach the provider (X-Forwarded-For as configured); no request can make the daemon connect
anywhere but its configured upstreams."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import AsyncIterator

import aiohttp
import brotli
import pytest

from ..conftest import eventually
from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider, fixture, gzip_bomb
from ..fakes.server import start
from .conftest import Figures, StartProxy, port_of, raw_request

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
DECODE = {
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "deflate": zlib.decompress,
    "identity": lambda b: b,
}


async def test_compression_matrix_headers_match_bodies(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures
) -> None:
    p = await start_proxy()
    plain = fixture("openai", "chat_completion.json")
    mismatches = []
    n = 0
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for encoding in DECODE:
            for framing in ("length", "chunked"):
                body = {**CHAT, "messages": [{"role": "user", "content": f"{encoding} {framing}"}]}
                headers = {"x-fake-encoding": encoding, "x-fake-framing": framing}
                async with s.post(p.url + "/v1/chat/completions", json=body, headers=headers) as r:
                    data = await r.read()
                    n += 1
                    length = r.headers.get("Content-Length")
                    problems = []
                    if r.headers.get("Content-Encoding") != encoding:
                        problems.append(f"Content-Encoding {r.headers.get('Content-Encoding')}")
                    if framing == "length" and length != str(len(data)):
                        problems.append(f"Content-Length {length} for {len(data)} bytes")
                    if framing == "chunked" and (
                        length is not None or r.headers.get("Transfer-Encoding") != "chunked"
                    ):
                        problems.append("not chunked")
                    if DECODE[encoding](data) != plain:
                        problems.append("body does not decode to the answer")
                    if problems:
                        mismatches.append((encoding, framing, problems))
    assert mismatches == []
    # The meter read every one of them (usage from the decoded copy).
    await eventually(lambda: len(ingest.delivered()) == n)
    assert all(e["tokens_in"] > 0 for e in ingest.delivered())
    figures("combinations", n)
    figures("mismatches", len(mismatches))


async def test_compressed_requests_are_relayed_as_sent(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy(ship=False)
    body = {**CHAT, "messages": [{"role": "user", "content": "compressed"}]}
    plain = json.dumps(body).encode()
    packed = gzip.compress(plain)
    statuses = []
    async with aiohttp.ClientSession() as s:
        # The bomb as a request body: about 1 MiB of gzip that inflates to 1 GiB.
        bomb = gzip_bomb()
        rss0 = p.rss_mb()
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with s.post(p.url + "/v1/chat/completions", data=bomb, headers=headers) as r:
            bomb_status = r.status
        growth = p.rss_mb() - rss0
        seen = fake.requests[-1]
        # The same request twice compressed and twice plain: one fingerprint, so the fourth is
        # refused as a loop (the daemon fingerprints what the body says, not how it is packed).
        for data, encoding in ((packed, "gzip"), (plain, None), (packed, "gzip"), (plain, None)):
            headers = {"Content-Type": "application/json"}
            if encoding:
                headers["Content-Encoding"] = encoding
            async with s.post(p.url + "/v1/chat/completions", data=data, headers=headers) as r:
                statuses.append(r.status)
        gzipped = [seen for seen in fake.requests[1:] if seen.header("Content-Encoding") == "gzip"]
    figures("statuses: gzip, plain, gzip, plain of one request", statuses)
    figures("a 1 MiB gzip request inflating to 1 GiB", f"{bomb_status}, RSS +{growth:.1f} MB")
    assert statuses == [200, 200, 200, 429]
    assert [g.body for g in gzipped] == [packed, packed]  # as sent, still labelled gzip
    assert (seen.size, seen.digest) == (len(bomb), hashlib.sha256(bomb).hexdigest())
    assert seen.header("Content-Encoding") == "gzip"
    assert bomb_status == 200
    assert growth < 30


async def test_hop_by_hop_and_proxy_headers_never_reach_upstream(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy()
    body = json.dumps(CHAT).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: keep-alive, X-Foo\r\nX-Foo: per-hop\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
        b"Trailer: X-T\r\nX-End: end-to-end\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    answer = await raw_request(port_of(p.url), request, wait=2)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    seen = {k.lower() for k, _ in fake.requests[-1].headers}
    leaked = seen & {
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
        "upgrade",
    }
    assert leaked == set() and "x-end" in seen
    # Upgrade is hop-by-hop too: the daemon answers plain HTTP and does not pass it on.
    upgrade = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    ) + body
    answer = await raw_request(port_of(p.url), upgrade, wait=2)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    if len(fake.requests) == 2:
        seen = {k.lower() for k, _ in fake.requests[-1].headers}
        assert "upgrade" not in seen and "connection" not in seen
    figures("hop-by-hop headers that reached the provider", len(leaked))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep", ("203.0.113.7", None)),
        ("drop", (None, None)),
        ("append", ("203.0.113.7, 127.0.0.1", None)),
    ],
)
async def test_x_forwarded_for_per_config(
    start_proxy: StartProxy,
    fake: FakeProvider,
    mode: str,
    expected: tuple[str | None, str | None],
) -> None:
    p = await start_proxy(server={"forwarded_for": mode})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            p.url + "/v1/chat/completions",
            json=CHAT,
            headers={"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}
            if mode != "append"
            else {"X-Forwarded-For": "203.0.113.7"},
        ) as r:
            assert r.status == 200
    seen = fake.requests[-1]
    assert seen.header("X-Forwarded-For") == expected[0]
    if mode == "drop":
        assert seen.header("X-Real-IP") is None


@pytest.fixture
async def evil() -> AsyncIterator[FakeProvider]:
    """A server no request may reach: it counts every connection made to it."""
    provider = FakeProvider()
    server = await start(provider.app(), on_connection=provider.connected)
    provider.url = server.url
    yield provider
    await server.stop()


async def test_no_open_proxy(
    start_proxy: StartProxy, fake: FakeProvider, evil: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy()
    port = port_of(p.url)
    target = evil.url.removeprefix("http://")
    attempts = {
        "absolute-form target": f"GET {evil.url}/v1/models HTTP/1.1\r\nHost: {target}\r\n\r\n",
        "metadata address": "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n"
        "Host: 169.254.169.254\r\n\r\n",
        "CONNECT": f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        "spoofed Host": f"GET /v1/models HTTP/1.1\r\nHost: {target}\r\n\r\n",
        "//host path": f"GET //{target}/v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "host as provider": f"GET /{target}/v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "encoded ..": "GET /openai/%2e%2e/%2E%2E/v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "@ userinfo": f"GET /openai@{target}/v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
    }
    statuses = {}
    for name, request in attempts.items():
        answer = await raw_request(port, request.encode() + b"", wait=2)
        statuses[name] = int(answer.split(b" ", 2)[1]) if answer else None
    # A provider that redirects elsewhere: the 302 is relayed, never followed.
    async with aiohttp.ClientSession() as s:
        async with s.post(
            p.url + "/v1/chat/completions",
            json=CHAT,
            headers={"x-fake-fault": "redirect", "x-fake-location": evil.url + "/stolen"},
            allow_redirects=False,
        ) as r:
            statuses["upstream redirect"] = r.status
            assert r.headers["Location"] == evil.url + "/stolen"
    assert evil.connections == 0 and evil.requests == []
    assert statuses["CONNECT"] in (400, 404, 405)
    assert statuses["encoded .."] == 400
    # Everything that reached a provider reached the configured one, on configured paths only.
    fake_target = fake.url.removeprefix("http://")
    upstreams = {
        k for k, v in (await p.metrics()).items() if k.startswith("atlasburn_upstream_conn")
    }
    assert all(fake_target in k for k in upstreams), upstreams
    figures("answers", statuses)
    figures("connections to anything else", evil.connections)
