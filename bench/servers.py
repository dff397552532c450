"""The servers of the benchmark, each run as its own process (``python -m bench.servers KIND``).

- ``provider``: a fast fake LLM provider. Answers are precomputed: a chat completion JSON body
  (padded to ``--answer-bytes``), and an SSE stream of ``chunks`` events sent ``delay_ms``
  apart. It reads every request body.
- ``passthrough``: the reference: a minimal aiohttp + uvloop reverse proxy with no telemetry,
  streaming every body chunk by chunk.
- ``ingest``: a fake AtlasBurn ingest API that counts the events (and distinct fingerprints) it
  receives; ``GET /count`` reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import uvloop
from aiohttp import web


def chat_answer(size: int = 0) -> bytes:
    """The chat completion JSON answer; with ``size``, its message is padded so that the answer
    is about ``size`` bytes."""
    small = _chat("Hello! How can I help?")
    if size <= len(small):
        return small
    return _chat("Hello! How can I help? " + "x" * (size - len(small) - 1))


def _chat(content: str) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1769090400,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 7,
            "total_tokens": 26,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }
    return json.dumps(body, separators=(",", ":")).encode()


def chunk(i: int, usage: bool, last: bool = False) -> bytes:
    body: dict[str, object] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1769090400,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": f"tok{i} "},
                "logprobs": None,
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    if usage:
        body["usage"] = None
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def stream_events(n: int, usage: bool) -> list[bytes]:
    events = [chunk(i, usage, last=(i == n - 1)) for i in range(n)]
    if usage:
        events.append(
            b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1769090400,'
            b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":'
            b'"fp_bench","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":'
            + str(n).encode()
            + b',"total_tokens":'
            + str(19 + n).encode()
            + b"}}\n\n"
        )
    events.append(b"data: [DONE]\n\n")
    return events


def provider_app(chunks: int, delay_ms: float, answer_bytes: int = 0) -> web.Application:
    answer = chat_answer(answer_bytes)
    plain = stream_events(chunks, usage=False)
    with_usage = stream_events(chunks, usage=True)
    delay = delay_ms / 1000

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream":true' not in raw:
            return web.Response(body=answer, content_type="application/json")
        events = with_usage if b'"include_usage":true' in raw else plain
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(event)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def passthrough_app(upstream: str) -> web.Application:
    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=0)
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["session"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={
                    k: v
                    for k, v in up.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                },
            )
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", r"/{tail:[\s\S]*}", relay)  # every path, as the daemon routes
    return app


def ingest_app() -> web.Application:
    events = 0
    fingerprints: set[str] = set()

    async def ingest(request: web.Request) -> web.Response:
        nonlocal events
        body = await request.json()
        for event in body["events"]:
            events += 1
            fingerprints.add(event["fingerprint"])
        return web.json_response(
            {"accepted": len(body["events"]), "rejected": 0, "guardrail_status": "ok"}
        )

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"events": events, "distinct": len(fingerprints)})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/api/ingest", ingest)
    app.router.add_get("/count", count)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("provider", "passthrough", "ingest"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--answer-bytes", type=int, default=0, help="pad the JSON answer to this")
    args = parser.parse_args()
    if args.kind == "provider":
        app = provider_app(args.chunks, args.delay_ms, args.answer_bytes)
    elif args.kind == "passthrough":
        app = passthrough_app(args.upstream)
    else:
        app = ingest_app()
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        backlog=4096,
    )


if __name__ == "__main__":
    main()
