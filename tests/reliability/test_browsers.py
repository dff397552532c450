"""Case 18: a web page is not a client. Requests carrying the headers a browser sends for a
page on another site (a cross-site ``fetch`` in ``no-cors`` mode, an ``<img>``) or for a page
whose name was rebound to 127.0.0.1 (DNS rebinding) are refused before any guardrail counts
them; SDKs, same-origin pages and configured origins and hosts are served as before."""

from __future__ import annotations

import asyncio
import json

import openai

from ..fakes.ingest import FakeIngest
from ..fakes.provider import FakeProvider
from .conftest import Figures, StartProxy, guardrail_state, port_of, raw_request


def browser_fetch(port: int, origin: str, site: str, host: str = "", body: str = "x") -> bytes:
    """What Chromium sends for ``fetch("http://127.0.0.1:PORT/v1/chat/completions",
    {method: "POST", mode: "no-cors", body: "x"})`` from a page of ``origin``."""
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host or f'127.0.0.1:{port}'}\r\n"
        "Connection: keep-alive\r\n"
        f"Content-Length: {len(body)}\r\n"
        'sec-ch-ua-platform: "Linux"\r\n'
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36\r\n"
        'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"\r\n'
        "Content-Type: text/plain;charset=UTF-8\r\n"
        "sec-ch-ua-mobile: ?0\r\n"
        "Accept: */*\r\n"
        f"Origin: {origin}\r\n"
        f"Sec-Fetch-Site: {site}\r\n"
        "Sec-Fetch-Mode: no-cors\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        f"Referer: {origin}/\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def status_and_code(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = ""
    return status, str(code)


async def test_cross_site_pages_cannot_trip_the_loop_detector(
    start_proxy: StartProxy, fake: FakeProvider, ingest: FakeIngest, figures: Figures
) -> None:
    p = await start_proxy()
    port = port_of(p.url)
    answers = []
    attack = browser_fetch(port, "https://evil.example", "cross-site")
    for _ in range(10):  # four would have tripped the loop detector and suspended the org
        answers.append(status_and_code(await raw_request(port, attack, wait=2.0)))
    # An <img src> or <script src> on another site: no Origin, only Sec-Fetch-Site.
    img = (
        f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site\r\n"
        "Sec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: image\r\nConnection: close\r\n\r\n"
    ).encode()
    answers.append(status_and_code(await raw_request(port, img)))
    await asyncio.sleep(0.5)
    state = (await guardrail_state(p.url, ingest.api_key))[1]["state"]
    metrics = await p.metrics()
    figures("answers to 10 cross-site fetches and one cross-site <img>", sorted(set(answers)))
    figures("org state afterwards", state)
    assert answers[:10] == [(403, "cross_origin_request")] * 10
    assert answers[10] == (403, "cross_site_request")
    assert state == "ok"
    assert fake.requests == []  # nothing reached the provider
    assert ingest.enforce_calls == []  # nothing was reported to the AtlasBurn API
    assert not any(k.startswith("atlasburn_requests_total") for k in metrics)  # no event
    assert metrics['atlasburn_limit_hits_total{limit="cross_site"}'] == 11


async def test_a_rebound_host_name_is_not_served(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy(ship=False)
    port = port_of(p.url)
    rebound = f"rebind.evil.example:{port}"
    metrics = f"GET /metrics HTTP/1.1\r\nHost: {rebound}\r\nConnection: close\r\n\r\n"
    chat = browser_fetch(port, f"http://{rebound}", "same-origin", host=rebound)
    answers = {
        "GET /metrics": status_and_code(await raw_request(port, metrics.encode())),
        "POST /v1/chat/completions": status_and_code(await raw_request(port, chat)),
    }
    figures("answers to a page at rebind.evil.example", answers)
    assert answers == {
        "GET /metrics": (403, "forbidden_host"),
        "POST /v1/chat/completions": (403, "forbidden_host"),
    }
    assert fake.requests == []


async def test_sdks_same_origin_pages_and_configured_origins_are_served(
    start_proxy: StartProxy, fake: FakeProvider, figures: Figures
) -> None:
    p = await start_proxy(
        ship=False,
        server={
            "allowed_origins": ["http://localhost:3000"],
            "allowed_hosts": ["atlasburn-proxy"],
        },
    )
    port = port_of(p.url)
    async with openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="sk-test") as client:
        sdk = await client.embeddings.create(model="text-embedding-3-small", input="hi")
    # (each with its own body: four identical requests would be a loop)
    served = {
        "same-origin page": browser_fetch(
            port, f"http://127.0.0.1:{port}", "same-origin", body="1"
        ),
        "allowed origin": browser_fetch(port, "http://localhost:3000", "same-site", body="2"),
        "allowed host": browser_fetch(
            port,
            f"http://atlasburn-proxy:{port}",
            "same-origin",
            host=f"atlasburn-proxy:{port}",
            body="3",
        ),
        "localhost": browser_fetch(
            port, f"http://localhost:{port}", "same-origin", host=f"localhost:{port}", body="4"
        ),
    }
    answers = {}
    for name, data in served.items():
        answers[name] = (await raw_request(port, data, wait=2.0))[:12]
    figures("answers", answers)
    assert sdk.data
    assert set(answers.values()) == {b"HTTP/1.1 200"}
    # A page of another local app that is not configured is still refused.
    other = status_and_code(
        await raw_request(port, browser_fetch(port, "http://localhost:3001", "same-site"))
    )
    assert other == (403, "cross_origin_request")
